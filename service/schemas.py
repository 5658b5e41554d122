"""The request and response bodies of the HTTP API as pydantic models, each shape written once: the routes
validate requests and build responses with them, and the OpenAPI schema (``GET /openapi.json``) is generated
from them (the error bodies are in service/errors.py).

A request body's limits (``HAT_MAX_QUERY_CHARS``, ``HAT_MAX_K``, ...) are constraints of its model, so the
request models are made per set of limits (:class:`RequestLimits`): :func:`text_request_model` and
:func:`image_form_model`, cached. The models carry no docstrings: pydantic would put them in the schema.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import AfterValidator, BeforeValidator, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic_core import PydanticCustomError

from index_format import FilterError, check_filter

from .errors import Closed, ErrorInfo
from .settings import Settings

Target = Literal["captions", "image"]


class RequestLimits(NamedTuple):
    """The settings that shape request bodies (a cache key of the request models)."""

    max_query_chars: int
    max_k: int
    max_candidates: int
    default_k: int
    default_candidates: int
    max_upload_bytes: int
    max_image_pixels: int

    @classmethod
    def of(cls, settings: Settings) -> RequestLimits:
        """The limits of ``settings``."""
        return cls(**{name: getattr(settings, name) for name in cls._fields})


# ------------------------------------------------------------------------------------------------ requests


def _json_integer(value: Any) -> Any:
    """JSON Schema's integers: ``3`` and ``3.0`` (a number with no fraction), never ``true``, ``"3"`` or ``3.5``."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


_FORM_INT = re.compile(r"-?[0-9]{1,30}")


def _form_integer(value: Any) -> Any:
    """A form field's text as an integer, written in ASCII digits as in JSON. Checked here because pydantic's own
    parsing of strings also takes ``" 5"``, ``"1_0"``, ``"+5"`` and ``"٥"`` (and strict mode takes no string)."""
    if not isinstance(value, str):
        raise PydanticCustomError("form_file", "must be a plain form field, not a file")
    if not _FORM_INT.fullmatch(value):
        raise PydanticCustomError("int_parsing", "must be an integer, got {got}", {"got": repr(value[:40])})
    return int(value)


def _searchable(ch: str) -> bool:
    """A character the text encoder keeps: not whitespace, not a control, format (zero-width), private-use or
    unassigned character (BERT's tokenizer drops categories C*), not a lone combining mark (uncased BERT strips
    accents)."""
    category = unicodedata.category(ch)
    return not ch.isspace() and category[0] != "C" and category != "Mn"


@functools.cache
def searchable_pattern() -> str:
    """The schema's pattern for a query: at least one :func:`_searchable` character. Its class lists every
    character ``_searchable`` refuses (this Python's Unicode tables, surrogates left out), so that the schema
    and the check agree on every character: ``\\uXXXX`` in the BMP, the characters themselves above it."""

    def char(c: int) -> str:
        return f"\\u{c:04x}" if c < 0x10000 else chr(c)

    ranges, start = [], None
    for c in [*range(0xD800), *range(0xE000, 0x110000), 0x110000]:
        refused = c < 0x110000 and not _searchable(chr(c))
        if refused and start is None:
            start = c
        elif not refused and start is not None:
            end = c - 1 if c != 0xE000 else 0xD7FF
            ranges.append(char(start) if start == end else f"{char(start)}-{char(end)}")
            start = None
    return "[^" + "".join(ranges) + "]"


def _not_blank(query: str) -> str:
    """The query with outer whitespace removed; refused (``empty_query``) when nothing in it is searchable: only
    whitespace, control, zero-width or combining characters (what ``""`` gets, not results for nothing)."""
    text = query.strip()
    if not any(_searchable(ch) for ch in text):
        raise PydanticCustomError("empty_query", "query is empty")
    return text


def _filter(value: Any) -> Any:
    """A filter's shape, checked by the index's own rules (index_format.check_filter): refused as
    ``invalid_filter`` with its message, before pydantic's union of value types would answer with one error per
    member."""
    if value is None:
        return None
    try:
        check_filter(value)
    except FilterError as exc:
        raise PydanticCustomError("invalid_filter", "{message}", {"message": exc.message}) from None
    return value


def _form_filter(value: Any) -> Any:
    """The form field ``filter``: the same JSON object as in ``POST /search/text``, as text."""
    if not isinstance(value, str):
        raise PydanticCustomError("form_file", "must be a plain form field, not a file")
    try:
        parsed = json.loads(value)
    except ValueError:
        raise PydanticCustomError("invalid_filter", "filter: not valid JSON") from None
    _filter(parsed)
    return value


