"""The two-stage searches, as plain synchronous functions over a batch of requests (the app's batchers run them
in worker threads; a batch of one is a search alone).

Text -> images: encode the query, take ``candidates`` images from FAISS by global vector, re-rank them with
the full HAT score over the cached token features, return the top ``k``. Image -> captions likewise over the
captions; image -> image uses the global vectors only (there is no image-image HAT score).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, get_args
from urllib.parse import quote

import numpy as np
import torch

from model import ImageDecodeError, TokenizerError, load_pixels

from .errors import ServiceError
from .settings import RerankDtype, Settings

if TYPE_CHECKING:
    from .state import IndexState

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in get_args(RerankDtype)}


@dataclass(frozen=True)
class SearchParams:
    """What one request asks for: ``k`` results from ``candidates`` first-stage hits (``candidates >= k``)."""

    k: int
    candidates: int


@dataclass(frozen=True)
class SearchOptions:
    """The server's choices, the same for every request (the engine holds them): the re-rank precision and the
    largest image accepted, in pixels."""

    rerank_dtype: torch.dtype
    max_image_pixels: int

    @classmethod
    def from_settings(cls, settings: Settings) -> SearchOptions:
        """The options of ``settings`` (``HAT_RERANK_DTYPE``, ``HAT_MAX_IMAGE_PIXELS``)."""
        return cls(rerank_dtype=DTYPES[settings.rerank_dtype], max_image_pixels=settings.max_image_pixels)


def image_url(image_id: str) -> str:
    """``/images/<id>`` with the id percent-encoded (slashes included)."""
    return "/images/" + quote(image_id, safe="")


class _Clock:
    """Milliseconds per stage, measured back to back."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.ms: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.ms[stage] = round((now - self.last) * 1000.0, 3)
        self.last = now

    def done(self) -> dict[str, float]:
        self.ms["total"] = round((time.perf_counter() - self.start) * 1000.0, 3)
        return self.ms


def _top(scores: torch.Tensor, k: int) -> np.ndarray:
    """Positions of the ``k`` best scores, best first; ties keep the first-stage order."""
    order = np.argsort(-scores.numpy(), kind="stable")
    return order[:k]


def search_texts(
    model, state: IndexState, queries: list[tuple[str, SearchParams]], options: SearchOptions
) -> list[dict[str, Any] | Exception]:
    """Text -> images for a batch of queries: one tokenisation and one encoder forward for all of them, one
    FAISS search, then each query's own re-rank. Returns one outcome per query, its result or the
    ``ServiceError`` it alone failed with. ``encode`` and ``first_stage`` in each query's timings are the
    batch's (shared) stages."""
    clock = _Clock()
    with torch.inference_mode():
        try:
            levels, lengths = model.encode_text_strings([query for query, _ in queries])
        except TokenizerError as exc:
            return [ServiceError(422, "invalid_query", str(exc))] * len(queries)
        vectors = model.global_texts(levels, lengths).cpu().numpy().astype(np.float32)
        levels = [t.cpu() for t in levels]
    clock.lap("encode")
    widest = max(params.candidates for _, params in queries)
    first_all, rows_all = state.index.search("images", vectors, widest)
    clock.lap("first_stage")
    shared, outcomes = clock.ms, []
    for i, (_, params) in enumerate(queries):
        length = int(lengths[i])
        if length <= 2:  # [CLS] and [SEP] only: control or zero-width characters, nothing to search
            outcomes.append(ServiceError(422, "empty_query", "query is empty after tokenisation (nothing to search)"))
            continue
        own = _Clock()
        keep = rows_all[i] >= 0  # an approximate index may find fewer than asked
        first, rows = first_all[i][keep][: params.candidates], rows_all[i][keep][: params.candidates]
        with torch.inference_mode():
            query_levels = [t[i : i + 1, :length] for t in levels]
            scores = state.index.rerank_images(query_levels, length, rows, options.rerank_dtype, device=model.device)
        best = _top(scores, params.k)
        own.lap("rerank")
        with state.lock:
            items = state.index.images(rows[best])
        total = round(shared["encode"] + shared["first_stage"] + own.done()["total"], 3)
        timings = {"encode": shared["encode"], "first_stage": shared["first_stage"], "rerank": own.ms["rerank"]}
        outcomes.append({"results": _results(items, scores.numpy()[best], first[best]),
                         "timings_ms": {**timings, "total": total}, "stage": "rerank"})  # fmt: skip
    return outcomes


