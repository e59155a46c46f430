"""The graph path (--cuda-graph) against the eager loop, and against itself, on one device.

    python benchmarks/graph_equality.py                      # CUDA: 256 px, 16 crops, 30 steps
    python benchmarks/graph_equality.py --device cpu --size 32 --crops 2 --steps 4   # a quick check

Random weights of the real architectures (nothing downloaded), one photo, one
prompt, one seed. For each precision (fp32, and the device's auto), prints one
line: whether the graph path recorded its step (no warning), the largest
difference of its output image and of its losses from the eager loop's, and
whether a second graph run repeats the first exactly. The crops are the same on
both paths (drawn up front, picked by a step counter on the device); what can
differ is rounding: the order of kernels' reductions, and on CUDA the
learning rate, a float32 tensor on the graph path (the fused kernel reads a
float) where the eager path passes a double.
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch

from clipstyle.config import Settings
from clipstyle.evaluation.bench import PROMPT, bench_images, bench_models
from clipstyle.method.loop import stylize_many
from clipstyle.prompts import NO_TEMPLATES


def run(models, settings, content):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = stylize_many([content], [PROMPT], [7], models=models, settings=settings)[0]
    if result.error is not None:
        raise result.error
    return result, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--crops", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    device = torch.device(args.device)
    models = bench_models(device)
    content = bench_images(args.size)[0]
    rows = []
    for precision in ("fp32", "auto"):
        settings = Settings(
            size=args.size,
            crops=args.crops,
            steps=args.steps,
            log_every=args.steps,
            templates=NO_TEMPLATES,
            precision=precision,
        )
        eager, _ = run(models, settings, content)
        graph, warned = run(models, settings.replace(cuda_graph=True), content)
        again, _ = run(models, settings.replace(cuda_graph=True), content)
        rows.append(
            {
                "precision": f"--precision {precision} ({eager.precision})",
                "recorded": not warned,
                "warnings": warned,
                "image_max_abs_diff": float((eager.tensor - graph.tensor).abs().max()),
                "image_identical": bool(torch.equal(eager.tensor, graph.tensor)),
                "loss_max_rel_diff": max(
                    abs(eager.losses[k] - graph.losses[k]) / max(abs(eager.losses[k]), 1e-12) for k in eager.losses
                ),
                "graph_repeats_exactly": bool(torch.equal(graph.tensor, again.tensor)),
            }
        )
    for r in rows:
        print(
            f"graph vs eager, {r['precision']}, {args.size} px, {args.crops} crops, {args.steps} steps: "
            f"{'recorded' if r['recorded'] else 'NOT recorded (' + '; '.join(r['warnings']) + ')'}; "
            f"image max |diff| {r['image_max_abs_diff']:.2e}{' (identical)' if r['image_identical'] else ''}, "
            f"losses max rel diff {r['loss_max_rel_diff']:.2e}; "
            f"a second graph run {'repeats it exactly' if r['graph_repeats_exactly'] else 'DIFFERS'}"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh)


if __name__ == "__main__":
    main()
