"""Convert the authors' Lightning ``.ckpt`` into the project's model format (``config.json``,
``model.safetensors``, ``vocab.txt``: no pickle, loads faster). Also ``hat-convert``.

    python -m model.convert CHECKPOINT.ckpt OUT_DIR [--dtype float32|float16|bfloat16] [--allow-unsafe-pickle]
"""

from __future__ import annotations

import argparse
import sys

from .checkpoint import load_model, save_model
from .cli import CommandParser
from .errors import HATError

EXAMPLES = (
    "python -m model.convert hat_f30k.ckpt models/hat-f30k --dtype float16",
    "python -m model.convert runs/demo/best models/demo --dtype float16    # re-save a trained model in half precision",
)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m model.convert`` (and ``hat-convert``)."""
    parser = CommandParser(prog="python -m model.convert", description=__doc__, examples=EXAMPLES)
    parser.add_argument("checkpoint", help="the authors' .ckpt file (or a saved model directory)")
    parser.add_argument("out", help="output directory in the project's format (replaced atomically)")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
        help="precision of the saved weights (float16/bfloat16 halve the file)",
    )  # fmt: skip
    parser.add_argument("--text-heads", type=int, default=None, help="BERT heads (default: hidden size / 64)")
    parser.add_argument(
        "--allow-unsafe-pickle",
        action="store_true",
        help="allow full unpickling of a checkpoint you trust (can run arbitrary code)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model = load_model(args.checkpoint, allow_unsafe_pickle=args.allow_unsafe_pickle, text_heads=args.text_heads)
        out = save_model(model, args.out, dtype=args.dtype)
    except (HATError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg = model.config
    print(
        f"saved {out} ({args.dtype}): Swin embed {cfg.image.embed_dim} depths {list(cfg.image.depths)}, "
        f"text {cfg.text.num_hidden_layers} layers x {cfg.text.hidden_size}, D={cfg.embed_dim}, "
        f"levels {list(cfg.image_stages)}/{list(cfg.text_layers)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
