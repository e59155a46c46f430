#!/usr/bin/env bash
# clipstyle on one CUDA GPU: the device tests there, then its speed; about 8 minutes (an estimate:
# the earlier measurements alone took about 5; the tests, the compiled run and the profiles are new).
#
#   bash benchmarks/gpu.sh                      # on the GPU machine, from the repository root
#   CLIPSTYLE_BENCH_DRY=1 bash benchmarks/gpu.sh  # a quick run of the same script on the CPU
#
# First the tests marked `device` run with the tiny models on the GPU
# (CLIPSTYLE_TEST_DEVICE; their output is kept in $OUT/tests.txt, and a failure
# there does not stop the measurements). Then random weights throughout
# (nothing is downloaded): every bench call times steps and the fp32 compute
# floor alternately in one process; the fp32 call also times the
# reference-style step (plain fp32, a Python loop over crops) in the same
# process. Each result is kept as JSON in $OUT (default: a new temporary
# folder); a short table is printed last, then profiles of one step at
# batch 1 and at the first --batch size (benchmarks/gpu_profile.py: host time,
# device busy time, kernels per step, the kernels that take the most time).
#
#   CLIPSTYLE_GPU_TESTS=0      skip the tests
#   CLIPSTYLE_BENCH_COMPILE="default reduce-overhead"  the --compile modes timed
#                              (about a minute each, compiling; "" for none)
#   CLIPSTYLE_BENCH_BATCH="8 16"  the --batch sizes timed
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"

if [[ "${CLIPSTYLE_BENCH_DRY:-0}" == 1 ]]; then
    # Tiny settings on the CPU: checks the script end to end, measures nothing useful.
    DEVICE=cpu
    COMMON=(--device cpu --size 64 --crops 2 --crop-size 32 --repeats 1 --warmup 0)
    BATCHES=${CLIPSTYLE_BENCH_BATCH:-2}
    TEST_MARKS="device and not slow"
    COMPILE=${CLIPSTYLE_BENCH_COMPILE-}
    LOAD_SIZE=(--size 64 --crops 2 --crop-size 32)
    PROFILE_SIZE=(--size 64 --crops 2 --crop-size 32 --warmup 1 --steps 2)
    PRECISION_SIZE=(--size 64 --crops 2)
else
    # Paper defaults: 512 px, 64 crops of 128 px.
    DEVICE=cuda
    COMMON=(--device cuda --repeats 10 --warmup 3)
    BATCHES=${CLIPSTYLE_BENCH_BATCH:-8 16}
    TEST_MARKS="device"
    COMPILE=${CLIPSTYLE_BENCH_COMPILE-reduce-overhead}
    LOAD_SIZE=(--size 64 --crops 2 --crop-size 32)
    PROFILE_SIZE=()  # paper defaults
    PRECISION_SIZE=()
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
echo "results in $OUT" >&2

if [[ "${CLIPSTYLE_GPU_TESTS:-1}" == 1 ]]; then
    # Only the files with device tests: the others import extras a GPU machine may lack.
    mapfile -t FILES < <(grep -l "mark.device" tests/test_*.py)
    echo "== tests: CLIPSTYLE_TEST_DEVICE=$DEVICE pytest -m '$TEST_MARKS' (${#FILES[@]} files)" >&2
    set +e
    CLIPSTYLE_TEST_DEVICE=$DEVICE timeout "${CLIPSTYLE_TEST_TIMEOUT:-240}" \
        "$PY" -m pytest -q -p no:cacheprovider -m "$TEST_MARKS" "${FILES[@]}" > "$OUT/tests.txt" 2>&1
    echo $? > "$OUT/tests.rc"
    set -e
    grep -E "^(FAILED|ERROR)" "$OUT/tests.txt" >&2 || true
    tail -n 1 "$OUT/tests.txt" >&2
fi

bench() {
    local name=$1
    shift
    echo "== $name: clipstyle bench $* ${COMMON[*]}" >&2
    "$PY" -m clipstyle bench "${COMMON[@]}" "$@" --json > "$OUT/$name.json"
}

