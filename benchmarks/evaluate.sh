#!/usr/bin/env bash
# Quality protocol of docs/evaluation.md in one go: stylize the example images
# with the protocol's prompts, score every output, draw the contact sheet, and
# print the means beside the published figures.
#
#   benchmarks/evaluate.sh --clip-weights ViT-B-32.pt --vgg-weights vgg19-dcbb9e9d.pth
#
# Arguments are model flags, passed to both `clipstyle run` and `clipstyle score`.
# Environment (defaults in brackets):
#   OUT           output folder [evaluation]
#   IMAGES        content images: a folder or file [examples/images]
#   PROMPTS_FILE  prompts, one per line ('#' comments) [the list below]
#   RUN_FLAGS     settings of `clipstyle run` [--preset paper --contrast --seed 0]
#   SCORE_FLAGS   flags of `clipstyle score` [--no-templates]
#   CLIPSTYLE     the command [clipstyle]; split on spaces, e.g. "python -m clipstyle"
#   PYTHON        a Python 3 for the summary (standard library only) [python3]
# Re-running skips outputs that exist (delete OUT to start again); scores and
# the sheet are rebuilt each time. Exit code 1 if any pair failed.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${OUT:-evaluation}
IMAGES=${IMAGES:-$here/../examples/images}
RUN_FLAGS=${RUN_FLAGS---preset paper --contrast --seed 0}
SCORE_FLAGS=${SCORE_FLAGS---no-templates}
PYTHON=${PYTHON:-python3}
read -r -a clipstyle <<< "${CLIPSTYLE:-clipstyle}"
read -r -a run_flags <<< "$RUN_FLAGS"
read -r -a score_flags <<< "$SCORE_FLAGS"

# Styles of the kind the CLIPstyler paper shows: painters, materials, media, and
# one known failure case (words painted in: "Pop art").
prompts=(
  "Starry Night by Vincent van gogh"
  "Neon light"
  "Desert sand"
  "Watercolor painting"
  "Sketch with black pencil"
  "Stone wall"
  "Fire"
  "Pop art"
)
if [[ -n "${PROMPTS_FILE:-}" ]]; then
  prompts=()
  while IFS= read -r line || [[ -n "$line" ]]; do
    [[ -z "${line//[[:space:]]/}" || "$line" =~ ^[[:space:]]*# ]] && continue
    prompts+=("$line")
  done < "$PROMPTS_FILE"
fi
prompt_args=()
for p in "${prompts[@]}"; do prompt_args+=(-p "$p"); done

mkdir -p "$OUT"
status=0
echo "== run: ${#prompts[@]} prompts on $IMAGES" >&2
"${clipstyle[@]}" run "$IMAGES" "${prompt_args[@]}" -o "$OUT/styled" --report "$OUT/runs.jsonl" \
  "${run_flags[@]}" "$@" || status=$?

echo "== score" >&2
"${clipstyle[@]}" score --report "$OUT/runs.jsonl" --json "${score_flags[@]}" "$@" > "$OUT/scores.jsonl.part" \
  || status=1
mv "$OUT/scores.jsonl.part" "$OUT/scores.jsonl"

echo "== sheet" >&2
"${clipstyle[@]}" sheet --report "$OUT/runs.jsonl" --scores "$OUT/scores.jsonl" -o "$OUT/sheet.png" \
  --title "clipstyle evaluation" --overwrite -q || status=1

"$PYTHON" - "$OUT/scores.jsonl" <<'EOF' | tee "$OUT/summary.txt"
import json, math, sys

records = [json.loads(line) for line in open(sys.argv[1], encoding="utf-8") if line.strip()]
published = {  # docs/evaluation.md, "Published figures"
    "clip_score": ("CLIP score x100", 100, "27.14 (DiffArtist comparison)"),
    "patch_clip_score": ("patch CLIP score", 1, "0.2515 (CLIPstyler, appendix B.3)"),
    "directional_similarity": ("directional similarity", 1, "-"),
    "content_distance": ("VGG content distance", 1, "-"),
    "ssim": ("SSIM", 1, "-"),
    "lpips": ("LPIPS", 1, "0.46 (DiffArtist comparison)"),
}
print(f"{len(records)} images scored")
print(f"{'metric':<26}{'mean':>10}   published")
for key, (name, factor, figure) in published.items():
    values = [r[key] for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    mean = f"{factor * sum(values) / len(values):.4f}" if values else "n/a"
    print(f"{name:<26}{mean:>10}   {figure}")
notes = sorted({n for r in records for n in r.get("notes", [])})
for note in notes:
    print(f"note: {note}")
EOF
echo "wrote $OUT/styled/, $OUT/runs.jsonl, $OUT/scores.jsonl, $OUT/sheet.png, $OUT/sheet.html, $OUT/summary.txt" >&2
exit "$status"
