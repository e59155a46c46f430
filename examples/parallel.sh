#!/usr/bin/env bash
# Split a folder over N processes (or machines) with GNU parallel. Each
# process takes one stable shard of the (image, prompt) pairs; with one GPU per
# process, CUDA_VISIBLE_DEVICES picks it. Kubernetes indexed jobs do the same
# with --shard "$((JOB_COMPLETION_INDEX + 1))/N".
#
#   examples/parallel.sh photos/ styled/ 4
set -euo pipefail
in=${1:?input folder}
out=${2:?output folder}
n=${3:-2}
seq 1 "$n" | parallel -j "$n" --line-buffer \
    'CUDA_VISIBLE_DEVICES=$(( {} - 1 )) clipstyle run '"'$in'"' -r -o '"'$out'"' -p "ink wash painting" --shard {}/'"$n"' --report '"'$out'"'/report-{}.jsonl --quiet'
# On one machine with several GPUs, one command does the same without parallel:
#   clipstyle run "$in" -r -o "$out" -p "ink wash painting" --devices cuda:0,cuda:1
