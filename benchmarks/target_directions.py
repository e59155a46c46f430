"""Cosines behind the choice of a style image direction's source (docs/method-extensions.md).

A style image S's direction can start from (a) the source text's embedding,
(b) the content image's whole-image embedding (the loss's own source), or
(c) the content's crops, drawn as S's crops are. For each, over every
(content, style image) pair of the example images, it prints:

- shared: the mean cosine between the directions that two different style
  images give for one content image. Near 1, the direction says little about
  the style (it points across a gap every style image crosses);
- reach: the mean cosine between the target direction and the patch
  directions of an output that would look exactly like the style image
  (crops of S against the content, as the patch loss measures them), i.e. how
  close to the target the loss can get;
- start: the same for an output that is still the photo (crops of the
  content against the content), where the optimisation starts; the patch
  loss tells style from no style only as far as reach exceeds start (and a
  start above 1 - threshold = 0.3 means every patch is rejected at once);
- and the cone figures: mean cosine image-image, text-text, image-text.

Random weights of the real ViT-B/32 architecture unless --clip-weights names a
file (no download): the cone effect that separates CLIP's two modalities is
present at initialisation already (Liang et al., NeurIPS 2022), the semantic
agreement of trained weights is not.

    PYTHONPATH=src python benchmarks/target_directions.py [--clip-weights ViT-B-32.pt]
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
import torch.nn.functional as F

from clipstyle.config import Settings
from clipstyle.images import open_image, prepare_content
from clipstyle.method import targets as T
from clipstyle.method.augment import crop_grids, draw_crops, sample_crops
from clipstyle.method.text import text_embedding
from clipstyle.models.loading import load_models

parser = argparse.ArgumentParser()
parser.add_argument("--clip-weights", default=None)
parser.add_argument("--size", type=int, default=256)
args = parser.parse_args()

torch.manual_seed(0)
models = load_models(device=torch.device("cpu"), random_init=args.clip_weights is None, clip_weights=args.clip_weights)
settings = Settings(size=args.size, crop_size=args.size // 4)
folder = Path(__file__).resolve().parent.parent / "examples" / "images"
names = sorted(p.name for p in folder.glob("*.jpg"))
images = {n: prepare_content(open_image(folder / n).image, settings.size) for n in names}
prompts = ["starry night by Vincent van Gogh", "watercolor painting", "mosaic"]


def cos(a, b) -> float:
    return float(F.cosine_similarity(a, b, dim=-1).mean())


with torch.no_grad():
    whole = {
        n: F.normalize(models.clip.encode_image(models.clip.resize(x)).float(), dim=-1)[0] for n, x in images.items()
    }
    crops = {n: T.crops_embedding(models, x, settings) for n, x in images.items()}
    source = text_embedding(models, settings.source, settings.templates)
    texts = {p: text_embedding(models, p, settings.templates) for p in prompts}

    def patch_dirs(style: str, content: str):
        x = images[style]
        h, w = x.shape[-2:]
        draw = draw_crops(h, w, 32, settings.crop_size, settings.distortion, torch.Generator().manual_seed(5))
        emb = F.normalize(models.clip.encode_image(sample_crops(x, crop_grids(draw, h, w, 224))).float(), dim=-1)
        return F.normalize(emb - whole[content], dim=-1)

    img = list(whole.values()) + list(crops.values())
    txt = [source, *texts.values()]
    print(f"weights: {'random (ViT-B/32 architecture)' if args.clip_weights is None else args.clip_weights}")
    ii = [cos(a, b) for a, b in itertools.combinations(img, 2)]
    tt = [cos(a, b) for a, b in itertools.combinations(txt, 2)]
    it = [cos(a, b) for a in img for b in txt]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    print(f"cone: image-image {mean(ii):.3f}, text-text {mean(tt):.3f}, image-text {mean(it):.3f}")

    sources = {
        "(a) source text": lambda c: source,
        "(b) content, whole": lambda c: whole[c],
        "(c) content, crops": lambda c: crops[c],
    }
    for label, start in sources.items():
        shared, reach, start_, to_text = [], [], [], []
        for c in names:
            dirs = {s: F.normalize(crops[s] - start(c), dim=-1) for s in names if s != c}
            shared += [cos(a, b) for a, b in itertools.combinations(dirs.values(), 2)]
            reach += [cos(patch_dirs(s, c), d) for s, d in dirs.items()]
            start_ += [cos(patch_dirs(c, c), d) for d in dirs.values()]
            to_text += [cos(d, F.normalize(t - source, dim=-1)) for d in dirs.values() for t in texts.values()]
        print(
            f"{label:20s} shared {mean(shared):.3f}  reach {mean(reach):.3f}  start {mean(start_):.3f}"
            f"  cos to text directions {mean(to_text):+.3f}"
        )
