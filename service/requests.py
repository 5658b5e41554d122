"""Reading search requests into their models (service/schemas.py); every refusal is a ``ServiceError`` with a
4xx status and a message.

The models do the checking; this module turns their errors into the service's error codes. Some checks stay
here because they concern the transport, not the body's shape, or because pydantic would answer them with
another status or code than the API promises: the content type (415), broken JSON (400), a body that is not
an object, unknown form fields (the message lists the expected ones), and the image part of the form (a file,
at most ``HAT_MAX_UPLOAD_BYTES``: 413, not empty).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from index_format import check_filter

from .dependencies import SettingsDep
from .errors import BodyTooLargeError, ServiceError
from .schemas import RequestLimits, image_form_model, text_request_model
from .search import SearchParams
from .settings import Settings

FORM_FIELDS = ("candidates", "explain", "filter", "image", "k", "target")


@dataclass(frozen=True)
class TextQuery:
    """A checked ``POST /search/text``: the query (outer whitespace removed) and what to return."""

    query: str
    params: SearchParams


@dataclass(frozen=True)
class ImageQuery:
    """A checked ``POST /search/image``: the uploaded bytes, ``captions`` or ``image``, and what to return."""

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


def search_params(body: Any, limits: RequestLimits, filter_json: str | None = None) -> SearchParams:
    """A checked body's ``k`` and ``candidates`` (already in range) with the defaults for None, candidates raised
    to k; its filter (a form's is JSON text) and ``explain``."""
    k = limits.default_k if body.k is None else body.k
    candidates = limits.default_candidates if body.candidates is None else body.candidates
    flt = json.loads(filter_json) if filter_json is not None else getattr(body, "filter", None)
    # Fewer candidates than results cannot fill the page: re-rank at least k (documented in docs/service.md).
    # An empty filter {} filters nothing.
    return SearchParams(k=k, candidates=max(candidates, k), filter=check_filter(flt) if flt else None,
                        explain=body.explain)  # fmt: skip


def upload_limit_message(settings: Settings) -> str:
    """What a 413 for an image upload says."""
    return f"the uploaded image is larger than the limit of {settings.max_upload_bytes} bytes (HAT_MAX_UPLOAD_BYTES)"


def _refusal(err: dict[str, Any], limits: RequestLimits) -> ServiceError | None:
    """The service's own error for a failed check of a limit (its code and message), None for the others."""
    field, kind, got = (err["loc"] or ("",))[0], err["type"], err.get("input")
    if field == "query" and kind == "string_too_long":
        return ServiceError(
            422, "query_too_long", f"query is {len(got)} characters; the limit is {limits.max_query_chars}"
        )
    if field == "query" and kind in ("string_too_short", "string_pattern_mismatch", "empty_query"):
        return ServiceError(422, "empty_query", "query is empty")
    if field == "filter" and kind == "invalid_filter":
        return ServiceError(422, "invalid_filter", err["msg"])
    if field in ("k", "candidates") and kind in ("greater_than_equal", "less_than_equal"):
        high = limits.max_k if field == "k" else limits.max_candidates
        return ServiceError(422, "invalid_parameter", f"{field} must be between 1 and {high}, got {got}")
    return None


def _worded(err: dict[str, Any]) -> dict[str, Any]:
    """``err`` with the service's wording where it has its own (a choice: what is allowed and what came)."""
    if err["type"] == "literal_error":
        return {**err, "msg": f"must be {err['ctx']['expected']}, got {str(err.get('input'))[:40]!r}"}
    return err


def _refuse(exc: ValidationError, limits: RequestLimits, details: bool) -> ServiceError:
    """The error to answer for ``exc``: a shape error first (wrong type, missing, unknown), as
    ``validation_error`` (with ``details`` when asked), else the first limit in field order."""
    errors = exc.errors(include_url=False)
    refusals = [_refusal(err, limits) for err in errors]
    shape = [_worded(err) for err, refusal in zip(errors, refusals, strict=True) if refusal is None]
    if shape:
        found = validation_details(shape)
        return ServiceError(422, "validation_error", found[0]["message"], found if details else None)
    return next(r for r in refusals if r is not None)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_text_query(request: Request, settings: SettingsDep) -> TextQuery:
    """The JSON body of ``POST /search/text``: 415 for another content type, 400 for broken JSON, else 422."""
    media_type = _media_type(request)
    if media_type != "application/json":
        raise ServiceError(
            415, "unsupported_media_type", f"send the query as application/json, not {media_type or 'no content type'}"
        )
    limits = RequestLimits.of(settings)
    try:
        body = text_request_model(limits).model_validate_json(await request.body())
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        if any(e.get("type") == "json_invalid" for e in errors):
            raise ServiceError(400, "invalid_json", f"the body is not valid JSON ({errors[0]['msg']})") from None
        if any(e.get("type") == "model_type" for e in errors):
            raise ServiceError(422, "validation_error", "the body must be a JSON object with a 'query'") from None
        raise _refuse(exc, limits, details=True) from None
    return TextQuery(query=body.query, params=search_params(body, limits))


async def _upload(form: Any, settings: Settings) -> bytes:
    """The bytes of the form's ``image`` file, checked: present, a file, not over the limit (413), not empty."""
    unknown = sorted(set(form.keys()) - set(FORM_FIELDS))
    if unknown:
        raise ServiceError(422, "validation_error", f"{unknown[0]}: unknown field (expected {list(FORM_FIELDS)})")
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
    return data


async def read_image_query(request: Request, settings: SettingsDep) -> ImageQuery:
    """The multipart form of ``POST /search/image``: ``image`` (a file) and optional ``k``, ``candidates``,
    ``target``."""
    media_type = _media_type(request)
    if media_type != "multipart/form-data":
        raise ServiceError(
            415,
            "unsupported_media_type",
            f"upload the image as multipart/form-data, not {media_type or 'no content type'}",
        )
    limits = RequestLimits.of(settings)
    form = await request.form(max_files=1, max_fields=len(FORM_FIELDS), max_part_size=64 * 1024)
    try:
        fields = {name: form.get(name) for name in form if name != "image"}
        data = await _upload(form, settings)
        try:
            body = image_form_model(limits).model_validate({**fields, "image": data})
        except ValidationError as exc:
            raise _refuse(exc, limits, details=False) from None
        if body.explain and body.target == "image":
            raise ServiceError(
                422, "invalid_parameter", "explain: image -> image results are not re-ranked; use target=captions"
            )
        return ImageQuery(data=data, target=body.target, params=search_params(body, limits, body.filter))
    finally:
        await form.close()


TextQueryDep = Annotated[TextQuery, Depends(read_text_query)]
ImageQueryDep = Annotated[ImageQuery, Depends(read_image_query)]
