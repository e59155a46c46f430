#!/usr/bin/env bash
# Restyle a folder on a Ray cluster: one worker per GPU, each loading the models
# once, pairs handed out as workers finish; a worker that dies is replaced and
# its pairs run elsewhere. This machine (the driver) reads the inputs and writes
# every output, report line and summary, so the GPU machines need no shared
# folder, only clipstyle with the same version:  pip install 'clipstyle[ray]'
#
#   examples/ray-cluster.sh photos/ styled/ HEAD_HOST:6379
#
# A cluster of plain machines:
#   on the head:         ray start --head --port=6379
#   on each GPU machine: ray start --address=HEAD_HOST:6379
# On Kubernetes, a KubeRay RayCluster whose worker image has clipstyle installed
# gives the same: run this script where it can reach the head's port 6379 (e.g.
# `kubectl port-forward svc/RAYCLUSTER-head-svc 6379:6379`), or inside the head pod.
# Without an address (and without RAY_ADDRESS), Ray starts on this machine alone.
set -euo pipefail
in=${1:?input folder}
out=${2:?output folder}
address=${3:-${RAY_ADDRESS:-}}
clipstyle run "$in" -r -o "$out" -p "ink wash painting" -p "mosaic" \
    --executor ray ${address:+--ray-address "$address"} \
    --report "$out/report.jsonl"
# Rerunning the same command resumes: existing outputs are skipped.
# On a large GPU, --batch 4 (or more) optimises several pairs at once per worker.
# On a cluster without GPUs: --ray-cpus-per-worker 8 gives each worker 8 CPUs.
