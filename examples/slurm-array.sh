#!/usr/bin/env bash
# Split a folder over a SLURM job array: each task takes a stable shard of the
# (image, prompt) pairs, the same on every node, so no coordination is needed.
# Outputs that exist are skipped, so a requeued or rerun task resumes.
#
#   sbatch --array=1-8 examples/slurm-array.sh photos/ styled/
#
#SBATCH --job-name=clipstyle
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
set -euo pipefail
in=${1:?input folder}
out=${2:?output folder}
k=${SLURM_ARRAY_TASK_ID:?run me with sbatch --array=1-N}
n=${SLURM_ARRAY_TASK_COUNT:?run me with sbatch --array=1-N}
# SLURM arrays may start at 0; shards count from 1.
if [ "${SLURM_ARRAY_TASK_MIN:-1}" = 0 ]; then k=$((k + 1)); fi
clipstyle run "$in" -r -o "$out" -p "ink wash painting" \
    --shard "$k/$n" --report "$out/report-$k.jsonl" --quiet
