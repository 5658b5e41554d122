"""What a search answers besides scores: metadata filters checked index-wide, each re-ranked result's match
strength and, when asked, its explanation (HAT's cross attention per word and level).

The per-part pieces (strength, the attention maps) are computed where a part re-ranks, from its own features
and calibration; the index-wide pieces (unknown filter keys, the explanation's words, the ``weak`` flag) by
the front that merges the parts.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from index_format import FilterError, require_known

from .errors import ServiceError

logger = logging.getLogger("service")
ATTENTION_DECIMALS = 6  # attention weights in the JSON (a row of 784 still sums to 1 within 1e-4)


def filter_errors(flt: dict | None, answers: list) -> ServiceError | None:
    """The 422 a filter gets when it names a key that no part's items have, None otherwise. A part's answer
    lists the keys it has only when it lacks some of the filter's (``keys`` None: it has them all)."""
    if flt is None or any(answer.keys is None for answer in answers):
        return None
    known: set[str] = set()
    for answer in answers:
        known.update(answer.keys)
    try:
        require_known(flt, known)
    except FilterError as exc:
        return ServiceError(422, exc.code, exc.message)
    return None


def level_sum(level_scores: torch.Tensor) -> torch.Tensor:
    """``[K, levels]`` -> ``[K]``, added in level order as the re-rank adds them (the same float32 sums)."""
    total = level_scores[:, 0]
    for level in range(1, level_scores.shape[1]):
        total = total + level_scores[:, level]
    return total


def grid(regions: int) -> list[int]:
    """``[H, W]`` of a level's ``regions`` (row-major Swin tokens of a square input; ``[1, R]`` otherwise)."""
    side = math.isqrt(regions)
    return [side, side] if side * side == regions else [1, regions]


def explanations(attentions: list, level_scores: torch.Tensor, direction: str) -> list[dict[str, Any]]:
    """Per result: ``{"direction", "levels": [{"level", "grid", "score", "attention"}]}`` from its per-level
    :class:`model.alignment.LevelAttention` and level scores ``[k, levels]``. Attention rows are the word tokens
    between ``[CLS]`` and ``[SEP]``; :func:`add_tokens` adds their text."""
    out = []
    for per_level, scores in zip(attentions, level_scores.tolist(), strict=True):
        levels = [
            {
                "level": number,
                "grid": grid(a.word_maps.shape[1]),
                "score": score,
                "attention": np.round(a.word_maps[1:-1].numpy().astype(np.float64), ATTENTION_DECIMALS).tolist(),
            }
            for number, (a, score) in enumerate(zip(per_level, scores, strict=True), start=1)
        ]
        out.append({"direction": direction, "levels": levels})
    return out


def add_tokens(explain: dict[str, Any], text: str, spans: list) -> dict[str, Any] | None:
    """``explain`` with ``tokens``: the words of ``text`` (``spans`` from the model's tokenizer, ``[CLS]`` and
    ``[SEP]`` left out); None, logged, when they do not line up with the attention rows."""
    words = [span for span in spans if span is not None]
    if any(len(level["attention"]) != len(words) for level in explain["levels"]):
        logger.warning("explanation dropped: %d tokens for %d attention rows", len(words),
                       len(explain["levels"][0]["attention"]))  # fmt: skip
        return None
    tokens = [{"text": text[start:end], "start": start, "end": end} for start, end in words]
    return {"direction": explain["direction"], "tokens": tokens, "levels": explain["levels"]}


def is_weak(results: list[dict[str, Any]]) -> bool:
    """The response's ``weak``: no result, or the best one rated weak."""
    return not results or results[0].get("strength", {}).get("label") == "weak"
