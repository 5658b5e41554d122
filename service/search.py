"""The two-stage searches, as plain synchronous functions over a batch of requests (the app's batchers run them
in worker threads; a batch of one is a search alone).

Text -> images: encode the query, take ``candidates`` images from FAISS by global vector, re-rank them with
the full HAT score over the cached token features, return the top ``k``. Image -> captions likewise over the
captions; image -> image uses the global vectors only (there is no image-image HAT score).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, get_args
from urllib.parse import quote

import numpy as np
import torch

from model import ImageDecodeError, TokenizerError, load_pixels, wide_encoding

from .annotate import add_tokens, explanations, filter_errors, is_weak, level_sum
from .errors import ServiceError
from .settings import RerankDtype, Settings
from .sharing import IdleWorkers

if TYPE_CHECKING:
    from .state import IndexState

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in get_args(RerankDtype)}
# A caption's tokens as the re-rank split estimates an image query's work per caption candidate (captions vary;
# a COCO-style caption with [CLS] and [SEP] has about this many).
CAPTION_TOKENS = 16


@dataclass(frozen=True)
class SearchParams:
    """What one request asks for: ``k`` results from ``candidates`` first-stage hits (``candidates >= k``), among
    the items a metadata ``filter`` keeps (checked: ``index_format.check_filter``), explained or not."""

    k: int
    candidates: int
    filter: dict[str, tuple] | None = None
    explain: bool = False


@dataclass(frozen=True)
class SearchOptions:
    """The server's choices, the same for every request (the engine holds them): the re-rank precision and the
    largest image accepted, in pixels."""

    rerank_dtype: torch.dtype
    max_image_pixels: int
    helpers: IdleWorkers | None = None  # idle search workers a re-rank may split its candidates over
    encode_helpers: IdleWorkers | None = None  # idle search workers whose threads a text query's encoding may use

    @classmethod
    def from_settings(cls, settings: Settings, helpers: IdleWorkers | None = None) -> SearchOptions:
        """The options of ``settings`` (``HAT_RERANK_DTYPE``, ``HAT_MAX_IMAGE_PIXELS``); ``helpers`` for the
        re-rank when ``HAT_SPLIT_RERANK`` is on, for the query encoder when ``HAT_WIDE_ENCODE`` is."""
        return cls(
            rerank_dtype=DTYPES[settings.rerank_dtype],
            max_image_pixels=settings.max_image_pixels,
            helpers=helpers if settings.split_rerank else None,
            encode_helpers=helpers if settings.wide_encode else None,
        )

    def wide_encode(self, batch: int) -> bool:
        """Whether a text batch of ``batch`` queries encoded now may use the idle workers' threads
        (``model.wide_encoding``): it is all the service holds and another worker is idle
        (:meth:`IdleWorkers.quiet`). Decided once per batch; a search that arrives meanwhile shares the cores for
        the rest of that forward (tens of ms). Under load the requests outnumber the batch, so the wide session
        does not run: measured at 8 clients, encoding wide whenever a worker was idle cost 12% of the
        throughput (docs/benchmarks.md)."""
        return self.encode_helpers is not None and self.encode_helpers.quiet(batch)

    def split(self, score, rows: np.ndarray, pairs_per_row: int) -> torch.Tensor:
        """``score(rows)``, its candidates split over the idle search workers when there are any and the work
        (``pairs_per_row`` query-candidate token pairs a candidate) is worth it."""
        return score(rows) if self.helpers is None else self.helpers.split(score, rows, pairs_per_row)


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
    with wide_encoding(options.wide_encode(len(queries))):
        texts = encode_texts(model, [query for query, _ in queries])
    if isinstance(texts, ServiceError):
        return [texts] * len(queries)
    params = [p for _, p in queries]
    per_part = [rank_images(part, state.lock, texts, params, options, model.device) for part in parts_of(state.index)]
    return answer_texts(texts, params, per_part)


def encode_texts(model, queries: list[str]) -> TextFeatures | ServiceError:
    """The queries through the text encoder in one forward (or the 422 a bad query gives the whole batch)."""
    clock = _Clock()
    with torch.inference_mode():
        try:
            levels, lengths = model.encode_text_strings(queries)
        except TokenizerError as exc:
            return ServiceError(422, "invalid_query", str(exc))
        vectors = model.global_texts(levels, lengths).cpu().numpy().astype(np.float32)
        levels = [t.cpu() for t in levels]
    clock.lap("encode")
    spans = [model.tokenizer.spans(query) for query in queries]  # where each token comes from, for explanations
    return TextFeatures(vectors, levels, [int(n) for n in lengths], clock.ms["encode"], queries, spans)


def answer_texts(
    texts: TextFeatures, params: list[SearchParams], per_part: list[list[PartAnswer | None] | None]
) -> list[dict[str, Any] | Exception]:
    """Each query's outcome from the parts' answers (``per_part[part][query]``; a part that could not answer is
    None and left out): the merged best ``k`` (their explanations given the query's words), ``weak``,
    ``filter_matches``, and the stage times (summed over the parts); or the query's error (an empty query, a
    filter key no part knows)."""
    outcomes: list[dict[str, Any] | Exception] = []
    for i, p in enumerate(params):
        if texts.empty(i):
            outcomes.append(ServiceError(422, "empty_query", "query is empty after tokenisation (nothing to search)"))
            continue
        answers = [answer[i] for answer in per_part if answer is not None]
        refusal = filter_errors(p.filter, answers)
        if refusal is not None:
            outcomes.append(refusal)
            continue
        timings = {"encode": texts.encode_ms, **_stage_sums(answers)}
        timings["total"] = round(sum(timings.values()), 3)
        results = merge([a.entries for a in answers], p.k)
        for entry in results if p.explain else []:
            entry["explain"] = add_tokens(entry["explain"], texts.texts[i], texts.spans[i])
        outcomes.append({"results": results, "timings_ms": timings, "stage": "rerank", **_summary(results, answers)})
    return outcomes


def _summary(results: list[dict], answers: list[PartAnswer], rated: bool = True) -> dict[str, Any]:
    """``weak`` (results ``rated`` by match strength: re-ranked ones) and, when a filter was given,
    ``filter_matches`` (summed over the parts)."""
    out: dict[str, Any] = {"weak": is_weak(results)} if rated else {}
    if answers and answers[0].matches is not None:
        out["filter_matches"] = sum(a.matches or 0 for a in answers)
    return out


@dataclass
class TextFeatures:
    """Encoded queries: global vectors ``[B, G]``, per-level tokens ``[B, L, D]`` (CPU) and real lengths."""

    vectors: np.ndarray
    levels: list[torch.Tensor]
    lengths: list[int]
    encode_ms: float = 0.0
    texts: list[str] = field(default_factory=list)  # the queries
    spans: list[list] = field(default_factory=list)  # their tokens' character spans (HATTokenizer.spans)

    def empty(self, i: int) -> bool:
        """[CLS] and [SEP] only: control or zero-width characters, nothing to search."""
        return self.lengths[i] <= 2


@dataclass
class PartAnswer:
    """One index part's answer to one query: its best entries (score order) and its stage times; for a
    filtered search, how many of its items the filter matched and, when the part lacks some of the filter's keys,
    the metadata keys it has (None: it has them all)."""

    entries: list[dict]
    ms: dict[str, float]
    matches: int | None = None
    keys: list[str] | None = None


def parts_of(index) -> list:
    """The parts searched one by one: a sharded index's shards, or the index itself."""
    return list(getattr(index, "parts", None) or [index])


