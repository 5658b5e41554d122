"""How far the feature store could shrink by coding neighbouring tokens together (a study, not a store).

    python benchmarks/store_study.py spatial [--model models/demo] [--split test]

The ``pq`` store codes each image token on its own, in the principal axes of the features whitened by the
captions' second moment (index_format/store.py). Neighbouring tokens of one image are correlated, which a
per-token code cannot use. This estimates what coding each 2x2 block of tokens jointly would save, with the
Gaussian rate-distortion model (reverse water-filling over the components' variances): per level, the
distortion at 0.75, 1 and 1.5 bits per dimension when each token is coded alone (the per-axis variances) against
a joint transform of the block (its 4·D-dimensional covariance's eigenvalues; and the separable 2x2 Haar
transform per axis, which needs no learned basis). The gain is in dB of the score-metric error (6.02 dB is one bit
per dimension). Eigenvalues estimated from few blocks (level 3 of the demo: one block an image) flatter the
joint transform: read its level-3 figure as an upper bound.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def distortion(variances: np.ndarray, bits: float) -> float:
    """Reverse water-filling: the least total squared error of independent Gaussian components with these
    variances coded in ``bits`` bits in all."""
    v = np.maximum(np.asarray(variances, np.float64), 1e-30)
    lo, hi = 1e-30, float(v.max())
    for _ in range(200):  # bisection on the water level (geometric: the levels span many decades)
        level = (lo * hi) ** 0.5
        if np.maximum(0.0, 0.5 * np.log2(v / level)).sum() > bits:
            lo = level
        else:
            hi = level
    return float(np.minimum(hi, v).sum())


HAAR = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], np.float64) / 2.0  # orthonormal


def spatial(args) -> None:
    from index_format.store import whitened_axes
    from model import load_model
    from training.data import read_karpathy
    from training.evaluate import encode_split

    model = load_model(args.model)
    entries = read_karpathy(args.dataset, args.images, args.split)
    with torch.inference_mode():
        enc = encode_split(model, entries)
    print(f"{args.model}: {len(entries)} images of the {args.split} split")
    for level, (images, texts) in enumerate(zip(enc.image_levels, enc.text_levels, strict=True), start=1):
        n, tokens, dim = images.shape
        side = round(tokens**0.5)
        if side * side != tokens or side % 2:
            print(f"level {level}: {tokens} tokens, not an even square grid: skipped")
            continue
        words = torch.cat([texts[i, : int(enc.lengths[i])] for i in range(len(texts))]).numpy()
        axes = whitened_axes(images.reshape(-1, dim).numpy(), words)
        z = (images.reshape(-1, dim).numpy().astype(np.float64) - axes.centre) @ axes.basis.T  # [n * tokens, D]
        blocks = z.reshape(n, side // 2, 2, side // 2, 2, dim).transpose(0, 1, 3, 2, 4, 5).reshape(-1, 4, dim)
        alone = np.tile(z.var(0), 4)  # a block's 4 tokens coded each on its own
        joint = np.linalg.eigvalsh(np.cov(blocks.reshape(len(blocks), -1).T))
        haar = np.einsum("ij,njd->nid", HAAR, blocks).var(0)  # [4, D]
        share = haar.sum(1) / haar.sum()
        for bits in args.bits:
            budget = bits * 4 * dim
            d0, d1, d2 = (distortion(v, budget) for v in (alone, joint, haar.ravel()))
            print(f"level {level} ({tokens} tokens, {len(blocks)} blocks) {bits:4g} bits/dim: "
                  f"joint 2x2 transform {10 * np.log10(d0 / d1):5.2f} dB, Haar {10 * np.log10(d0 / d2):5.2f} dB")
        print(f"level {level}: Haar energy shares (mean, horizontal, vertical, diagonal) {np.round(share, 3).tolist()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("spatial", help="gain of coding 2x2 blocks of tokens jointly (Gaussian model)")
    p.add_argument("--model", default=str(REPO / "models" / "demo"))
    p.add_argument("--dataset", default=str(REPO / "data/world/dataset.json"))
    p.add_argument("--images", default=str(REPO / "data/world/images"))
    p.add_argument("--split", default="test")
    p.add_argument("--bits", type=lambda v: [float(x) for x in v.split(",")], default=[0.75, 1.0, 1.5])
    args = parser.parse_args(argv)
    {"spatial": spatial}[args.what](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
