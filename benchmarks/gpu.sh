#!/usr/bin/env bash
# clipstyle on one CUDA GPU: the graph path (--cuda-graph) and --batch auto against the eager step at batch 1,
# in one call that fits 8 minutes (an estimate: each bench call was about 30 s on an H200; the tests are
# capped at CLIPSTYLE_TEST_TIMEOUT, 150 s). It prints one table.
#
#   bash benchmarks/gpu.sh                      # on the GPU machine, from the repository root
#   CLIPSTYLE_BENCH_DRY=1 bash benchmarks/gpu.sh  # a quick run of the same script on the CPU
#
# First the tests marked `device` run with the tiny models on the GPU
# (CLIPSTYLE_TEST_DEVICE; their output is kept in $OUT/tests.txt, and a failure
# there does not stop the measurements); among them, a real recording of the
# graph path against the eager loop. Then random weights throughout (nothing is
# downloaded), paper defaults (512 px, 64 crops of 128 px): four bench calls,
# eager and graph at batch 1 and at --batch auto, each timing steps and the
# fp32 compute floor alternately in one process (the first also times the
# reference-style step) and counting the operators of one step; then
# benchmarks/graph_equality.py (graph against eager, and against itself) and
# profiles of one step at batch 1, eager and graph (benchmarks/gpu_profile.py:
# device kernels per step, host time, device busy time). Each result is kept
# in $OUT (default: a new temporary folder); the table is printed last.
#
#   CLIPSTYLE_GPU_TESTS=0      skip the tests
#   CLIPSTYLE_BENCH_EXTRA=1    also the earlier rows (fp32, layouts, draft, compile, precision, loading):
#                              several minutes more, beyond one 8-minute call
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
    EQUALITY_SIZE=(--size 32 --crops 2 --steps 4)
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
    EQUALITY_SIZE=()  # 256 px, 16 crops, 30 steps
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
EXTRA=${CLIPSTYLE_BENCH_EXTRA:-0}
echo "results in $OUT" >&2

if [[ "${CLIPSTYLE_GPU_TESTS:-1}" == 1 ]]; then
    # Only the files with device tests: the others import extras a GPU machine may lack.
    mapfile -t FILES < <(grep -l "mark.device" tests/test_*.py)
    echo "== tests: CLIPSTYLE_TEST_DEVICE=$DEVICE pytest -m '$TEST_MARKS' (${#FILES[@]} files)" >&2
    set +e
    CLIPSTYLE_TEST_DEVICE=$DEVICE timeout "${CLIPSTYLE_TEST_TIMEOUT:-150}" \
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

# The rows of issue 23: eager and graph, batch 1 and auto (precision auto: bf16 on the card).
bench eager-b1 --precision auto --baseline
bench graph-b1 --precision auto --cuda-graph
bench eager-auto --precision auto --batch auto
bench graph-auto --precision auto --batch auto --cuda-graph

# Graph against eager (and against itself): equal to rounding, repeatable.
echo "== equality: benchmarks/graph_equality.py" >&2
"$PY" benchmarks/graph_equality.py --device "$DEVICE" "${EQUALITY_SIZE[@]}" --json "$OUT/equality.json" \
    > "$OUT/equality.txt"

# Device kernels per step and where a step's time goes (benchmarks/gpu_profile.py), eager and graph.
mkdir -p "$OUT/profile"
for path in eager graph; do
    flag=()
    [[ $path == graph ]] && flag=(--cuda-graph)
    echo "== profile: gpu_profile.py --batch 1 ${flag[*]}" >&2
    "$PY" benchmarks/gpu_profile.py --device "$DEVICE" "${PROFILE_SIZE[@]}" --batch 1 "${flag[@]}" \
        --json "$OUT/profile/$path.json" > "$OUT/profile/$path.txt"
done

if [[ "$EXTRA" == 1 ]]; then
    mkdir -p "$OUT/extra"
    for n in $BATCHES; do
        bench "extra/batch$n" --precision auto --batch "$n"
    done
    bench extra/fp32 --precision fp32 --baseline
    bench extra/auto-nchw --precision auto --memory-format contiguous
    bench extra/fp32-nhwc --precision fp32 --memory-format channels_last
    bench extra/draft --preset draft --precision auto
    for mode in $COMPILE; do
        bench "extra/compile-$mode" --precision auto --compile "$mode"
    done
    echo "== precision: benchmarks/precision.py" >&2
    "$PY" benchmarks/precision.py --device "$DEVICE" "${PRECISION_SIZE[@]}" > "$OUT/precision.txt"
fi

"$PY" - "$OUT" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
order = ["eager-b1", "graph-b1", "eager-auto", "graph-auto"]
paths = [out / f"{name}.json" for name in order] + sorted((out / "extra").glob("*.json"))
paths = [p for p in paths if p.exists()]
profiles = {p.stem: json.loads(p.read_text()) for p in sorted((out / "profile").glob("*.json"))}
rows = []
for path in paths:
    r = json.loads(path.read_text())
    per_image = r["seconds_per_step"] * r["steps"] / r["batch"]
    peak = r["peak_memory_bytes"]
    ops = r.get("ops") or {}
    graph = bool(r.get("cuda_graph"))
    profile = profiles.get("graph" if graph else "eager", {}) if r["batch"] == 1 and path.parent == out else {}
    kernels = profile.get("kernels_per_step")
    rows.append([
        path.stem, r["precision"], "graph" if graph else "eager",
        f"{r['batch']}{' (auto)' if r.get('batch_auto') else ''}", f"{r['size'][0]}/{r['crops']}",
        f"{r['seconds_per_step']:.4f}", f"{per_image:.2f}", f"{r['images_per_minute']:.1f}",
        "-" if peak is None else f"{peak / 1e9:.2f}", f"{r['ratio']:.2f}",
        str(ops.get("calls", "-")), str(ops.get("launches", "-")), str(ops.get("host_reads", "-")),
        "-" if kernels is None else f"{kernels:.0f}",
        "-" if r.get("baseline_seconds") is None else f"{r['baseline_seconds']:.4f} ({r['speedup']:.1f}x)",
        f"{r['first_step_seconds']:.1f}",
    ])
head = ["run", "prec", "path", "batch", "size/crops", "s/step", "s/image", "img/min", "peak GB", "step/floor",
        "ops/step", "launches/step", "host reads/step", "kernels/step", "baseline s/step", "first step s"]
first = json.loads(paths[0].read_text())
print(f"\n{first['processor']}, torch {first['torch_version']}; s/image = s/step x steps / batch "
      f"(steps: {first['steps']}); ops, launches, host reads: what the host dispatches in one step "
      f"(bench's operator count); kernels: the device's, per step (gpu_profile.py, batch 1)")
widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
for row in [head, *rows]:
    print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))
for path in [out / "equality.txt", out / "precision.txt", *sorted((out / "profile").glob("*.txt"))]:
    if path.exists():
        print("\n" + path.read_text().strip())
tests = out / "tests.txt"
if tests.exists():
    last = tests.read_text().strip().splitlines()[-1:] or ["(no output)"]
    print(f"\ntests on the device (exit {(out / 'tests.rc').read_text().strip()}): {last[0]}")
EOF