def rank_images(part, lock, texts: TextFeatures, params: list[SearchParams], options: SearchOptions, device
                ) -> list[PartAnswer | None]:
    """Text -> images on one index part (a whole index or one shard) for a batch of encoded queries: one FAISS
    search for the queries without a filter (a filtered one searches the rows its filter keeps, alone), then each
    query's HAT re-rank of its candidates; the best ``k`` entries per query with their match strength (and
    explanation when asked), None for an empty query. This is all a shard does for a query, here or in a shard
    searcher on Ray."""
    clock = _Clock()
    plain = [i for i, p in enumerate(params) if p.filter is None and not texts.empty(i)]
    widest = max((params[i].candidates for i in plain), default=0)
    first_all, rows_all = part.search("images", texts.vectors[plain], widest)
    clock.lap("first_stage")
    answers: list[PartAnswer | None] = []
    for i, p in enumerate(params):
        if texts.empty(i):
            answers.append(None)
            continue
        own, matches = _Clock(), None
        if p.filter is None:
            j = plain.index(i)
            keep = rows_all[j] >= 0  # an approximate index may find fewer than asked
            first, rows = first_all[j][keep][: p.candidates], rows_all[j][keep][: p.candidates]
        else:
            first, rows, matches = _filtered(part, "images", texts.vectors[i : i + 1], p.filter, p.candidates, own)
        length = texts.lengths[i]
        query_levels = [t[i : i + 1, :length] for t in texts.levels]

        def score(rows, per_level=False, query_levels=query_levels, length=length):
            def chunk(rows):
                return part.rerank_images(query_levels, length, rows, options.rerank_dtype, device, per_level)

            return options.split(chunk, rows, image_tokens(part) * length)

        def explain(rows, query_levels=query_levels, length=length):
            return part.explain_images(query_levels, length, rows, options.rerank_dtype)

        entries = _rerank(part, lock, "images", first, rows, p, score, explain, own)
        own.ms["first_stage"] = round(clock.ms["first_stage"] + own.ms.get("first_stage", 0.0), 3)
        answers.append(_answer(part, "images", p, entries, own.ms, matches))
    return answers


