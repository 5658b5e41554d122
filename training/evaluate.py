"""Retrieval evaluation: R@1/5/10 image->text and text->image, RSUM, per level, level sum and global vectors.

    python -m training.evaluate --model PATH --dataset DIR/dataset.json --images DIR/images --split test \\
        [--protocol auto|1k|5fold|all] [--json OUT]

Scores are exhaustive: every image against every caption with the model's scorer (direction as configured).
Variants: ``hat`` (the three-level sum, the paper's test-time score), ``level1..3`` (one level alone) and
``global`` (cosine of the first-stage vectors). Protocols: ``1k`` / ``all`` score the whole split as one
gallery (Flickr30K's 1K test, MSCOCO 5K); ``5fold`` averages five folds of 1,000 images (MSCOCO 1K);
``auto`` picks ``5fold`` and ``all`` for a 5,000-image split and ``all`` otherwise.

Ties are counted against the model: the rank of the ground truth is the number of wrong candidates scoring
at least as high, so a constant scorer gets R@1 = 0 rather than a lucky sort order.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from model import CommandParser
from model.alignment import scan
from model.errors import HATError

from .data import EvalTransform, ImageDataset, caption_table, read_karpathy

logger = logging.getLogger(__name__)
KS = (1, 5, 10)


@dataclass
class Encoded:
    """A split encoded once: per-level features, first-stage vectors and the caption -> image map."""

    image_levels: list[torch.Tensor]  # per level [N, R_l, D]
    text_levels: list[torch.Tensor]  # per level [M, L, D]
    lengths: torch.Tensor  # [M]
    image_global: torch.Tensor  # [N, G]
    text_global: torch.Tensor  # [M, G]
    owner: torch.Tensor  # [M] image index of each caption


def ranks_i2t(scores: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """For each image (row of ``scores [N, M]``), how many wrong captions score >= its best true caption."""
    n = scores.shape[0]
    truth = owner[None, :] == torch.arange(n, device=scores.device)[:, None]  # [N, M]
    best = scores.masked_fill(~truth, float("-inf")).max(dim=1).values
    return ((scores >= best[:, None]) & ~truth).sum(dim=1)


def ranks_t2i(scores: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """For each caption (column), how many wrong images score >= its own image."""
    own = scores.gather(0, owner[None, :]).squeeze(0)  # [M]
    wrong = torch.ones_like(scores, dtype=torch.bool).scatter_(0, owner[None, :], False)
    return ((scores >= own[None, :]) & wrong).sum(dim=0)


def recalls(scores: torch.Tensor, owner: torch.Tensor) -> dict:
    """``{"i2t": {"r1","r5","r10"}, "t2i": {...}, "rsum"}`` in percent for ``scores [N_images, N_captions]``."""
    scores, owner = scores.float().cpu(), owner.cpu()
    out: dict = {}
    for name, ranks in (("i2t", ranks_i2t(scores, owner)), ("t2i", ranks_t2i(scores, owner))):
        out[name] = {f"r{k}": round(100.0 * (ranks < k).float().mean().item(), 2) for k in KS}
    out["rsum"] = round(sum(out["i2t"].values()) + sum(out["t2i"].values()), 2)
    return out


@torch.inference_mode()
def encode_split(
    model, entries, *, batch_size: int = 64, workers: int = 0, text_cache=None, global_head: bool = True
) -> Encoded:
    """Encode every image (eval transform) and caption of ``entries`` with ``model``.

    ``text_cache`` (a ``training.train.TextCache`` of these captions) replaces running a frozen text encoder.
    ``global_head=False`` makes the first-stage vectors the head-less fallback (the authors' checkpoints').
    """
    device = model.device
    loader = DataLoader(
        ImageDataset(entries, EvalTransform(model.config.image.image_size)),
        batch_size=batch_size,
        num_workers=workers,
    )
    image_parts: list[list[torch.Tensor]] = []
    for pixels, _ in loader:
        image_parts.append([x.float().cpu() for x in model.encode_images(pixels.to(device))])
    image_levels = [torch.cat(level) for level in zip(*image_parts, strict=True)]
    texts, owner = caption_table(entries)
    if text_cache is not None:
        text_levels, lengths = text_cache.project(model, torch.arange(len(texts)))
        text_levels, lengths = [x.float().cpu() for x in text_levels], lengths.cpu()
    else:
        text_levels, lengths = _encode_captions(model, texts, len(image_levels))
    return Encoded(
        image_levels,
        text_levels,
        lengths,
        model.global_images(image_levels, global_head).cpu(),
        model.global_texts(text_levels, lengths, global_head).cpu(),
        owner,
    )


def _encode_captions(model, texts: list[str], num_levels: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Captions through the text encoder in batches of 256 -> per level ``[M, L, D]`` (CPU), lengths ``[M]``."""
    text_parts, length_parts = [], []
    for start in range(0, len(texts), 256):
        levels, lengths = model.encode_text_strings(texts[start : start + 256])
        text_parts.append([x.float().cpu() for x in levels])
        length_parts.append(lengths.cpu())
    width = max(p[0].shape[1] for p in text_parts)
    text_levels = [
        torch.cat([torch.nn.functional.pad(p[i], (0, 0, 0, width - p[i].shape[1])) for p in text_parts])
        for i in range(num_levels)
    ]
    return text_levels, torch.cat(length_parts)


