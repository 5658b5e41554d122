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
    """Text -> images for a batch of queries: one tokenisation and one encoder forward for all of them, then each
    index part (the index, or each shard of a sharded one) its own FAISS search and re-rank, merged by score.
    Returns one outcome per query, its result or the ``ServiceError`` it alone failed with. ``encode`` and
    ``first_stage`` in each query's timings are the batch's (shared) stages."""
    clock = _Clock()
    with torch.inference_mode():
        try:
            levels, lengths = model.encode_text_strings([query for query, _ in queries])
        except TokenizerError as exc:
            return [ServiceError(422, "invalid_query", str(exc))] * len(queries)
        vectors = model.global_texts(levels, lengths).cpu().numpy().astype(np.float32)
        levels = [t.cpu() for t in levels]
    clock.lap("encode")
    lengths = [int(n) for n in lengths]
    texts = TextFeatures(vectors, levels, lengths)
    empty = [n <= 2 for n in lengths]  # [CLS] and [SEP] only: control or zero-width characters, nothing to search
    params = [p for _, p in queries]
    per_part = [rank_images(part, state.lock, texts, params, options, model.device, skip=empty)
                for part in parts_of(state.index)]  # fmt: skip
    outcomes: list[dict[str, Any] | Exception] = []
    for i, p in enumerate(params):
        if empty[i]:
            outcomes.append(ServiceError(422, "empty_query", "query is empty after tokenisation (nothing to search)"))
            continue
        answers = [answer[i] for answer in per_part]
        timings = {"encode": clock.ms["encode"], **_stage_sums(answers)}
        timings["total"] = round(sum(timings.values()), 3)
        outcomes.append({"results": merge([a.entries for a in answers], p.k), "timings_ms": timings, "stage": "rerank"})
    return outcomes


@dataclass
class TextFeatures:
    """Encoded queries: global vectors ``[B, G]``, per-level tokens ``[B, L, D]`` (CPU) and real lengths."""

    vectors: np.ndarray
    levels: list[torch.Tensor]
    lengths: list[int]


@dataclass
class PartAnswer:
    """One index part's answer to one query: its best entries (score order) and its stage times."""

    entries: list[dict]
    ms: dict[str, float]


def parts_of(index) -> list:
    """The parts searched one by one: a sharded index's shards, or the index itself."""
    return list(getattr(index, "parts", None) or [index])


def rank_images(part, lock, texts: TextFeatures, params: list[SearchParams], options: SearchOptions, device,
                skip: list[bool] | None = None) -> list[PartAnswer | None]:
    """Text -> images on one index part (a whole index or one shard) for a batch of encoded queries: one FAISS
    search, then each query's HAT re-rank of its candidates; the best ``k`` entries per query (None for a
    query in ``skip``). This is all a shard does for a query, here or in a shard searcher on Ray."""
    clock = _Clock()
    widest = max(p.candidates for p in params)
    first_all, rows_all = part.search("images", texts.vectors, widest)
    clock.lap("first_stage")
    answers: list[PartAnswer | None] = []
    for i, p in enumerate(params):
        if skip and skip[i]:
            answers.append(None)
            continue
        own = _Clock()
        keep = rows_all[i] >= 0  # an approximate index may find fewer than asked
        first, rows = first_all[i][keep][: p.candidates], rows_all[i][keep][: p.candidates]
        length = texts.lengths[i]
        with torch.inference_mode():
            query_levels = [t[i : i + 1, :length] for t in texts.levels]
            scores = part.rerank_images(query_levels, length, rows, options.rerank_dtype, device=device)
        best = _top(scores, p.k)
        own.lap("rerank")
        with lock:
            items = part.images(rows[best])
        answers.append(PartAnswer(_entries(items, scores.numpy()[best], first[best]),
                                  {"first_stage": clock.ms["first_stage"], "rerank": own.ms["rerank"]}))  # fmt: skip
    return answers


def _stage_sums(answers: list[PartAnswer]) -> dict[str, float]:
    """Stage times summed over the parts (they run one after another here)."""
    out: dict[str, float] = {}
    for a in answers:
        for stage, ms in a.ms.items():
            out[stage] = round(out.get(stage, 0.0) + ms, 3)
    return out


def merge(lists: list[list[dict]], k: int) -> list[dict]:
    """The ``k`` best entries of the parts' lists by score, best first, ranks numbered; equal scores keep the
    parts' order (then each list's own order), so one part gives exactly its own list."""
    pooled = [entry for entries in lists for entry in entries]
    order = sorted(range(len(pooled)), key=lambda j: -pooled[j]["score"])
    return [{**pooled[j], "rank": rank} for rank, j in enumerate(order[:k], start=1)]


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
    for all that decoded, then each its own first stage and re-rank on every index part, merged by score. One
    outcome per upload."""
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
        vector = vectors[position : position + 1]
        own_levels = [t[position : position + 1] for t in levels]
        answers = [
            rank_captions(part, state.lock, vector, own_levels, params, options, model.device)
            if target != "image" else match_images(part, state.lock, vector, params)
            for part in parts_of(state.index)
        ]  # fmt: skip
        timings = {"decode": decode_ms[i], "encode": encode_ms, **_stage_sums(answers)}
        timings["total"] = round(sum(timings.values()), 3)
        result = {"results": merge([a.entries for a in answers], params.k), "timings_ms": timings}
        if target == "image":
            result.update(stage="first_stage_only", target="image")
        else:
            result.update(stage="rerank", target="captions")
        outcomes[i] = result
    return outcomes


def rank_captions(part, lock, vector: np.ndarray, levels: list[torch.Tensor], params: SearchParams,
                  options: SearchOptions, device) -> PartAnswer:
    """Image -> captions on one index part: FAISS over the captions' global vectors, then the HAT re-rank of
    the candidates against the image's levels ``[1, R_l, D]``; the best ``k`` entries."""
    clock = _Clock()
    first, rows = part.search("captions", vector, params.candidates)
    first, rows = first[0], rows[0]
    clock.lap("first_stage")
    with torch.inference_mode():
        scores = part.rerank_captions(levels, rows, options.rerank_dtype, device=device)
    best = _top(scores, params.k)
    clock.lap("rerank")
    with lock:
        items = part.captions(rows[best])
    return PartAnswer(_entries(items, scores.numpy()[best], first[best]), clock.ms)


def match_images(part, lock, vector: np.ndarray, params: SearchParams) -> PartAnswer:
    """Image -> images on one index part by global vector only (there is no image-image HAT score)."""
    clock = _Clock()
    first, rows = part.search("images", vector, params.k)
    first, rows = first[0], rows[0]
    clock.lap("first_stage")
    with lock:
        items = part.images(rows)
    return PartAnswer(_entries(items, first, first), clock.ms)


def _entries(items: list[dict], scores: np.ndarray, first: np.ndarray) -> list[dict]:
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
