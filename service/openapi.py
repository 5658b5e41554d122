"""What the OpenAPI schema (``GET /openapi.json``) promises: request bodies with the limits of the running
settings, and every response each route can give, errors included.

The models here only document; the routes build their responses themselves. ``tests/service`` checks real
responses against these schemas, and the fuzzing run (docs/reliability.md) checks every generated request's
response against them, so a field added to a response without being added here fails the tests.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .settings import Settings

IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Strict):
    field: str = Field(description="The field at fault (dotted path), or 'body'.")
    message: str
    type: str = Field(description="The validator's error type, e.g. 'missing', 'extra_forbidden'.")


class ErrorInfo(_Strict):
    code: str = Field(description="Stable machine-readable code, e.g. 'empty_query', 'payload_too_large'.")
    message: str = Field(description="What is wrong, naming the field or limit.")
    details: list[ErrorDetail] | None = Field(None, description="Every validation problem (validation errors only).")


class ErrorResponse(_Strict):
    error: ErrorInfo


class NotReadyResponse(_Strict):
    ready: Literal[False]
    reason: str | None
    error: ErrorInfo


class ReadyResponse(_Strict):
    ready: Literal[True]
    index_version: str
    model: str = Field(description="The loaded model's identity (a hash of its weights and configuration).")


class HealthResponse(_Strict):
    status: Literal["ok"]


class Result(_Strict):
    id: str = Field(description="Image id, or caption id for image -> captions.")
    score: float = Field(description="The HAT score (or the first-stage score where no re-rank ran).")
    first_stage_score: float = Field(description="The global-vector inner product from FAISS.")
    rank: int = Field(ge=1)
    image_url: str | None = Field(description="/images/<id>; null for a caption of a text-only corpus.")
    image_id: str | None = Field(None, description="Captions only: the image the caption belongs to.")
    text: str | None = Field(None, description="Captions only: the caption.")
    metadata: dict[str, Any] | None


class TextSearchResponse(_Strict):
    results: list[Result]
    timings_ms: dict[str, float] = Field(description="Milliseconds per stage: queue, encode, first_stage, "
                                         "rerank, total.")
    stage: Literal["rerank"]
    index_version: str
    query: str
    k: int
    candidates: int


class ImageSearchResponse(_Strict):
    results: list[Result]
    timings_ms: dict[str, float]
    stage: Literal["rerank", "first_stage_only"]
    target: Literal["captions", "image"]
    index_version: str
    k: int
    candidates: int


class IndexInfo(_Strict):
    version: str
    images: int
    captions: int
    loaded_at: float
    model_identity: str
    refused_versions: dict[str, str]
    manifest: dict[str, Any]


class ReloadResponse(_Strict):
    changed: bool
    version: str | None
    previous: str | None


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "model": ErrorResponse}


NOT_READY = {"description": "Not ready: the model or an index is not loaded (the message says why).",
             "model": ErrorResponse}


def responses(*statuses: int, ok: type[BaseModel] | None = None, **overrides: dict) -> dict[int | str, dict]:
    """The ``responses=`` of a route: its 200 model and the listed error statuses."""
    texts = {
        400: "Malformed request: broken JSON or a bad Content-Length.",
        403: "Missing or wrong X-Admin-Key.",
        404: "No such thing (the message says what).",
        409: "The request cannot be done in the current state (the message says why).",
        413: "Body, upload or decoded image larger than the limits.",
        415: "Wrong Content-Type, or an upload that is not a readable image.",
        422: "A field is missing, unknown, of the wrong type or out of range (the message names it).",
    }
    out: dict[int | str, dict] = {}
    if ok is not None:
        out[200] = {"model": ok, "description": "Success."}
    for status in statuses:
        out[status] = NOT_READY if status == 503 else _error(texts[status])
    out.update(overrides)
    return out


def _bounded_int(low: int, high: int, description: str) -> dict[str, Any]:
    return {"anyOf": [{"type": "integer", "minimum": low, "maximum": high}, {"type": "null"}],
            "description": description}


def _request_body(media_type: str, title: str, required: list[str], properties: dict[str, Any]) -> dict[str, Any]:
    """A required request body of one media type: a closed object schema (no properties beyond these)."""
    schema = {
        "type": "object",
        "title": title,
        "additionalProperties": False,
        "required": required,
        "properties": properties,
    }
    return {"required": True, "content": {media_type: {"schema": schema}}}


def text_request_body(settings: Settings) -> dict[str, Any]:
    """``POST /search/text``'s body, with the limits of these settings."""
    return _request_body(
        "application/json",
        "TextSearchRequest",
        ["query"],
        {
            "query": {
                "type": "string",
                "minLength": 1,
                "maxLength": settings.max_query_chars,
                "pattern": r"\S",
                "description": "The caption to search for (not blank; HAT_MAX_QUERY_CHARS at most).",
            },
            "k": _bounded_int(1, settings.max_k, f"Results to return (default HAT_DEFAULT_K = {settings.default_k})."),
            "candidates": _bounded_int(
                1, settings.max_candidates,
                f"First-stage candidates to re-rank, raised to k if smaller (default {settings.default_candidates}).",
            ),
        },
    )


def image_request_body(settings: Settings) -> dict[str, Any]:
    """``POST /search/image``'s multipart form, with the limits of these settings."""
    return _request_body(
        "multipart/form-data",
        "ImageSearchForm",
        ["image"],
        {
            "image": {
                "type": "string",
                "format": "binary",
                "description": f"The image file (JPEG, PNG, WebP, GIF, BMP, TIFF; at most {settings.max_upload_bytes} "
                f"bytes and {settings.max_image_pixels} pixels).",
            },
            "k": {"type": "integer", "minimum": 1, "maximum": settings.max_k},
            "candidates": {"type": "integer", "minimum": 1, "maximum": settings.max_candidates},
            "target": {"type": "string", "enum": ["captions", "image"], "default": "captions"},
        },
    )


IMAGE_FILE_OK = {
    "description": "The gallery image file, as stored.",
    "content": {media: {"schema": {"type": "string", "format": "binary"}} for media in IMAGE_MEDIA_TYPES},
}
ADMIN_KEY_PARAMETER = {
    "name": "X-Admin-Key",
    "in": "header",
    "required": True,
    "schema": {"type": "string"},
    "description": "The key set with HAT_ADMIN_KEY (the route is off, 404, when none is set).",
}