VARIANTS = ("hat", "level1", "level2", "level3", "global")


def score_variants(
    model, enc: Encoded, images: slice | None = None, variants: tuple[str, ...] = VARIANTS
) -> dict[str, torch.Tensor]:
    """Exhaustive score matrices ``[N, M]`` for the requested variants, over the images in ``images``."""
    images = images or slice(None)
    keep = torch.zeros(enc.image_global.shape[0], dtype=torch.bool)
    keep[images] = True
    cols = keep[enc.owner].nonzero().squeeze(1)
    cfg = model.config
    out: dict[str, torch.Tensor] = {}
    if any(v == "hat" or v.startswith("level") for v in variants):
        total = None
        for level, (img, txt) in enumerate(zip(enc.image_levels, enc.text_levels, strict=True)):
            score = scan(img[images], txt[cols], enc.lengths[cols], cfg.lambda_softmax, cfg.direction)
            out[f"level{level + 1}"] = score
            total = score if total is None else total + score
        out["hat"] = total
    if "global" in variants:
        out["global"] = enc.image_global[images] @ enc.text_global[cols].T
    return {k: v for k, v in out.items() if k in variants}


@torch.inference_mode()
def evaluate_encoded(model, enc: Encoded, protocol: str = "all", variants: tuple[str, ...] = VARIANTS) -> dict:
    """``{variant: recalls}`` for one protocol (``all``/``1k`` one gallery, ``5fold`` mean of 5 x 1,000)."""
    n = enc.image_global.shape[0]
    if protocol in ("all", "1k"):
        blocks = [slice(0, n)]
    elif protocol == "5fold":
        if n < 5000:
            raise HATError(f"the 5-fold 1K protocol needs 5,000 images, the split has {n}")
        blocks = [slice(1000 * f, 1000 * (f + 1)) for f in range(5)]
    else:
        raise HATError(f"unknown protocol {protocol!r}")
    per_block = []
    for block in blocks:
        start = block.start
        owner = enc.owner[(enc.owner >= start) & (enc.owner < block.stop)] - start
        per_block.append({k: recalls(v, owner) for k, v in score_variants(model, enc, block, variants).items()})
    return _mean(per_block)


def _mean(results: list[dict]) -> dict:
    if len(results) == 1:
        return results[0]
    out = {}
    for variant in results[0]:
        entry = {
            d: {k: round(sum(r[variant][d][k] for r in results) / len(results), 2) for k in results[0][variant][d]}
            for d in ("i2t", "t2i")
        }
        entry["rsum"] = round(sum(entry["i2t"].values()) + sum(entry["t2i"].values()), 2)
        out[variant] = entry
    return out