bench fp32 --precision fp32 --baseline
bench auto --precision auto
bench auto-nchw --precision auto --memory-format contiguous
bench fp32-nhwc --precision fp32 --memory-format channels_last
for n in $BATCHES; do
    bench "batch$n" --precision auto --batch "$n"
done
bench draft --preset draft --precision auto
for mode in $COMPILE; do
    bench "compile-$mode" --precision auto --compile "$mode"
done

# bf16 against fp16 for the encoders: the gradient at the image against fp32's (picks --precision auto).
echo "== precision: benchmarks/precision.py" >&2
"$PY" benchmarks/precision.py --device "$DEVICE" "${PRECISION_SIZE[@]}" > "$OUT/precision.txt"

# Where a step's time goes: host time, device busy time, kernels (benchmarks/gpu_profile.py).
mkdir -p "$OUT/profile"
for n in 1 ${BATCHES%% *}; do
    echo "== profile: gpu_profile.py --batch $n" >&2
    "$PY" benchmarks/gpu_profile.py --device "$DEVICE" "${PROFILE_SIZE[@]}" --batch "$n" \
        --json "$OUT/profile/batch$n.json" > "$OUT/profile/batch$n.txt"
done

# Loading from local files: random weights written once, then timed by bench.
"$PY" - "$OUT" <<'EOF'
import sys
import torch
import open_clip
from torchvision.models import vgg19

out = sys.argv[1]
torch.save(open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).state_dict(), f"{out}/clip.pt")
torch.save(vgg19().state_dict(), f"{out}/vgg19.pth")
EOF
DEVICE_ARGS=("${COMMON[@]:0:2}")
echo "== load: bench --clip-weights --vgg-weights" >&2
"$PY" -m clipstyle bench "${DEVICE_ARGS[@]}" "${LOAD_SIZE[@]}" --repeats 1 --warmup 0 \
    --clip-weights "$OUT/clip.pt" --vgg-weights "$OUT/vgg19.pth" --json > "$OUT/load.json"
rm -f "$OUT/clip.pt" "$OUT/vgg19.pth"

"$PY" - "$OUT" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
rows = []
for path in sorted(out.glob("*.json")):
    r = json.loads(path.read_text())
    per_image = r["seconds_per_step"] * r["steps"] / r["batch"]
    peak = r["peak_memory_bytes"]
    rows.append([
        path.stem, r["precision"], r["memory_format"], r["compile"] or "-", str(r["batch"]),
        f"{r['size'][0]}/{r['crops']}",
        f"{r['seconds_per_step']:.4f}", f"{r['floor_seconds']:.4f}", f"{r['ratio']:.2f}",
        f"{per_image:.1f}", "-" if peak is None else f"{peak / 1e9:.2f}",
        f"{r['images_per_minute']:.1f}",
        "-" if r.get("baseline_seconds") is None else f"{r['baseline_seconds']:.4f} ({r['speedup']:.1f}x)",
        "-" if r.get("load_seconds") is None else f"{r['load_seconds']:.2f}",
        f"{r['first_step_seconds']:.1f}",
    ])
head = ["run", "prec", "layout", "compile", "batch", "size/crops", "s/step", "floor s", "ratio", "s/image",
        "peak GB", "img/min", "baseline s/step", "load s", "first step s"]
first = json.loads(next(iter(sorted(out.glob("*.json")))).read_text())
print(f"\n{first['processor']}, torch {first['torch_version']}; s/image = s/step x steps / batch "
      f"(steps: {first['steps']}, draft: 100)")
widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
for row in [head, *rows]:
    print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))
for path in [out / "precision.txt", *sorted((out / "profile").glob("*.txt"))]:
    print("\n" + path.read_text().strip())
tests = out / "tests.txt"
if tests.exists():
    last = tests.read_text().strip().splitlines()[-1:] or ["(no output)"]
    print(f"\ntests on the device (exit {(out / 'tests.rc').read_text().strip()}): {last[0]}")
EOF
