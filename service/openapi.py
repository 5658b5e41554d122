"""What the OpenAPI schema (``GET /openapi.json``) promises beyond what FastAPI derives from the routes: every
response each route can give, errors included, and the request bodies, which the routes read through
dependencies, generated from their models (service/schemas.py) with the limits of the running settings.

The fuzzing run (tests/service/test_fuzz.py, docs/reliability.md) checks every generated request's response
against this schema; tests/service/test_openapi_contract.py keeps its paths, statuses and fields from changing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from .errors import ErrorResponse
from .schemas import RequestLimits
from .settings import Settings

IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff")
ERROR_TEXTS = {
    400: "Malformed request: broken JSON or a bad Content-Length.",
    403: "Missing or wrong X-Admin-Key.",
    404: "No such thing (the message says what).",
    409: "The request cannot be done in the current state (the message says why).",
    413: "Body, upload or decoded image larger than the limits.",
    415: "Wrong Content-Type, or an upload that is not a readable image.",
    422: "A field is missing, unknown, of the wrong type or out of range (the message names it).",
    503: "Not ready: the model or an index is not loaded (the message says why); or, with `HAT_PROCESSES`, the "
    "search process computing this request died (`search_process_failed`: try again).",
}
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
# (path, method) -> (media type, limits -> the model of the body)
RequestBodies = Mapping[tuple[str, str], tuple[str, Callable[[RequestLimits], type[BaseModel]]]]


def responses(*statuses: int, ok: type[BaseModel] | None = None, **overrides: dict) -> dict[int | str, dict]:
    """The ``responses=`` of a route: its 200 model and the listed error statuses."""
    out: dict[int | str, dict] = {}
    if ok is not None:
        out[200] = {"model": ok, "description": "Success."}
    for status in statuses:
        out[status] = {"description": ERROR_TEXTS[status], "model": ErrorResponse}
    out.update(overrides)
    return out


def request_body(media_type: str, model: type[BaseModel]) -> dict[str, Any]:
    """A required request body of one media type, with the JSON schema of ``model``."""
    return {"required": True, "content": {media_type: {"schema": model.model_json_schema()}}}


def document_request_bodies(app: FastAPI, settings: Settings, bodies: RequestBodies) -> None:
    """Make ``app.openapi()`` (FastAPI's schema, made once) describe the request body of each operation in
    ``bodies`` with its model under the limits of ``settings``."""
    limits = RequestLimits.of(settings)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for (path, method), (media_type, model_for) in bodies.items():
                schema["paths"][path][method]["requestBody"] = request_body(media_type, model_for(limits))
        return app.openapi_schema

    app.openapi = openapi  # the documented way to change FastAPI's schema