# How the decoding boundary's reasons (model.ImageDecodeError.kind) answer a client.
DECODE_ERRORS = {
    "not_image": (415, "unsupported_image"),
    "unsupported": (415, "unsupported_image"),
    "corrupt": (422, "invalid_image"),
    "too_large": (413, "image_too_large"),
}


def decode_image(data: bytes, image_size: int, max_pixels: int) -> torch.Tensor:
    """Uploaded bytes -> ``[1, 3, S, S]`` pixels through the model's decoding boundary (``load_pixels``);
    refuses non-images and unsupported variants (415), bombs (413), corrupt data (422)."""
    try:
        return load_pixels(data, image_size, max_pixels=max_pixels)[None]
    except ImageDecodeError as exc:
        status, code = DECODE_ERRORS.get(exc.kind, (422, "invalid_image"))
        reason = str(exc).removeprefix("uploaded data: ")
        message = f"the upload is not a readable image: {reason}" if status == 415 else f"image: {reason}"
        raise ServiceError(status, code, message) from exc


def search_images(
    model, state: IndexState, uploads: list[tuple[bytes, str, SearchParams]], options: SearchOptions
) -> list[dict[str, Any] | Exception]:
    """A batch of image searches: each upload decoded on its own (a bad one fails alone), one encoder forward
    for all that decoded, then each its own first stage and re-rank. One outcome per upload."""
    decoded: dict[int, torch.Tensor] = {}
    outcomes: list[Any] = [None] * len(uploads)  # each set below: the upload's error or its result
    decode_ms: dict[int, float] = {}
    for i, (data, _, _) in enumerate(uploads):
        clock = _Clock()
        try:
            decoded[i] = decode_image(data, model.config.image.image_size, options.max_image_pixels)
        except ServiceError as exc:
            outcomes[i] = exc
        decode_ms[i] = clock.done()["total"]
    if not decoded:
        return outcomes
    clock = _Clock()
    order = sorted(decoded)
    with torch.inference_mode():
        levels = model.encode_images(torch.cat([decoded[i] for i in order]).to(model.device))
        vectors = model.global_images(levels).cpu().numpy().astype(np.float32)
        levels = [t.cpu() for t in levels]
    encode_ms = clock.done()["total"]
    for position, i in enumerate(order):
        _, target, params = uploads[i]
        own = _Clock()
        own.ms.update(decode=decode_ms[i], encode=encode_ms)
        vector = vectors[position : position + 1]
        if target == "image":
            outcomes[i] = _image_to_images(state, vector, params, own)
        else:
            own_levels = [t[position : position + 1] for t in levels]
            outcomes[i] = _image_to_captions(state, vector, own_levels, params, options, own, model.device)
        outcomes[i]["timings_ms"]["total"] = round(sum(v for k, v in own.ms.items() if k != "total"), 3)
    return outcomes


def _image_to_captions(state, vector, levels, params: SearchParams, options: SearchOptions, clock: _Clock, device):
    first, rows = state.index.search("captions", vector, params.candidates)
    first, rows = first[0], rows[0]
    clock.lap("first_stage")
    with torch.inference_mode():
        scores = state.index.rerank_captions(levels, rows, options.rerank_dtype, device=device)
    best = _top(scores, params.k)
    clock.lap("rerank")
    with state.lock:
        items = state.index.captions(rows[best])
    results = _results(items, scores.numpy()[best], first[best])
    return {"results": results, "timings_ms": clock.done(), "stage": "rerank", "target": "captions"}


def _image_to_images(state: IndexState, vector: np.ndarray, params: SearchParams, clock: _Clock) -> dict:
    first, rows = state.index.search("images", vector, params.k)
    first, rows = first[0], rows[0]
    clock.lap("first_stage")
    with state.lock:
        items = state.index.images(rows)
    results = _results(items, first, first)
    return {"results": results, "timings_ms": clock.done(), "stage": "first_stage_only", "target": "image"}


def _results(items: list[dict], scores: np.ndarray, first: np.ndarray) -> list[dict]:
    """Response entries, best first, for gallery ``items`` (images, or captions carrying their image id and
    text) with their final and first-stage scores. A caption of the text-only corpus has no image (no URL)."""
    out = []
    for rank, (item, score, first_score) in enumerate(zip(items, scores, first, strict=True), start=1):
        entry = {"id": item["id"], "score": float(score), "first_stage_score": float(first_score), "rank": rank}
        if "text" in item:  # a caption
            entry.update(image_id=item["image_id"], text=item["text"])
            entry["image_url"] = image_url(item["image_id"]) if item["image_id"] is not None else None
        else:
            entry["image_url"] = image_url(item["id"])
        entry["metadata"] = item["metadata"]
        out.append(entry)
    return out
