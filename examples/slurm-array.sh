#!/usr/bin/env bash
# Split a folder over a SLURM job array: each task takes a stable shard of the
# (image, prompt) pairs, the same on every node, so no coordination is needed.
# Outputs that exist are skipped, so a requeued or rerun task resumes.
#
#   sbatch --array=1-8 examples/slurm-array.sh photos/ styled/ "ink wash painting" [run options...]
#
# Options after the prompt go to every `clipstyle run`, e.g.
#   --clip-weights ViT-B-32.pt --vgg-weights vgg19-dcbb9e9d.pth --steps 300
# Any contiguous array works (--array=0-7, --array=2-3, --array=1-15:2): shards
# are numbered from the array's first index and step.
#
#SBATCH --job-name=clipstyle
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
set -euo pipefail
in=${1:?input folder}
out=${2:?output folder}
prompt=${3:?style prompt}
shift 3
id=${SLURM_ARRAY_TASK_ID:?run me with sbatch --array=1-N}
n=${SLURM_ARRAY_TASK_COUNT:?run me with sbatch --array=1-N}
k=$(( (id - ${SLURM_ARRAY_TASK_MIN:-1}) / ${SLURM_ARRAY_TASK_STEP:-1} + 1 ))  # 1..N
clipstyle run "$in" -r -o "$out" -p "$prompt" \
    --shard "$k/$n" --report "$out/report-$k.jsonl" --quiet "$@"
