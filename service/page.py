"""The search page served at ``/``: plain HTML (service/static/index.html), its style sheet ``/page.css`` and
its script ``/page.js`` (no inline script or style, no build step).

The HTML carries the service's request limits, and whether searches can be explained, in ``data-config`` on
``<body>`` (:func:`page_html`), so that the page asks for no more than the service takes.

Stable element ids for people and browser tests: ``#query``, ``#search-button``, ``#image-input``, ``#target``,
``#image-button``, ``#k`` (results), ``#candidates`` (matches to re-rank), ``#explain``, ``#status``,
``#timings``, ``#weak-note``, ``#partial-note``, ``#index-counts``, ``#index-model``, ``#index-version``,
``#query-preview`` (``#preview-image``, ``#preview-heatmap``), ``#explain-bar`` with ``#query-words`` (a
``.word`` button per word of a text query) and ``#level-switch``, ``#results`` (an ``ol``) and ``#more-button``.
Each hit is a ``li.result`` with ``data-id``: an ``a.frame`` holding its ``img`` (and, for an explained text
search, a ``canvas.heatmap``), a ``.score``, a ``.strength`` where the service rates the match, and for
captions a ``.caption`` (of ``.word`` buttons when an image search is explained). While a heat map is shown,
its result (or ``#query-preview``) has ``data-heatmap="WORD@LEVEL"``.
"""

from __future__ import annotations

import functools
import html
import json
from pathlib import Path

from .schemas import RequestLimits, image_form_model, text_request_model

STATIC = Path(__file__).with_name("static")

# The headers of the page, its script and style sheet, and the gallery files: scripts and styles from the
# service only, no framing.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}

PAGE_TEMPLATE = (STATIC / "index.html").read_text(encoding="utf-8")
PAGE_JS = (STATIC / "page.js").read_text(encoding="utf-8")
PAGE_CSS = (STATIC / "page.css").read_text(encoding="utf-8")


@functools.lru_cache(maxsize=16)
def page_html(limits: RequestLimits) -> str:
    """The page for a service with ``limits``: its limits and defaults, and which searches take ``explain``,
    in ``data-config``."""
    explain = {kind: "explain" in model(limits).model_fields
               for kind, model in (("text", text_request_model), ("image", image_form_model))}  # fmt: skip
    config = {
        "default_k": limits.default_k,
        "max_k": limits.max_k,
        "default_candidates": limits.default_candidates,
        "max_candidates": limits.max_candidates,
        "max_query_chars": limits.max_query_chars,
        "explain": explain,
    }
    return PAGE_TEMPLATE.replace("__CONFIG__", html.escape(json.dumps(config), quote=True))
