"""Every kind of bad request gets a 4xx JSON error naming the problem, never a 500 or a traceback.

The module's server runs with HAT_MAX_UPLOAD_BYTES=200000 and HAT_MAX_IMAGE_PIXELS=1000000.
"""

from __future__ import annotations

import io
import json

import httpx
import pytest
from live_server import metric
from PIL import Image

from service.dependencies import get_settings
from service.settings import Settings


def _error(r: httpx.Response, status: int, code: str | None = None) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert error["message"] and "Traceback" not in error["message"]
    if code:
        assert error["code"] == code, error
    return error["message"]


def _png(size=(64, 64), color="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("body", "status", "code", "says"),
    [
        ({"query": ""}, 422, "empty_query", "empty"),
        ({"query": " \t\n "}, 422, "empty_query", "empty"),
        ({"query": "x" * 1001}, 422, "query_too_long", "1001 characters"),
        ({"query": "cat", "k": 0}, 422, "invalid_parameter", "k must be between 1 and 100"),
        ({"query": "cat", "k": 101}, 422, "invalid_parameter", "k must be between 1 and 100"),
        ({"query": "cat", "k": -5}, 422, "invalid_parameter", "got -5"),
        ({"query": "cat", "candidates": 0}, 422, "invalid_parameter", "candidates must be between 1 and 1000"),
        ({"query": "cat", "candidates": 1001}, 422, "invalid_parameter", "candidates"),
        ({"query": "cat", "k": "5"}, 422, "validation_error", "k:"),
        ({"query": "cat", "k": 2.5}, 422, "validation_error", "k:"),
        ({"query": "cat", "k": True}, 422, "validation_error", "k:"),
        ({"query": "cat", "candidates": None}, 200, None, None),
        ({"query": 42}, 422, "validation_error", "query:"),
        ({"query": ["a"]}, 422, "validation_error", "query:"),
        ({"k": 3}, 422, "validation_error", "query: field required"),
        ({"query": "cat", "topk": 3}, 422, "validation_error", "topk: unknown field"),
        ([{"query": "cat"}], 422, "validation_error", "JSON object"),
        ("cat", 422, "validation_error", "JSON object"),
    ],
)
def test_text_search_bad_bodies(client, body, status, code, says):
    r = client.post("/search/text", json=body)
    if status == 200:
        assert r.status_code == 200, r.text
        return
    assert says in _error(r, status, code)


@pytest.mark.parametrize("raw", [b"{bad json", b"", b'{"query": "cat",}', b"\xff\xfe"])
def test_invalid_json_is_400(client, raw):
    r = client.post("/search/text", content=raw, headers={"content-type": "application/json"})
    assert "JSON" in _error(r, 400, "invalid_json")


def test_wrong_content_types_are_415(client):
    r = client.post("/search/text", data={"query": "cat"})
    assert "application/json" in _error(r, 415, "unsupported_media_type")
    r = client.post("/search/text", content=b'{"query": "cat"}')  # no content type at all
    _error(r, 415, "unsupported_media_type")
    r = client.post("/search/image", json={"image": "abc"})
    assert "multipart/form-data" in _error(r, 415, "unsupported_media_type")


def test_unknown_route_and_wrong_method(client):
    assert "/nowhere" in _error(client.get("/nowhere"), 404, "not_found")
    _error(client.post("/search"), 404, "not_found")
    r = client.get("/search/text")
    assert "GET" in _error(r, 405, "method_not_allowed") and "POST" in r.headers["allow"]
    _error(client.delete("/images/test_00001"), 405, "method_not_allowed")


def _upload(client, content: bytes, name="q.png", **data) -> httpx.Response:
    return client.post("/search/image", files={"image": (name, content, "image/png")}, data=data)


def test_image_search_form_errors(client):
    r = client.post("/search/image", data={"k": "3"}, files={"other": ("x.png", _png())})
    _error(r, 422, "validation_error")
    r = client.post("/search/image", files={"k": (None, "3")})  # a multipart body without the image
    assert "image: field required" in _error(r, 422, "validation_error")
    r = client.post("/search/image", files={"image": (None, "not a file")})
    assert "file upload" in _error(r, 422, "validation_error")
    assert "k: must be an integer" in _error(_upload(client, _png(), k="ten"), 422, "validation_error")
    assert "k must be between" in _error(_upload(client, _png(), k="0"), 422, "invalid_parameter")
    assert "candidates must be" in _error(_upload(client, _png(), candidates="5000"), 422, "invalid_parameter")
    assert "target" in _error(_upload(client, _png(), target="video"), 422, "validation_error")
    assert "target" in _error(_upload(client, _png(), target=""), 422, "validation_error")
    for odd in (" 5", "5 ", "1_0", "\u0665", "+5", "5.0", "", "9" * 31):  # integers are ASCII digits, as in JSON
        assert "k: must be an integer" in _error(_upload(client, _png(), k=odd), 422, "validation_error"), odd
    r = client.post("/search/image", files=[("image", ("a.png", _png())), ("image", ("b.png", _png()))])
    _error(r, 400, "bad_request")


