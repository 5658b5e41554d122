"""Warm-up of an image encoder trained from scratch: predict the words and word pairs of an image's captions.

A Swin trained from scratch learns slowly from a contrastive signal alone: in a batch of random scenes the
easiest cue (colour, for the generated world) already separates the pairs, so shapes and bindings get little
gradient. Before HAT's losses, the demo recipe therefore trains the image encoder for a few epochs to predict,
for each image, which unigrams and bigrams occur in any of its captions (multi-label, binary cross-entropy on
the mean-pooled last level, optionally on shallower levels too) -- the "visual n-grams" objective. It needs
only the captions, not labels, and costs under half a HAT step per image (no cross attention). The prediction
heads are thrown away afterwards.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)
_WORD = re.compile(r"[a-z]+")


def caption_ngrams(caption: str) -> set[str]:
    """The lower-cased unigrams and adjacent bigrams of a caption."""
    words = _WORD.findall(caption.lower())
    return set(words) | {f"{a} {b}" for a, b in pairwise(words)}


def ngram_targets(
    captions_per_image: list[list[str]], max_vocab: int = 2000, min_images: int = 10, max_fraction: float = 0.5
) -> tuple[list[str], torch.Tensor]:
    """The n-gram vocabulary and each image's multi-hot target ``[N, V]`` (float32).

    The vocabulary keeps the ``max_vocab`` most frequent n-grams (by images) that occur in at least
    ``min_images`` images and in at most ``max_fraction`` of them (function words say nothing about one image).
    """
    per_image = [set().union(*(caption_ngrams(c) for c in captions)) for captions in captions_per_image]
    counts = Counter(gram for grams in per_image for gram in grams)
    limit = max_fraction * len(per_image)
    ranked = sorted((g for g, n in counts.items() if min_images <= n <= limit), key=lambda g: (-counts[g], g))
    vocab = ranked[:max_vocab]
    slot = {g: i for i, g in enumerate(vocab)}
    targets = torch.zeros(len(per_image), len(vocab))
    for row, grams in enumerate(per_image):
        targets[row, [slot[g] for g in grams if g in slot]] = 1.0
    return vocab, targets


def pretrain_image_encoder(
    model, batches_per_epoch, targets: torch.Tensor, epochs: int, lr: float, autocast, levels: int = 1
) -> list:
    """Train ``model.image_encoder`` on the n-gram targets; ``batches_per_epoch(k)`` yields ``(pixels, index)``.

    ``levels`` is how many of the encoder's levels, counted from the last, get a head of their own (on their
    mean-pooled tokens); the loss is the sum of their cross-entropies, so the last level's gradient is the
    same for any ``levels``. HAT matches the tokens of every level, so the shallower ones need features worth
    matching too. Returns one record per epoch: mean loss, seconds, images/s and the training micro-F1 of the
    last level's predictions at threshold 0.5.
    """
    encoder = model.image_encoder
    widths = [norm.normalized_shape[0] for norm in encoder.level_norms]
    if not 1 <= levels <= len(widths):
        raise ValueError(f"levels must lie in [1, {len(widths)}], got {levels}")
    heads = nn.ModuleList(nn.Linear(width, targets.shape[1]) for width in widths[-levels:]).to(model.device)
    optimizer = torch.optim.Adam([*encoder.parameters(), *heads.parameters()], lr=lr)
    records = []
    encoder.train()
    for epoch in range(epochs):
        started, losses, seen = time.perf_counter(), [], 0
        hits = predicted = actual = 0.0
        for pixels, index in batches_per_epoch(epoch):
            y = targets[index].to(model.device)
            with autocast():
                outputs = encoder(pixels.to(model.device))[-levels:]
                all_logits = [head(level.mean(1)) for head, level in zip(heads, outputs, strict=True)]
            loss = sum(F.binary_cross_entropy_with_logits(logits.float(), y) for logits in all_logits)
            logits = all_logits[-1]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            seen += pixels.shape[0]
            with torch.no_grad():
                guess = logits.float() > 0
                hits += float((guess & (y > 0)).sum())
                predicted += float(guess.sum())
                actual += float(y.sum())
        seconds = time.perf_counter() - started
        record = {
            "pretrain_epoch": epoch,
            "loss": round(sum(losses) / max(1, len(losses)), 5),
            "seconds": round(seconds, 1),
            "images_per_second": round(seen / max(seconds, 1e-9), 1),
            "train_f1": round(2 * hits / max(predicted + actual, 1.0), 4),
        }
        logger.info("n-gram pre-training %s", record)
        records.append(record)
    return records
