#!/usr/bin/env bash
# Restyle every image of a folder with two prompts in one call: the models load
# once, existing outputs are skipped (so rerunning resumes), a broken file is
# reported and the rest go on, and runs.jsonl gets one record per image x prompt.
#
#   examples/folder.sh [INPUT_FOLDER] [OUTPUT_FOLDER]
set -euo pipefail
in=${1:-examples/images}
out=${2:-out/styled}
clipstyle run "$in" -o "$out" \
    -p "starry night by Vincent van Gogh" \
    -p "ink wash painting" \
    --report "$out/runs.jsonl" "${@:3}"

# The same as a plain shell loop, for comparison: it reloads CLIP and VGG-19 for
# every file, so it is slower; shown because it is what people write first.
#   for f in "$in"/*.jpg; do clipstyle run -p "ink wash painting" "$f" -o "$out"; done
