"""Match strength: what a HAT score means for a person, measured against the gallery's own score distribution.

HAT scores have no fixed scale (they depend on the model, its levels and the gallery), so a raw ``0.21`` says
nothing by itself. Two references, in order of preference:

* ``gallery_pairs`` (the index has captions of its images): when a version is written, the builder scores
  ``PAIR_CAPTIONS`` captions of the gallery (seeded sample) against their own image (true pairs) and against
  ``POOL_IMAGES`` random other images (random pairs) through the re-ranker's own path on the stored features,
  and stores the quantiles in the manifest's ``strength``. A result's ``percentile`` is the share of random
  pairs scoring below it; ``match_percentile`` the share of true pairs below it. Labels: ``strong`` at or
  above the true pairs' lower quartile (and above 99% of random pairs): it scores like a real caption of its
  image; ``good`` above 99% of random pairs: clearly better than chance; ``weak`` otherwise: a random
  gallery pair scores this high more than 1% of the time.
* ``query_sample`` (no captions to calibrate with, or an index written before calibration): each query is also
  scored against a fixed seeded sample of ``SAMPLE_SIZE`` gallery items (images for a text query, captions for
  an image query); ``percentile`` is the share of the sample scoring below the result. With no true pairs there
  is no absolute reference: the label is ``good`` above the whole sample, else ``weak``, never ``strong``; the
  best result of a query that matches nothing in the gallery can still be ``good``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from .reader import GalleryIndex

logger = logging.getLogger(__name__)
PAIR_CAPTIONS = 256  # captions sampled for the true and random pairs
POOL_IMAGES = 16  # random images each sampled caption is scored against
MATCH_BLOCK = 8  # captions scored together against their own images
MIN_CAPTIONS = 20  # fewer captions of images than this: no calibration (query_sample)
SAMPLE_SIZE = 64  # query_sample: the fixed sample each query is also scored against
RANDOM_LEVELS = np.linspace(0.0, 100.0, 201)  # quantile levels stored for random pairs (every 0.5%)
MATCH_LEVELS = np.linspace(0.0, 100.0, 21)  # and for true pairs (every 5%)
GOOD_LEVEL = 99.0  # above this share of random pairs: better than chance
STRONG_LEVEL = 25.0  # at or above this share of true pairs (and good): scores like a true pair


def calibrate(index: GalleryIndex, seed: int = 0) -> dict[str, Any] | None:
    """The ``strength`` entry of ``index``'s manifest (see the module docstring), or None when the gallery has
    fewer than ``MIN_CAPTIONS`` captions of at least two images."""
    owner = index.filters.caption_image
    linked = np.flatnonzero(owner >= 0)
    if len(linked) < MIN_CAPTIONS or index.num_images < 2:
        return None
    rng = np.random.default_rng(seed)
    captions = np.sort(rng.choice(linked, min(PAIR_CAPTIONS, len(linked)), replace=False))
    pool = np.sort(rng.choice(index.num_images, min(POOL_IMAGES + 1, index.num_images), replace=False))
    matched: list[float] = []
    with torch.inference_mode():
        texts, lengths = _caption_batch(index, captions)
        # Random pairs: every sampled caption against the pool, its own image left out.
        scores = index.image_level_scores(texts, lengths, pool).sum(dim=2).numpy()  # [P, C]
        others = pool[:, None] != owner[captions][None, :]
        random = np.concatenate([scores[others[:, j], j][:POOL_IMAGES] for j in range(len(captions))])
        # True pairs: each caption against its own image, MATCH_BLOCK captions against their images at a time
        # (fewer, larger products: at small model sizes the per-call cost dominates).
        for start in range(0, len(captions), MATCH_BLOCK):
            block = slice(start, start + MATCH_BLOCK)
            own, where = np.unique(owner[captions[block]], return_inverse=True)
            scores = index.image_level_scores([t[block] for t in texts], lengths[block], own).sum(dim=2)
            matched.extend(scores[where, np.arange(len(where))].tolist())
    random_q = np.percentile(random, RANDOM_LEVELS)
    matched_q = np.percentile(matched, MATCH_LEVELS)
    good = float(random_q[int(np.searchsorted(RANDOM_LEVELS, GOOD_LEVEL))])
    strong = max(good, float(np.percentile(matched, STRONG_LEVEL)))
    return {
        "method": "gallery_pairs",
        "true_pairs": len(matched),
        "random_pairs": len(random),
        "seed": seed,
        "thresholds": {"strong": round(strong, 6), "good": round(good, 6)},
        "random_quantiles": [round(float(v), 6) for v in random_q],
        "match_quantiles": [round(float(v), 6) for v in matched_q],
    }


def _caption_batch(index: GalleryIndex, rows: np.ndarray) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Stored token features of caption ``rows``: per level ``[C, L, D]`` (zero padded) and lengths ``[C]``."""
    tokens = [index.caption_tokens(int(row)) for row in rows]
    lengths = torch.tensor([n for _, n in tokens])
    texts = []
    for level in range(len(tokens[0][0])):
        padded = torch.zeros(len(rows), int(lengths.max()), tokens[0][0][level].shape[-1])
        for j, (levels, n) in enumerate(tokens):
            padded[j, :n] = levels[level][0]
        texts.append(padded)
    return texts, lengths