def test_non_image_and_corrupt_uploads(client):
    assert "not a readable image" in _error(_upload(client, b"hello, I am text", "a.txt"), 415, "unsupported_image")
    assert "empty" in _error(_upload(client, b""), 422, "invalid_image")
    png = _png((100, 100))
    _error(_upload(client, png[: len(png) // 2]), 422, "invalid_image")  # truncated
    corrupt = png[:40] + bytes(len(png) - 40)  # the signature, then chunks of zeros: no format accepts it
    _error(_upload(client, corrupt), 415, "unsupported_image")


def test_decompression_bomb_is_refused_from_the_header(client):
    bomb = _png((1200, 1000))  # 1.2 Mpixel > HAT_MAX_IMAGE_PIXELS of this server; a few kB of PNG
    assert len(bomb) < 20_000
    assert "1200x1000" in _error(_upload(client, bomb), 413, "image_too_large")


def test_upload_over_the_limit_by_content_length(client):
    r = _upload(client, b"\0" * 400_000)
    assert "200000" in _error(r, 413, "payload_too_large")


def test_upload_between_the_limit_and_the_form_allowance(client):
    r = _upload(client, b"\0" * 230_000)  # body passes the form allowance; the image part itself is too big
    assert "200000 bytes (HAT_MAX_UPLOAD_BYTES)" in _error(r, 413, "payload_too_large")


def test_upload_over_the_limit_while_streaming_without_length(server):
    """A chunked body that never says its length is cut off once the count passes the limit."""
    sent = 0

    def body():
        nonlocal sent
        head = b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n\r\n'
        yield head
        for _ in range(200):  # up to 3.2 MB
            sent += 16384
            yield b"\0" * 16384

    with server.client() as c:
        try:
            r = c.post("/search/image", content=body(), headers={"content-type": "multipart/form-data; boundary=xyz"})
        except httpx.TransportError:
            pytest.fail("the server should answer 413, not drop the connection")
    assert "content-length" not in r.request.headers
    _error(r, 413, "payload_too_large")


def test_oversized_json_body_is_413(client):
    r = client.post(
        "/search/text", content=json.dumps({"query": "x" * 100_000}), headers={"content-type": "application/json"}
    )
    _error(r, 413, "payload_too_large")


def test_bad_content_length_is_400(server):
    """A malformed Content-Length (sent over a raw socket: httpx refuses to send one) is a 400."""
    reply = server.raw(b"POST /search/text HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 12abc\r\nConnection: close\r\n\r\n{}")  # fmt: skip
    assert reply.startswith(b"HTTP/1.1 400")


def test_admin_reload_needs_the_key(client):
    assert _error(client.post("/admin/reload"), 403, "forbidden")
    _error(client.post("/admin/reload", headers={"X-Admin-Key": "wrong"}), 403, "forbidden")
    _error(client.post("/admin/reload", headers={"X-Admin-Key": "test-key2"}), 403, "forbidden")
    _error(client.post("/admin/reload", headers={"X-Admin-Key": "test-ke"}), 403, "forbidden")
    r = client.post("/admin/reload", headers={"X-Admin-Key": "test-key"})
    assert r.status_code == 200 and r.json()["changed"] is False


def test_admin_endpoints_are_off_without_a_key(server, client, index_root):
    """Settings reach the handlers through a dependency: overriding it turns the admin endpoint off."""
    app = server.app
    app.dependency_overrides[get_settings] = lambda: Settings(index_root=str(index_root))
    try:
        r = client.post("/admin/reload", headers={"X-Admin-Key": "test-key"})
        assert "HAT_ADMIN_KEY" in _error(r, 404, "not_found")
    finally:
        app.dependency_overrides.clear()


def test_settings_override_changes_limits(server, client, index_root):
    server.app.dependency_overrides[get_settings] = lambda: Settings(index_root=str(index_root), max_k=5, default_k=5,
                                                                     max_query_chars=10)  # fmt: skip
    try:
        assert "between 1 and 5" in _error(client.post("/search/text", json={"query": "cat", "k": 6}), 422)
        assert "limit is 10" in _error(client.post("/search/text", json={"query": "a" * 11}), 422, "query_too_long")
    finally:
        server.app.dependency_overrides.clear()


def test_cors_is_closed_by_default(client):
    r = client.options(
        "/search/text", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in r.headers
    r = client.post("/search/text", json={"query": "cat", "k": 1}, headers={"Origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_allows_configured_origins(start_server, index_root):
    live = start_server(index_root=str(index_root), cors_origins=("https://ok.example",))
    live.wait_ready()
    with live.client() as c:
        r = c.options("/search/text", headers={"Origin": "https://ok.example", "Access-Control-Request-Method": "POST"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://ok.example"
        r = c.options(
            "/search/text", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
        )
        assert r.headers.get("access-control-allow-origin") != "https://evil.example"


def test_errors_are_counted(client):
    client.get("/nowhere-else")
    text = client.get("/metrics").text
    assert metric(text, "hat_http_requests_total", route="<unmatched>", method="GET", status="404") >= 1
    assert metric(text, "hat_http_errors_total", route="<unmatched>", code="not_found") >= 1


def test_page_and_script(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    for element in ('id="query"', 'id="search-button"', 'id="results"', 'id="image-input"', 'src="/page.js"'):
        assert element in r.text
    js = client.get("/page.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"] and "/search/text" in js.text
    assert "innerHTML" not in js.text  # results are written with textContent only