def _form_bool(value: Any) -> Any:
    """A form field's ``true`` or ``false``, as written in JSON."""
    if value not in ("true", "false"):
        raise PydanticCustomError("bool_parsing", "must be true or false, got {got}", {"got": repr(str(value)[:40])})
    return value == "true"


FormInt = Annotated[int, BeforeValidator(_form_integer)]
Query = Annotated[StrictStr, AfterValidator(_not_blank)]
FilterScalar = StrictStr | StrictInt | StrictFloat | StrictBool | None
FilterValue = FilterScalar | Annotated[list[FilterScalar], Field(min_length=1)]
FILTER_DESCRIPTION = (
    "Metadata filter: {\"key\": value} keeps items whose metadata equals the value, {\"key\": [values]} one of "
    "the values; keys combine with AND; a list-valued metadata entry matches when any element does. Keys are "
    "the gallery's metadata keys (an unknown key is refused, naming the known ones). For image -> captions the "
    "caption's image's metadata is matched. k results come back when at least k items match."
)
Filter = Annotated[dict[str, FilterValue], BeforeValidator(_filter)]
EXPLAIN_DESCRIPTION = (
    "Return HAT's cross attention for each result: per query word (caption words for image -> captions) and "
    "level, the word's attention over the image grid, and the level scores summing to the score."
)


def _json_int(high: int) -> Any:
    """A JSON integer in ``1..high`` (the bounds before the conversion, so that the schema states them)."""
    return Annotated[StrictInt, Field(ge=1, le=high), BeforeValidator(_json_integer)]


@functools.lru_cache(maxsize=16)
def text_request_model(limits: RequestLimits) -> type[Closed]:
    """The JSON body of ``POST /search/text`` under ``limits``; ``query`` comes out stripped."""

    class TextSearchRequest(Closed):
        query: Query = Field(
            min_length=1,
            max_length=limits.max_query_chars,
            pattern=searchable_pattern(),
            description="The caption to search for (HAT_MAX_QUERY_CHARS at most), with at least one searchable "
            "character: not only whitespace, control, zero-width or combining characters.",
        )
        k: _json_int(limits.max_k) | None = Field(
            limits.default_k, description=f"Results to return (default HAT_DEFAULT_K = {limits.default_k})."
        )
        candidates: _json_int(limits.max_candidates) | None = Field(
            limits.default_candidates,
            description="First-stage candidates to re-rank, raised to k if smaller "
            f"(default {limits.default_candidates}).",
        )
        filter: Filter | None = Field(None, description=FILTER_DESCRIPTION)
        explain: StrictBool = Field(False, description=EXPLAIN_DESCRIPTION)

    return TextSearchRequest


@functools.lru_cache(maxsize=16)
def image_form_model(limits: RequestLimits) -> type[Closed]:
    """The multipart form of ``POST /search/image`` under ``limits`` (fields in the order they are checked)."""

    class ImageSearchForm(Closed):
        image: bytes = Field(
            description="The image file (JPEG, PNG, WebP, GIF, BMP, TIFF; at most "
            f"{limits.max_upload_bytes} bytes and {limits.max_image_pixels} pixels)."
        )
        target: Target = "captions"
        k: FormInt = Field(limits.default_k, ge=1, le=limits.max_k)
        candidates: FormInt = Field(limits.default_candidates, ge=1, le=limits.max_candidates)
        filter: Annotated[str | None, BeforeValidator(_form_filter)] = Field(
            None, description="The JSON text of a metadata filter, as `filter` of POST /search/text."
        )
        explain: Annotated[bool, BeforeValidator(_form_bool)] = Field(
            False, description="`true`: explain each result (target=captions only). " + EXPLAIN_DESCRIPTION
        )

    return ImageSearchForm


# ------------------------------------------------------------------------------------------------ responses


class HealthResponse(Closed):
    status: Literal["ok"]


class ShardReadiness(Closed):
    shard: int
    ready: bool = Field(description="A replica of the shard answered the last poll.")
    version: str | None = None
    images: int | None = None
    captions: int | None = None
    node: str | None = Field(None, description="The host of the replica that answered the last poll.")


class ReadyResponse(Closed):
    ready: Literal[True]
    index_version: str
    model: str = Field(description="The loaded model's identity (a hash of its weights and configuration).")
    shards: list[ShardReadiness] | None = Field(None, description="`python -m service.cluster` only: each shard.")


