"""The API's interactive documentation, ``GET /docs`` (Swagger UI), with its script, style sheet and icon served
by the service itself from the ``fastapi-offline`` package (``GET /docs/assets/{name}``): it works on a machine
with no network, and the page loads nothing from anywhere else. No ReDoc page: one description is enough.

The page's headers are the search page's, but for what Swagger UI needs: its one inline script (it starts the
UI) allowed by its SHA-256 hash, style sheets from the service, and ``data:`` images (icons in its CSS).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from ..errors import ServiceError

router = APIRouter(include_in_schema=False)
ASSETS_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"
# The files the page needs, with their media types: nothing else under ASSETS_DIR is served.
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon.png": "image/png",
}
ASSET_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "public, max-age=3600"}
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def docs_headers(html: str) -> dict[str, str]:
    """The page's security headers: scripts from the service plus the page's own inline ones, by hash."""
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"
        for script in _INLINE_SCRIPT.findall(html)
    )
    policy = (
        f"default-src 'none'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    )
    return {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff"}


@functools.lru_cache(maxsize=4)
def _page(title: str, openapi_url: str) -> tuple[str, dict[str, str]]:
    html = get_swagger_ui_html(
        openapi_url=openapi_url,
        title=f"{title} - API",
        swagger_js_url="/docs/assets/swagger-ui-bundle.js",
        swagger_css_url="/docs/assets/swagger-ui.css",
        swagger_favicon_url="/docs/assets/favicon.png",
        swagger_ui_parameters={"validatorUrl": None},  # never ask the public validator about the schema
    ).body.decode()
    return html, docs_headers(html)


@router.get("/docs")
async def docs(request: Request) -> HTMLResponse:
    """Swagger UI over ``/openapi.json``."""
    html, headers = _page(request.app.title, request.app.openapi_url or "/openapi.json")
    return HTMLResponse(html, headers=headers)


@router.get("/docs/assets/{name}")
async def docs_asset(name: str) -> FileResponse:
    """One of the page's files (``ASSETS``)."""
    if name not in ASSETS:
        raise ServiceError(404, "not_found", f"no such file: /docs/assets/{name}")
    return FileResponse(ASSETS_DIR / name, media_type=ASSETS[name], headers=ASSET_HEADERS)
