"""The search page: ``GET /``, its script ``GET /page.js`` and an empty ``GET /favicon.ico`` (not in the schema)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from ..page import PAGE_HEADERS, PAGE_HTML, PAGE_JS

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> HTMLResponse:
    """The search page."""
    return HTMLResponse(PAGE_HTML, headers=PAGE_HEADERS)


@router.get("/page.js")
async def page_js() -> Response:
    """The page's script."""
    return Response(PAGE_JS, media_type="text/javascript; charset=utf-8", headers=PAGE_HEADERS)


@router.get("/favicon.ico")
async def favicon() -> Response:
    """No icon; answering keeps browsers' automatic request out of the 404s."""
    return Response(status_code=204)
