"""Mask quality of --where with real CLIP weights, on PASCAL VOC 2012 val (needs the data and weights).

For every image and every object class in its ground truth, the mask of
--where "<class name>" is compared with that class's pixels (VOC's "void"
border pixels are left out): the IoU per class, averaged over images, then
the mean over the 20 classes. This is a binary, one-phrase-at-a-time protocol
(what --where does), not the zero-shot semantic segmentation protocol of the
ClearCLIP paper (an argmax over all 20 classes), so the numbers are not
directly comparable with its mIoU.

    PYTHONPATH=src python benchmarks/where_voc.py VOCdevkit/VOC2012 --clip-weights ViT-B-32.pt --limit 300
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipstyle.config import WhereSettings
from clipstyle.device import resolve_device
from clipstyle.images import to_tensor
from clipstyle.models.loading import load_clip
from clipstyle.regions.where import where_mask

CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dining table",
           "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv monitor"]

parser = argparse.ArgumentParser()
parser.add_argument("voc", type=Path, help="the VOC2012 folder (JPEGImages, SegmentationClass, ImageSets)")
parser.add_argument("--clip-model", default="ViT-B-32")
parser.add_argument("--clip-pretrained", default="openai")
parser.add_argument("--clip-weights", default=None)
parser.add_argument("--method", default=WhereSettings().method, choices=["clearclip", "maskclip", "vanilla"])
parser.add_argument("--windows", type=int, default=WhereSettings().windows)
parser.add_argument("--device", default="auto")
parser.add_argument("--limit", type=int, default=0, help="first N validation images (0: all 1449)")
args = parser.parse_args()

clip = load_clip(args.clip_model, args.clip_pretrained, args.clip_weights, resolve_device(args.device))
settings = WhereSettings(method=args.method, windows=args.windows)
names = (args.voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
names = names[: args.limit] if args.limit else names
per_class = defaultdict(list)
for i, name in enumerate(names):
    photo = Image.open(args.voc / "JPEGImages" / f"{name}.jpg").convert("RGB")
    labels = np.asarray(Image.open(args.voc / "SegmentationClass" / f"{name}.png"))
    valid = labels != 255
    for c in sorted(set(np.unique(labels)) - {0, 255}):
        mask = where_mask(clip, to_tensor(photo), CLASSES[c - 1], settings)[0, 0].numpy() > 0.5
        truth = labels == c
        inter, union = (mask & truth & valid).sum(), ((mask | truth) & valid).sum()
        per_class[CLASSES[c - 1]].append(inter / max(union, 1))
    if (i + 1) % 50 == 0:
        print(f"{i + 1}/{len(names)} images", flush=True)
means = {c: statistics.mean(v) for c, v in per_class.items()}
for c in CLASSES:
    if c in means:
        print(f"{c:14s} {means[c]:.3f}  ({len(per_class[c])} images)")
print(f"mean IoU over {len(means)} classes: {statistics.mean(means.values()):.3f}  "
      f"({args.clip_model}, {args.method}, {args.windows} windows, torch {torch.__version__})")
