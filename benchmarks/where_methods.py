"""Which dense CLIP map finds a planted region: IoU per method, noise level and window count.

Runs on the hand-made CLIP of tests/planted.py (no weights needed):

    PYTHONPATH=src:tests python benchmarks/where_methods.py
"""

from __future__ import annotations

import torch

from clipstyle.config import WhereSettings
from clipstyle.regions.where import phrase_embeddings, relevance, where_mask
from planted import PlantedClip, iou, scene

torch.set_num_threads(1)
clip = PlantedClip()
print("method     noise windows  IoU(map)  IoU(mask)")
for noise in (0.0, 0.1, 0.2):
    image, truth = scene(seed=1)
    image = (image + noise * torch.randn(image.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    for method in ("clearclip", "maskclip", "vanilla"):
        for windows in (1, 3):
            s = WhereSettings(method=method, windows=windows, stride=0.5 if windows > 1 else 1.0)
            prob = relevance(clip, image, phrase_embeddings(clip, "red", s), s)
            mask = where_mask(clip, image, "red", s)
            print(f"{method:10s} {noise:5.1f} {windows:7d}  {iou(prob, truth):8.3f}  {iou(mask, truth):9.3f}")