def format_table(results: dict, title: str = "") -> str:
    lines = [title] if title else []
    lines.append(
        f"{'variant':<8} | {'i2t R@1':>7} {'R@5':>6} {'R@10':>6} | {'t2i R@1':>7} {'R@5':>6} {'R@10':>6} | {'RSUM':>7}"
    )
    for name in ("hat", "level1", "level2", "level3", "global"):
        if name in results:
            r = results[name]
            lines.append(
                f"{name:<8} | {r['i2t']['r1']:7.2f} {r['i2t']['r5']:6.2f} {r['i2t']['r10']:6.2f} |"
                f" {r['t2i']['r1']:7.2f} {r['t2i']['r5']:6.2f} {r['t2i']['r10']:6.2f} | {r['rsum']:7.2f}"
            )
    return "\n".join(lines)


EXAMPLES = (
    "python -m training.evaluate --model models/demo --dataset data/world/dataset.json --images data/world/images \\\n"
    "    --split test --json runs/demo/test.json",
    "python -m training.evaluate --model hat_coco.ckpt --dataset dataset_coco.json --images coco --protocol 5fold \\\n"
    "    --global-fallback    # an authors' checkpoint: no trained global head",
)


def build_parser() -> CommandParser:
    """The command line of ``python -m training.evaluate``."""
    parser = CommandParser(prog="python -m training.evaluate", description=__doc__, examples=EXAMPLES)
    parser.add_argument("--model", required=True, help="an authors' .ckpt or a project model directory")
    parser.add_argument("--dataset", required=True, type=Path, help="Karpathy-format dataset JSON")
    parser.add_argument("--images", required=True, type=Path, help="folder holding the dataset's image files")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"], help="the split to score")
    parser.add_argument(
        "--protocol", default="auto", choices=["auto", "1k", "5fold", "all"],
        help="1k/all: the split as one gallery; 5fold: mean of five 1,000-image folds; auto: 5fold and all for a "
        "5,000-image split, else all",
    )  # fmt: skip
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N images (0 = all)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=64, help="images or captions encoded per batch")
    parser.add_argument("--workers", type=int, default=0, help="image-decoding worker processes (0 = this one)")
    parser.add_argument(
        "--json", type=Path, help="write {variant: {i2t, t2i, rsum}} here; another protocol goes beside it as "
        "OUT-stem.PROTOCOL.json (default: print the table only)",
    )  # fmt: skip
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}"
    )
    parser.add_argument(
        "--global-fallback",
        action="store_true",
        help="score 'global' with the head-less fallback (mean-pooled last level), as for the authors' checkpoints",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    from model.checkpoint import load_model

    parser = build_parser()
    args = parser.parse_args(argv)
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        model = load_model(args.model, args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        entries = read_karpathy(args.dataset, args.images, args.split)
        if args.limit:
            entries = entries[: args.limit]
        enc = encode_split(
            model, entries, batch_size=args.batch_size, workers=args.workers, global_head=not args.global_fallback
        )
        protocols = [args.protocol]
        if args.protocol == "auto":
            protocols = ["5fold", "all"] if len(entries) == 5000 else ["all"]
        results = {p: evaluate_encoded(model, enc, p, variants) for p in protocols}
    except (HATError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for protocol, res in results.items():
        print(format_table(res, f"{args.split} split, {len(entries)} images, protocol {protocol}"))
    if args.json:
        # OUT holds the first protocol's {variant: ...}; others go beside it as OUT-stem.<protocol>.json.
        for index, protocol in enumerate(protocols):
            path = args.json if index == 0 else args.json.with_name(f"{args.json.stem}.{protocol}.json")
            path.write_text(json.dumps(results[protocol], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
