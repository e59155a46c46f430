#!/usr/bin/env bash
# Split a folder over N processes (or machines) with GNU parallel. Each
# process takes one stable shard of the (image, prompt) pairs; with one GPU per
# process, CUDA_VISIBLE_DEVICES picks it. Kubernetes indexed jobs do the same
# with --shard "$((JOB_COMPLETION_INDEX + 1))/N".
#
#   examples/parallel.sh photos/ styled/ 4 "ink wash painting" [run options...]
#
# Options after the prompt go to every `clipstyle run`, e.g.
#   --clip-weights ViT-B-32.pt --vgg-weights vgg19-dcbb9e9d.pth --steps 300
set -euo pipefail
in=${1:?input folder}
out=${2:?output folder}
n=${3:?number of processes}
prompt=${4:?style prompt}
shift 4
# each argument quoted for the shell that parallel runs the command in
q() { [ $# -eq 0 ] || printf ' %q' "$@"; }
seq 1 "$n" | parallel -j "$n" --line-buffer \
    "CUDA_VISIBLE_DEVICES=\$(( {} - 1 )) clipstyle run$(q "$in" -r -o "$out" -p "$prompt") --shard {}/$n"`
    `" --report$(q "$out")/report-{}.jsonl --quiet$(q "$@")"
# On one machine with several GPUs, one command does the same without parallel:
#   clipstyle run "$in" -r -o "$out" -p "$prompt" --devices cuda:0,cuda:1