class NotReadyResponse(Closed):
    ready: Literal[False]
    reason: str | None
    error: ErrorInfo


class Strength(Closed):
    percentile: float = Field(
        description="Share (%) of random pairs of this gallery scoring below the result: random caption-image "
        "pairs measured at build time (method gallery_pairs), or this query against a fixed sample of gallery "
        "items (query_sample)."
    )
    match_percentile: float | None = Field(
        description="Share (%) of the gallery's true caption-image pairs scoring below the result (gallery_pairs "
        "only)."
    )
    label: Literal["strong", "good", "weak"] = Field(
        description="strong: scores like a true caption of its image; good: above 99% of random pairs; weak: "
        "within what random pairs score."
    )
    method: Literal["gallery_pairs", "query_sample"]


class ExplainToken(Closed):
    text: str = Field(description="The token's text as written (a WordPiece; '##' pieces have their own span).")
    start: int = Field(description="Character offset in the query (or the caption) where the token starts.")
    end: int = Field(description="Character offset where it ends (exclusive).")


class ExplainLevel(Closed):
    level: int = Field(ge=1, description="1 = finest image grid.")
    grid: list[int] = Field(description="[H, W] of the image regions at this level.")
    score: float = Field(description="This level's SCAN score; the levels' scores sum to the result's score.")
    attention: list[list[float]] = Field(
        description="Per token, its attention over the H x W regions (row-major), summing to 1."
    )


class Explanation(Closed):
    direction: Literal["i2t", "t2i"] = Field(
        description="The model's scoring direction: i2t: each region's softmax runs over the words and a "
        "token's map is its column of those weights normalised over the regions; t2i: the token's own softmax "
        "over the regions."
    )
    tokens: list[ExplainToken] = Field(description="The words scored ([CLS] and [SEP] take part, not listed).")
    levels: list[ExplainLevel]


class Result(Closed):
    id: str = Field(description="Image id, or caption id for image -> captions.")
    score: float = Field(description="The HAT score (or the first-stage score where no re-rank ran).")
    first_stage_score: float = Field(description="The global-vector inner product from FAISS.")
    rank: int = Field(ge=1)
    image_url: str | None = Field(description="/images/<id>; null for a caption of a text-only corpus.")
    image_id: str | None = Field(None, description="Captions only: the image the caption belongs to.")
    text: str | None = Field(None, description="Captions only: the caption.")
    metadata: dict[str, Any] | None
    strength: Strength | None = Field(None, description="How strong the match is (re-ranked results only).")
    explain: Explanation | None = Field(None, description="Why it matched (when explain was asked).")


WEAK = Field(description="true when the best result is weak (or there is none): probably no good match here.")
FILTER_MATCHES = Field(None, description="Items the filter matched (when a filter was given).")


PARTIAL = Field(False, description="`python -m service.cluster` only: true when some shards did not answer in time.")
MISSING_SHARDS = Field(default_factory=list, description="`python -m service.cluster` only: the shards left out.")


class TextSearchResponse(Closed):
    results: list[Result]
    weak: bool = WEAK
    filter_matches: int | None = FILTER_MATCHES
    timings_ms: dict[str, float] = Field(
        description="Milliseconds per stage: queue (waiting for a worker, batch_wait included), batch_wait "
        "(gathering the batch), encode (the batch's encoder forward), encode_share (encode / batch size), "
        "filter (the rows a metadata filter keeps), first_stage, rerank, strength (an index without a strength "
        "calibration: the query against its reference sample), explain, total."
    )
    stage: Literal["rerank"]
    index_version: str
    query: str
    k: int
    candidates: int
    partial: bool = PARTIAL
    missing_shards: list[int] = MISSING_SHARDS


class ImageSearchResponse(Closed):
    results: list[Result]
    weak: bool | None = Field(None, description="As for text searches; target=captions only.")
    filter_matches: int | None = FILTER_MATCHES
    timings_ms: dict[str, float]
    stage: Literal["rerank", "first_stage_only"]
    target: Target
    index_version: str
    k: int
    candidates: int
    partial: bool = PARTIAL
    missing_shards: list[int] = MISSING_SHARDS


class IndexInfo(Closed):
    version: str
    images: int
    captions: int
    loaded_at: float
    model_identity: str
    refused_versions: dict[str, str]
    manifest: dict[str, Any]


class ReloadResponse(Closed):
    changed: bool
    version: str | None
    previous: str | None
