"""``GET /docs`` (Swagger UI) in a real headless Chromium with every request off this machine refused: the page
must render the API's operations from the service's own files, under its security headers.

The screenshot (``docs-page.png``) goes where the search page's go: ``$HAT_PAGE_SCREENSHOTS`` (default:
``page-screenshots`` in pytest's temporary directory); the test prints where.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx
import pytest
import test_page  # the search page's browser (system Chromium through Playwright) and screenshot folder

pytestmark = pytest.mark.slow  # starts a browser

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
browser, shots = test_page.browser, test_page.shots


def test_docs_page_lists_the_operations_with_no_outside_request(browser, server, shots, capsys):
    context = browser.new_context(base_url=server.url, viewport={"width": 1280, "height": 900})
    outside, local, errors = [], [], []

    def gate(route):
        url = route.request.url
        if urlsplit(url).hostname in LOCAL_HOSTS:
            local.append(url)
            route.continue_()
        else:  # a CDN, a font service, the public schema validator: refused and recorded
            outside.append(url)
            route.abort()

    context.route("**/*", gate)
    page = context.new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)  # CSP refusals too
    try:
        page.goto("/docs")
        page.wait_for_selector(".opblock-summary-path")
        operations = {
            " ".join(text.split()) for text in page.locator(".opblock-summary").all_inner_texts()
        }  # "POST /search/text ..." per operation
        page.locator(".opblock-summary-path", has_text="/search/text").first.click()  # expands: the UI is live
        page.wait_for_selector(".opblock.is-open .opblock-section")
        page.click(".opblock.is-open .try-out__btn")  # "Try it out" sends a search from the page (connect-src)
        page.fill(".opblock.is-open textarea.body-param__text", '{"query": "a red circle", "k": 3}')
        page.click(".opblock.is-open .execute")
        status = page.wait_for_selector(".opblock.is-open .live-responses-table tr.response .response-col_status")
        answered = status.inner_text().strip()
        page.screenshot(path=str(shots / "docs-page.png"), full_page=True)
        with capsys.disabled():
            print(f"\ndocs page screenshot: {shots / 'docs-page.png'}")
    finally:
        context.close()
    assert any(op.startswith("POST /search/text") for op in operations), operations
    assert any(op.startswith("POST /search/image") for op in operations), operations
    assert any(op.startswith("GET /readyz") for op in operations), operations
    assert answered == "200", answered
    assert not outside, f"the page asked for files elsewhere: {outside}"
    assert not errors, errors
    assert any(url.endswith("/docs/assets/swagger-ui-bundle.js") for url in local), local
    assert any(url.endswith("/openapi.json") for url in local), local
    assert any(url.endswith("/search/text") for url in local), local


def test_docs_page_headers_and_assets(server):
    with httpx.Client(base_url=server.url) as c:
        page = c.get("/docs")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        scripts = next(part for part in policy.split(";") if part.strip().startswith("script-src"))
        assert "'self' 'sha256-" in scripts and "unsafe" not in scripts  # the inline start-up script by its hash
        assert "frame-ancestors 'none'" in policy and page.headers["x-content-type-options"] == "nosniff"
        assert "cdn" not in page.text.lower() and "https://" not in page.text
        for name, kind in (("swagger-ui-bundle.js", "text/javascript"), ("swagger-ui.css", "text/css"),
                           ("favicon.png", "image/png")):  # fmt: skip
            r = c.get(f"/docs/assets/{name}")
            assert r.status_code == 200 and r.headers["content-type"].startswith(kind) and len(r.content) > 1000
        for name in ("redoc.standalone.js", "..%2F__init__.py", "core.py"):
            r = c.get(f"/docs/assets/{name}")
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert c.get("/redoc").status_code == 404