def image_tokens(part) -> int:
    """An image's token rows over all levels in ``part`` (the manifest's ``image_tokens``; older manifests
    without it: the first segment's tables)."""
    tokens = part.manifest["model"].get("image_tokens")
    if tokens is None:
        tokens = [table.parts["norms"].shape[1] for table in part.segments[0].image]
    return int(sum(tokens))


def _first_stage(part, kind: str, vector: np.ndarray, p: SearchParams, wanted: int, clock: _Clock):
    """One query's first stage on one part: the ``wanted`` best of ``kind`` by global vector, among the rows its
    filter keeps when it has one -> (scores, rows, how many rows the filter kept or None)."""
    if p.filter is not None:
        return _filtered(part, kind, vector, p.filter, wanted, clock)
    first, rows = part.search(kind, vector, wanted)
    clock.lap("first_stage")
    return first[0], rows[0], None


def _filtered(part, kind: str, vector: np.ndarray, flt: dict, wanted: int, clock: _Clock):
    """A filtered first stage on one part: the rows the filter keeps (stage ``filter``), then the ``wanted``
    best of them by global vector (``first_stage``) -> (scores, rows, how many rows the filter kept)."""
    allowed = part.filters.rows(kind, flt)
    clock.lap("filter")
    first, rows = part.search(kind, vector, wanted, allowed=allowed)
    clock.lap("first_stage")
    return first[0], rows[0], len(allowed)


def _answer(part, kind: str, p: SearchParams, entries: list[dict], ms: dict, matches: int | None) -> PartAnswer:
    """A part's answer; a filtered one says how many items matched and, when some of the filter's keys are
    unknown to the part, which metadata keys it knows."""
    unknown = part.filters.unknown(kind, p.filter) if p.filter is not None else []
    return PartAnswer(entries, ms, matches, part.filters.keys(kind) if unknown else None)


def _rerank(part, lock, kind: str, first, rows, p: SearchParams, score, explain, clock: _Clock) -> list[dict]:
    """The re-rank of one query's candidate ``rows`` (first-stage scores ``first``) on one part:
    ``score(rows, per_level)`` gives HAT scores (per level when explaining), the best ``k`` become entries with
    their match strength (stage ``strength`` where the part's scale needs the query's reference scores) and, when
    asked, their explanation ``explain(rows)`` (stage ``explain``)."""
    with torch.inference_mode():
        level_scores = score(rows, True) if p.explain else None
        scores = level_sum(level_scores) if level_scores is not None else score(rows)
        best = _top(scores, p.k)
        clock.lap("rerank")
        reference = part.strength.reference_rows(kind)
        if reference is not None:
            reference = score(reference).numpy() if len(reference) else None
        strengths = part.strength.rate(scores.numpy()[best], reference)
        if reference is not None:
            clock.lap("strength")
        explained = explanations(explain(rows[best]), level_scores[best], part.scoring.direction) if p.explain else None
        if explained is not None:
            clock.lap("explain")
    with lock:
        items = part.images(rows[best]) if kind == "images" else part.captions(rows[best])
    entries = _entries(items, scores.numpy()[best], first[best])
    for j, entry in enumerate(entries):
        entry["strength"] = strengths[j]
        if explained is not None:
            entry["explain"] = explained[j]
    return entries


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
    images = encode_images(model, [data for data, _, _ in uploads], options.max_image_pixels)
    asks = [(target, params) for _, target, params in uploads]
    per_part = [image_answers(part, state.lock, images, asks, options, model.device) for part in parts_of(state.index)]
    return answer_images(images, asks, per_part, model.tokenizer.spans)


@dataclass
class ImageFeatures:
    """Encoded uploads: ``rows[i]`` is upload i's row of ``vectors [B, G]`` and ``levels [B, R_l, D]`` (CPU), or
    None when it failed (``errors[i]``); decode times per upload, the encoder forward's time."""

    vectors: np.ndarray | None
    levels: list[torch.Tensor]
    rows: list[int | None]
    errors: dict[int, ServiceError]
    decode_ms: list[float]
    encode_ms: float


