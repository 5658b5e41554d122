"""Parsing and checking search requests; every refusal is a ``ServiceError`` with a 4xx status and a message."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Request
from pydantic import BaseModel, BeforeValidator, ConfigDict, StrictInt, StrictStr, ValidationError
from starlette.datastructures import UploadFile

from .errors import BodyTooLargeError, ServiceError
from .search import SearchParams
from .settings import Settings

FORM_FIELDS = {"image", "k", "candidates", "target"}
_FORM_INT = re.compile(r"-?[0-9]{1,30}")
TARGETS = ("captions", "image")


def _json_integer(value: Any) -> Any:
    """JSON Schema's integers: ``3`` and ``3.0`` (a number with no fraction), never ``true``, ``"3"`` or ``3.5``."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


JsonInt = Annotated[StrictInt, BeforeValidator(_json_integer)]


class TextSearchRequest(BaseModel):
    """Body of ``POST /search/text``; ``k`` and ``candidates`` default to HAT_DEFAULT_K / HAT_DEFAULT_CANDIDATES."""

    model_config = ConfigDict(extra="forbid")

    query: StrictStr
    k: JsonInt | None = None
    candidates: JsonInt | None = None


@dataclass(frozen=True)
class ImageForm:
    data: bytes
    target: str
    params: SearchParams


def validation_details(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pydantic/FastAPI errors -> ``[{"field", "message", "type"}]`` (the message names the field)."""
    details = []
    for err in errors:
        loc = [str(part) for part in err.get("loc", ()) if part != "body"]
        field_name = ".".join(loc) or "body"
        message = err.get("msg", "invalid value")
        if err.get("type") == "missing":
            message = f"{field_name}: field required"
        elif err.get("type") == "extra_forbidden":
            message = f"{field_name}: unknown field"
        else:
            message = f"{field_name}: {message}"
        details.append({"field": field_name, "message": message, "type": err.get("type", "")})
    return details or [{"field": "body", "message": "invalid request", "type": ""}]


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def parse_json_body(request: Request) -> TextSearchRequest:
    """The JSON body as a ``TextSearchRequest``: 415 for another content type, 400 for broken JSON, else 422."""
    media_type = _media_type(request)
    if media_type != "application/json":
        raise ServiceError(
            415, "unsupported_media_type", f"send the query as application/json, not {media_type or 'no content type'}"
        )
    body = await request.body()
    try:
        return TextSearchRequest.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        if any(e.get("type") == "json_invalid" for e in errors):
            raise ServiceError(400, "invalid_json", f"the body is not valid JSON ({errors[0]['msg']})") from None
        if any(e.get("type") == "model_type" for e in errors):
            raise ServiceError(422, "validation_error", "the body must be a JSON object with a 'query'") from None
        details = validation_details(errors)
        raise ServiceError(422, "validation_error", details[0]["message"], details) from None


def check_query(query: str, settings: Settings) -> str:
    """The query with outer whitespace removed; refuses empty and overlong queries (422)."""
    if len(query) > settings.max_query_chars:
        raise ServiceError(
            422, "query_too_long", f"query is {len(query)} characters; the limit is {settings.max_query_chars}"
        )
    text = query.strip()
    if not text:
        raise ServiceError(422, "empty_query", "query is empty")
    return text


def search_params(k: int | None, candidates: int | None, settings: Settings) -> SearchParams:
    """Checks ``1 <= k <= HAT_MAX_K`` and ``1 <= candidates <= HAT_MAX_CANDIDATES``; raises candidates to k."""
    k = settings.default_k if k is None else k
    candidates = settings.default_candidates if candidates is None else candidates
    if not 1 <= k <= settings.max_k:
        raise ServiceError(422, "invalid_parameter", f"k must be between 1 and {settings.max_k}, got {k}")
    if not 1 <= candidates <= settings.max_candidates:
        raise ServiceError(
            422, "invalid_parameter", f"candidates must be between 1 and {settings.max_candidates}, got {candidates}"
        )
    # Fewer candidates than results cannot fill the page: re-rank at least k (documented in docs/service.md).
    return SearchParams(k=k, candidates=max(candidates, k), rerank_dtype=settings.rerank_dtype)


def upload_limit_message(settings: Settings) -> str:
    return f"the uploaded image is larger than the limit of {settings.max_upload_bytes} bytes (HAT_MAX_UPLOAD_BYTES)"


def _form_int(form, name: str) -> int | None:
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ServiceError(422, "validation_error", f"{name}: must be a plain form field, not a file")
    # ASCII digits only, as an integer is written in JSON: int() would also take " 5", "1_0" and "٥"
    if not _FORM_INT.fullmatch(value):
        raise ServiceError(422, "validation_error", f"{name}: must be an integer, got {value[:40]!r}")
    return int(value)


async def parse_image_form(request: Request, settings: Settings) -> ImageForm:
    """The multipart upload: field ``image`` (a file) and optional ``k``, ``candidates``, ``target``."""
    media_type = _media_type(request)
    if media_type != "multipart/form-data":
        raise ServiceError(
            415,
            "unsupported_media_type",
            f"upload the image as multipart/form-data, not {media_type or 'no content type'}",
        )
    form = await request.form(max_files=1, max_fields=len(FORM_FIELDS), max_part_size=64 * 1024)
    try:
        unknown = sorted(set(form.keys()) - FORM_FIELDS)
        if unknown:
            raise ServiceError(422, "validation_error", f"{unknown[0]}: unknown field (expected {sorted(FORM_FIELDS)})")
        upload = form.get("image")
        if upload is None:
            raise ServiceError(422, "validation_error", "image: field required (a multipart file field named 'image')")
        if not isinstance(upload, UploadFile):
            raise ServiceError(422, "validation_error", "image: must be a file upload, not a text field")
        data = await upload.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise BodyTooLargeError(upload_limit_message(settings))
        if not data:
            raise ServiceError(422, "invalid_image", "image: the uploaded file is empty")
        target = form.get("target", "captions")
        if target not in TARGETS:
            got = str(target)[:40]
            raise ServiceError(422, "validation_error", f"target: must be 'captions' or 'image', got {got!r}")
        params = search_params(_form_int(form, "k"), _form_int(form, "candidates"), settings)
        return ImageForm(data=data, target=target, params=params)
    finally:
        await form.close()