class StrengthScale:
    """Rates scores of one index (a version, or one shard's): :meth:`rate`. ``reference_rows(kind)`` is not
    None when each query must also be scored against those rows (``query_sample``)."""

    def __init__(self, calibration: dict[str, Any] | None, num_images: int, num_captions: int) -> None:
        self.calibration = calibration if calibration and calibration.get("method") == "gallery_pairs" else None
        self.method = "gallery_pairs" if self.calibration else "query_sample"
        rng = np.random.default_rng(0)
        self._samples = {
            kind: np.sort(rng.choice(n, min(SAMPLE_SIZE, n), replace=False)) if n else np.zeros(0, np.int64)
            for kind, n in (("images", num_images), ("captions", num_captions))
        }

    def reference_rows(self, kind: str) -> np.ndarray | None:
        """The rows each query of ``kind`` is also scored against (``query_sample``), else None."""
        return None if self.calibration else self._samples[kind]

    def rate(self, scores: np.ndarray, reference: np.ndarray | None = None) -> list[dict[str, Any]]:
        """``{"percentile", "match_percentile", "label", "method"}`` for each HAT score; ``reference``: the
        query's scores against ``reference_rows`` (``query_sample`` only)."""
        scores = np.asarray(scores, dtype=np.float64)
        if self.calibration:
            cal = self.calibration
            percentile = np.interp(scores, cal["random_quantiles"], RANDOM_LEVELS)
            matched = np.interp(scores, cal["match_quantiles"], MATCH_LEVELS)
            strong, good = cal["thresholds"]["strong"], cal["thresholds"]["good"]
            labels = np.where(scores >= strong, "strong", np.where(scores > good, "good", "weak"))
        else:
            ref = np.sort(np.asarray(reference if reference is not None else [], dtype=np.float64))
            below = np.searchsorted(ref, scores, side="left") if len(ref) else np.zeros(len(scores))
            percentile = 100.0 * below / max(len(ref), 1)
            matched = [None] * len(scores)
            labels = np.where((below == len(ref)) & (len(ref) > 0), "good", "weak")
        return [
            {
                "percentile": round(float(p), 2),
                "match_percentile": None if m is None else round(float(m), 2),
                "label": str(label),
                "method": self.method,
            }
            for p, m, label in zip(percentile, matched, labels, strict=True)
        ]


def add_strength(version_dir: Path) -> None:
    """Calibrate the version being written in ``version_dir`` (its files and manifest complete, not yet
    published) and add ``strength`` (None without enough captions) and its time to its manifest."""
    from .layout import write_json
    from .reader import GalleryIndex

    started = time.perf_counter()
    index = GalleryIndex(version_dir)
    try:
        unrotated = all(seg.info["store_kinds"]["caption"] not in ("pca", "pq") for seg in index.segments)
        strength = calibrate(index) if unrotated else None
    finally:
        index.close()
    manifest = dict(index.manifest, strength=strength)
    manifest.setdefault("timings", {})["strength_s"] = round(time.perf_counter() - started, 3)
    write_json(version_dir / "manifest.json", manifest)