def encode_images(model, uploads: list[bytes], max_pixels: int) -> ImageFeatures:
    """Decode each upload on its own, then one encoder forward for all that decoded."""
    decoded: list[torch.Tensor] = []
    rows: list[int | None] = []
    errors: dict[int, ServiceError] = {}
    decode_ms: list[float] = []
    for i, data in enumerate(uploads):
        clock = _Clock()
        try:
            decoded.append(decode_image(data, model.config.image.image_size, max_pixels))
            rows.append(len(decoded) - 1)
        except ServiceError as exc:
            errors[i] = exc
            rows.append(None)
        decode_ms.append(clock.done()["total"])
    if not decoded:
        return ImageFeatures(None, [], rows, errors, decode_ms, 0.0)
    clock = _Clock()
    with torch.inference_mode():
        levels = model.encode_images(torch.cat(decoded).to(model.device))
        vectors = model.global_images(levels).cpu().numpy().astype(np.float32)
        levels = [t.cpu() for t in levels]
    return ImageFeatures(vectors, levels, rows, errors, decode_ms, clock.done()["total"])


def image_answers(part, lock, images: ImageFeatures, asks: list[tuple[str, SearchParams]], options: SearchOptions,
                  device) -> list[PartAnswer | None]:
    """Each upload's answer from one index part (None for an upload that failed): image -> captions re-ranked,
    or image -> images by global vector (``target == "image"``)."""
    out: list[PartAnswer | None] = []
    for row, (target, params) in zip(images.rows, asks, strict=True):
        if row is None:
            out.append(None)
            continue
        vector = images.vectors[row : row + 1]
        if target == "image":
            out.append(match_images(part, lock, vector, params))
        else:
            levels = [t[row : row + 1] for t in images.levels]
            out.append(rank_captions(part, lock, vector, levels, params, options, device))
    return out


def answer_images(images: ImageFeatures, asks: list[tuple[str, SearchParams]],
                  per_part: list[list[PartAnswer | None] | None], spans_of=None) -> list[dict[str, Any] | Exception]:
    """Each upload's outcome: its error (or its filter's), or the parts' answers merged (a part that could not
    answer is None); explained captions get their words from ``spans_of(text)`` (``HATTokenizer.spans``)."""
    outcomes: list[dict[str, Any] | Exception] = []
    for i, (target, params) in enumerate(asks):
        if i in images.errors:
            outcomes.append(images.errors[i])
            continue
        answers = [answer[i] for answer in per_part if answer is not None]
        refusal = filter_errors(params.filter, answers)
        if refusal is not None:
            outcomes.append(refusal)
            continue
        timings = {"decode": images.decode_ms[i], "encode": images.encode_ms, **_stage_sums(answers)}
        timings["total"] = round(sum(timings.values()), 3)
        results = merge([a.entries for a in answers], params.k)
        result: dict[str, Any] = {"results": results, "timings_ms": timings}
        if target == "image":
            result.update(stage="first_stage_only", target="image", **_summary(results, answers, rated=False))
        else:
            result.update(stage="rerank", target="captions", **_summary(results, answers))
        for entry in results if params.explain else []:  # no spans_of: no words to show, no explanation
            text = entry["text"]
            entry["explain"] = add_tokens(entry["explain"], text, spans_of(text)) if spans_of else None
        outcomes.append(result)
    return outcomes


def rank_captions(part, lock, vector: np.ndarray, levels: list[torch.Tensor], params: SearchParams,
                  options: SearchOptions, device) -> PartAnswer:
    """Image -> captions on one index part: FAISS over the captions' global vectors, then the HAT re-rank of
    the candidates against the image's levels ``[1, R_l, D]``; the best ``k`` entries."""
    clock = _Clock()
    first, rows, matches = _first_stage(part, "captions", vector, params, params.candidates, clock)

    def score(rows, per_level=False):
        def chunk(rows):
            return part.rerank_captions(levels, rows, options.rerank_dtype, device, per_level)

        return options.split(chunk, rows, sum(int(x.shape[1]) for x in levels) * CAPTION_TOKENS)

    def explain(rows):
        return part.explain_captions(levels, rows, options.rerank_dtype)

    entries = _rerank(part, lock, "captions", first, rows, params, score, explain, clock)
    return _answer(part, "captions", params, entries, clock.ms, matches)


def match_images(part, lock, vector: np.ndarray, params: SearchParams) -> PartAnswer:
    """Image -> images on one index part by global vector only (there is no image-image HAT score)."""
    clock = _Clock()
    first, rows, matches = _first_stage(part, "images", vector, params, params.k, clock)
    with lock:
        items = part.images(rows)
    return _answer(part, "images", params, _entries(items, first, first), clock.ms, matches)


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
