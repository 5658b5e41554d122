"""The security checklist, one or more tests per item, against real servers over loopback sockets.

1. Upload size is enforced before the body is read whole (declared lengths of 1 GB answered at once).
2. Decompression bombs are refused (pixel bombs from the header, a zip bomb, text-chunk bombs, a huge later frame).
3. Gallery ids cannot escape the gallery (traversal in every spelling; a file swapped for a symlink).
4. The admin endpoint's key is compared with ``hmac.compare_digest``.
5. CORS is closed by default, preflights included.
6. No request can make the server fetch a URL (a listener sees no connection; no HTTP client is imported).
7. Untrusted pickles are never loaded: a model file that runs code leaves the service not ready, with the
   reason. (The loaders themselves, training and the index reader: ``tests/model/test_untrusted_pickles.py``.)

The module's ``server`` runs with HAT_MAX_UPLOAD_BYTES=200000 and HAT_MAX_IMAGE_PIXELS=1000000.
"""

from __future__ import annotations

import ast
import hmac
import io
import os
import shlex
import shutil
import socket
import sqlite3
import struct
import threading
import time
import zipfile
import zlib
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
PASSWD = Path("/etc/passwd")


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response from ``sock``: (status, headers in lower case, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if "content-length" in headers:
        while len(body) < int(headers["content-length"]):
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    else:
        while chunk := sock.recv(65536):
            body += chunk
    return status, headers, body


def _raw_get(server, target: bytes) -> tuple[int, dict[str, str], bytes]:
    """``GET target`` sent byte for byte (no client normalises the path)."""
    with socket.create_connection(server.address, timeout=10) as sock:
        sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return _read_response(sock)


def _json_error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == code, r.json()
    return r.json()["error"]["message"]


def _png(size=(64, 64), color="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` and which holds no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IEND", b"")


def _upload(client: httpx.Client, content: bytes, name: str = "q.png", ctype: str = "image/png", **data):
    return client.post("/search/image", files={"image": (name, content, ctype)}, data=data)


def _still_healthy(client: httpx.Client) -> None:
    assert client.get("/healthz").status_code == 200
    r = _upload(client, _png(), k="1")
    assert r.status_code == 200 and len(r.json()["results"]) == 1, r.text


# ------------------------------------------------------------------ 1. upload size, before the body is read


@pytest.mark.parametrize(
    ("path", "content_type", "says"),
    [
        ("/search/image", "multipart/form-data; boundary=xyz", "200000 bytes (HAT_MAX_UPLOAD_BYTES)"),
        ("/search/text", "application/json", "65536 bytes"),
    ],
)
def test_huge_declared_length_is_refused_before_the_body_is_read(server, path, content_type, says):
    """1 GB declared, 4 kB sent: a 413 arrives at once, and the connection is closed, without the rest."""
    with socket.create_connection(server.address, timeout=5) as sock:
        start = time.monotonic()
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: 1000000000\r\n\r\n"
            .encode()
        )  # fmt: skip
        sock.sendall(b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n\r\n' + bytes(4096))
        status, headers, body = _read_response(sock)  # the socket's 5 s timeout fails the test if nothing comes
        elapsed = time.monotonic() - start
        try:
            closed = sock.recv(1) == b""
        except ConnectionResetError:
            closed = True
    assert status == 413 and elapsed < 5, (status, elapsed)
    assert headers["content-type"] == "application/json" and headers.get("connection") == "close"
    error = httpx.Response(413, content=body).json()["error"]
    assert error["code"] == "payload_too_large" and says in error["message"], error
    assert closed, "the server should close a connection whose body it did not read"
    # A body without a length (chunked) is cut off while it streams:
    # tests/service/test_bad_input.py::test_upload_over_the_limit_while_streaming_without_length.
    with server.client() as c:
        _still_healthy(c)


def test_huge_declared_length_is_refused_even_when_not_ready(start_server, tmp_path):
    """The limit comes before everything else: a server with nothing to search refuses the same way."""
    live = start_server(index_root=str(tmp_path / "empty"), max_upload_bytes=1000)
    with socket.create_connection(live.address, timeout=5) as sock:
        sock.sendall(b"POST /search/image HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 1000000000\r\n\r\n" + bytes(2048))  # fmt: skip
        status, _, body = _read_response(sock)
    assert status == 413 and b"payload_too_large" in body


# ----------------------------------------------------------------------------------- 2. decompression bombs


def test_pixel_bomb_header_30000_by_30000_is_413_naming_the_limit(client):
    bomb = _png_header_only(30000, 30000)
    assert len(bomb) < 100
    start = time.monotonic()
    message = _json_error(_upload(client, bomb, "bomb.png"), 413, "image_too_large")
    assert time.monotonic() - start < 5
    assert "1000000 pixels" in message and "900000000" in message, message
    _still_healthy(client)


def test_pixel_bomb_between_the_service_limit_and_pillows_is_413(client):
    message = _json_error(_upload(client, _png_header_only(5000, 5000)), 413, "image_too_large")
    assert "5000x5000" in message and "above the limit of 1000000" in message, message


def test_zip_bomb_uploaded_as_a_png_is_415_and_the_server_stays_healthy(client):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.writestr("zeros.bin", bytes(50_000_000))  # 50 MB of zeros in about 50 kB
    bomb = buf.getvalue()
    assert len(bomb) < 100_000
    start = time.monotonic()
    message = _json_error(_upload(client, bomb, "bomb.png", "image/png"), 415, "unsupported_image")
    assert "not a readable image" in message and time.monotonic() - start < 10
    _still_healthy(client)


@pytest.mark.parametrize("chunk_type", [b"zTXt", b"iCCP"])
def test_compressed_chunk_bomb_in_a_png_is_refused(client, chunk_type):
    """A small valid PNG with a compressed text / colour-profile chunk that inflates to 50 MB."""
    png = _png((32, 32))
    bomb_chunk = _chunk(chunk_type, b"name\x00\x00" + zlib.compress(bytes(50_000_000), 9))
    bomb = png[:33] + bomb_chunk + png[33:]  # after the IHDR chunk
    assert len(bomb) < 100_000
    start = time.monotonic()
    r = _upload(client, bomb, "bomb.png")
    assert time.monotonic() - start < 10
    assert r.status_code in (413, 415, 422), r.text
    assert r.json()["error"]["code"] in ("image_too_large", "unsupported_image", "invalid_image")
    _still_healthy(client)


def _gif_descriptors(data: bytes) -> list[int]:
    """Offsets of the image descriptors (0x2C) of a GIF."""
    pos, flags, found = 13, data[10], []
    if flags & 0x80:
        pos += 3 * 2 ** ((flags & 7) + 1)
    while data[pos] != 0x3B:
        if data[pos] == 0x21:  # extension: label, then sub-blocks
            pos += 2
        else:
            assert data[pos] == 0x2C
            found.append(pos)
            local = data[pos + 9]
            pos += 10 + (3 * 2 ** ((local & 7) + 1) if local & 0x80 else 0) + 1  # descriptor, table, LZW size
        while data[pos]:
            pos += data[pos] + 1
        pos += 1
    return found


def test_gif_with_a_huge_later_frame_is_searched_on_its_first_frame(client):
    """Only the first frame is decoded: a later frame declaring 30000x30000 is never allocated."""
    buf = io.BytesIO()
    first, second = Image.new("RGB", (16, 16), "red"), Image.new("RGB", (16, 16), "blue")
    first.save(buf, "GIF", save_all=True, append_images=[second])
    gif = bytearray(buf.getvalue())
    descriptors = _gif_descriptors(bytes(gif))
    assert len(descriptors) == 2
    struct.pack_into("<HHHH", gif, descriptors[1] + 1, 0, 0, 30000, 30000)
    with Image.open(io.BytesIO(bytes(gif))) as im:  # Pillow itself refuses the second frame
        assert im.size == (16, 16)
        with pytest.raises(Image.DecompressionBombError):
            im.seek(1)
    start = time.monotonic()
    r = _upload(client, bytes(gif), "anim.gif", "image/gif", k="2")
    assert r.status_code == 200 and len(r.json()["results"]) == 2, r.text
    assert time.monotonic() - start < 10


# ---------------------------------------------------------------------------------- 3. gallery ids only


TRAVERSALS = [
    b"/images/..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    b"/images/%2Fetc%2Fpasswd",
    b"/images//etc/passwd",
    b"/images/../../../../../../etc/passwd",
    b"/images/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    b"/images/..%252F..%252F..%252F..%252F..%252F..%252Fetc%252Fpasswd",
    b"/images/..%5C..%5C..%5C..%5C..%5C..%5Cetc%5Cpasswd",
    b"/images/%00",
    b"/images/test_00001%00",
    b"/images/test_00001.png%00../../../../etc/passwd",
    b"/images/file:%2F%2F%2Fetc%2Fpasswd",
]


@pytest.mark.parametrize("target", TRAVERSALS, ids=lambda t: t.decode()[8:40])
def test_traversal_ids_are_404_json_and_never_a_file(server, target):
    assert PASSWD.is_file()  # the file the traversal aims at exists, so serving it would show
    status, headers, body = _raw_get(server, target)
    assert status == 404, body[:200]
    assert headers["content-type"] == "application/json"
    assert httpx.Response(404, content=body).json()["error"]["code"] == "not_found"
    assert b"root:" not in body and PASSWD.read_bytes()[:32] not in body


def test_a_gallery_file_path_is_not_an_id(server, world):
    """The absolute path of a real gallery file, as an id, is an unknown id (ids are never joined to paths)."""
    path = world["items"]["test_00001"]["image"]
    target = b"/images/" + path.replace("/", "%2F").encode()
    status, _, body = _raw_get(server, target)
    assert status == 404 and b"not_found" in body
    assert Path(path).read_bytes()[:64] not in body


def test_raw_nul_and_control_bytes_in_the_path_never_serve_a_file(server):
    """A raw NUL in the request line is not HTTP: refused by the server's parser (a 400), never a file."""
    for target in (b"/images/\x00", b"/images/../../etc/passwd\x00.png", b"/images/a\r\x00"):
        try:
            status, _, body = _raw_get(server, target)
        except (ConnectionResetError, IndexError, ValueError):
            continue  # the connection was dropped without an answer: nothing served either
        assert status in (400, 404), (target, status)
        assert b"root:" not in body
    with server.client() as c:
        assert c.get("/healthz").status_code == 200


@pytest.fixture
def swapped_gallery(start_server, index_root, tmp_path, world):
    """A server on a copy of the index whose image ``test_00001`` lives in ``tmp_path/gallery``."""
    gallery, outside = tmp_path / "gallery", tmp_path / "outside"
    gallery.mkdir()
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_text("TOP SECRET: outside the gallery\n")
    image = gallery / "test_00001.png"
    shutil.copy(world["items"]["test_00001"]["image"], image)
    root = tmp_path / "root"
    shutil.copytree(index_root, root, symlinks=True, ignore=shutil.ignore_patterns(".lock"))
    # The builder stores each image's resolved path; point this one at the copy in our gallery folder.
    db = root / "current" / "metadata.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE images SET path = ? WHERE id = ?", (str(image.resolve()), "test_00001"))
    live = start_server(index_root=str(root))
    live.wait_ready()
    return live, image, secret


def test_an_indexed_file_swapped_for_a_symlink_outside_the_gallery_is_not_served(swapped_gallery):
    live, image, secret = swapped_gallery
    with live.client() as c:
        r = c.get("/images/test_00001")
        assert r.status_code == 200 and r.content == image.read_bytes()  # the real file is served
        image.unlink()
        image.symlink_to(secret)  # swapped after the build for a link leading outside the gallery folder
        r = c.get("/images/test_00001")
        assert b"TOP SECRET" not in r.content
        assert r.status_code == 404 and r.json()["error"]["code"] == "image_file_missing", r.text


# ------------------------------------------------------------------------------------------ 4. admin key


def test_admin_key_is_decided_by_compare_digest(server, client, monkeypatch):
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(given, expected):
        calls.append((given, expected))
        return real(given, expected)

    monkeypatch.setattr("service.routers.admin.hmac.compare_digest", spy)
    _json_error(client.post("/admin/reload", headers={"X-Admin-Key": "wrong-key"}), 403, "forbidden")
    r = client.post("/admin/reload", headers={"X-Admin-Key": "test-key"})
    assert r.status_code == 200 and r.json()["changed"] is False, r.text
    _json_error(client.post("/admin/reload"), 403, "forbidden")
    assert calls == [(b"wrong-key", b"test-key"), (b"test-key", b"test-key"), (b"", b"test-key")]

    # compare_digest's answer is what decides: inverted, the right key is refused and a wrong one accepted.
    monkeypatch.setattr("service.routers.admin.hmac.compare_digest", lambda given, expected: not real(given, expected))
    _json_error(client.post("/admin/reload", headers={"X-Admin-Key": "test-key"}), 403, "forbidden")
    assert client.post("/admin/reload", headers={"X-Admin-Key": "nope"}).status_code == 200


def test_admin_key_comparison_is_not_written_with_equality():
    """No ``==`` / ``!=`` / ``in`` comparison in service/routers/admin.py involves the admin key (timing leaks)."""
    tree = ast.parse((REPO / "service" / "routers" / "admin.py").read_text())
    leaks = [
        ast.unparse(node)
        for node in ast.walk(tree)
        if isinstance(node, ast.Compare)
        and any(isinstance(op, ast.Eq | ast.NotEq | ast.In | ast.NotIn) for op in node.ops)
        and ("admin_key" in ast.unparse(node) or "x-admin-key" in ast.unparse(node).lower())
    ]
    assert not leaks, leaks


# ------------------------------------------------------------------------------------------------ 5. CORS


@pytest.mark.parametrize(
    ("path", "request_headers"),
    [("/search/text", "content-type"), ("/search/image", "content-type"), ("/admin/reload", "x-admin-key")],
)
def test_preflight_from_an_evil_origin_gets_no_cors_headers(client, path, request_headers):
    """test_bad_input.py checks Access-Control-Allow-Origin; no Access-Control-* header may appear at all."""
    r = client.options(
        path,
        headers={
            "Origin": "https://evil.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": request_headers,
        },
    )
    assert r.status_code in (404, 405), r.text
    assert not [h for h in r.headers if h.lower().startswith("access-control-")], dict(r.headers)


def test_cors_when_enabled_never_allows_the_admin_key_header_or_credentials(start_server, index_root):
    live = start_server(index_root=str(index_root), cors_origins=("https://ok.example",), admin_key="k")
    live.wait_ready()
    with live.client() as c:
        r = c.options(
            "/admin/reload",
            headers={"Origin": "https://ok.example", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "x-admin-key"},
        )  # fmt: skip
        assert r.status_code == 400 and "x-admin-key" not in r.headers.get("access-control-allow-headers", "").lower()
        r = c.post("/search/text", json={"query": "cat", "k": 1}, headers={"Origin": "https://ok.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://ok.example"
        assert "access-control-allow-credentials" not in r.headers


# ---------------------------------------------------------------------------------------- 6. no URL fetch


class Listener:
    """A TCP listener on a free loopback port that records every connection made to it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.connections: list[tuple[str, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            self.connections.append(peer)
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def listener():
    listening = Listener()
    yield listening
    listening.close()


def test_no_request_makes_the_server_fetch_a_url(client, listener):
    url = f"http://127.0.0.1:{listener.port}/x.png"
    # The listener works: a connection to it is seen.
    socket.create_connection(("127.0.0.1", listener.port), timeout=5).close()
    deadline = time.monotonic() + 5
    while not listener.connections:
        assert time.monotonic() < deadline, "the listener did not see the test's own connection"
        time.sleep(0.01)
    listener.connections.clear()

    r = client.post("/search/text", json={"query": url, "k": 2})
    assert r.status_code == 200, r.text  # a URL is just text to search for
    _json_error(client.post("/search/text", json={"query": "cat", "url": url}), 422, "validation_error")
    _json_error(client.post("/search/text", json={"query": "cat", "image_url": url}), 422, "validation_error")
    _json_error(_upload(client, url.encode(), "x.png"), 415, "unsupported_image")  # the bytes are a URL
    r = client.post("/search/image", files={"image": (url, _png(), "image/png")}, data={"k": "1"})
    assert r.status_code == 200, r.text  # a URL as the file name is ignored
    r = client.post("/search/image", files={"image": (None, url)})  # the URL as a text field
    _json_error(r, 422, "validation_error")
    r = client.post("/search/image", files={"image": ("q.png", _png(), "image/png")}, data={"url": url})
    _json_error(r, 422, "validation_error")
    r = client.post("/search/image", files={"image_url": (None, url)})
    _json_error(r, 422, "validation_error")
    external = f'message/external-body; access-type=URL; URL="{url}"'
    r = client.post("/search/image", files={"image": ("q.png", b"", external)})
    _json_error(r, 422, "invalid_image")
    r = client.get("/images/" + url.replace("/", "%2F").replace(":", "%3A"))
    _json_error(r, 404, "not_found")
    time.sleep(0.5)  # anything the server started would have connected by now
    assert listener.connections == []


HTTP_CLIENTS = {"urllib.request", "http.client", "httpx", "requests", "aiohttp", "urllib3", "pycurl", "httplib2"}


def test_no_service_model_or_builder_module_imports_an_http_client():
    offenders = {}
    files = sorted(p for d in ("service", "model", "index_builder") for p in (REPO / d).rglob("*.py"))
    assert len(files) > 20
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("__import__", "importlib.import_module"):
                names.update(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
        bad = sorted(n for n in names if any(n == c or n.startswith(c + ".") for c in HTTP_CLIENTS))
        if bad:
            offenders[str(path.relative_to(REPO))] = bad
    assert not offenders, offenders


# ------------------------------------------------------------------------------------ 7. untrusted pickles


class _RunsCode:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.path)}",))


def test_a_model_file_that_runs_code_leaves_the_service_not_ready(start_server, index_root, tmp_path):
    """HAT_MODEL pointing at a checkpoint that would run code: refused, never unpickled; /readyz says why."""
    sentinel = tmp_path / "SENTINEL"
    evil = tmp_path / "evil.ckpt"
    t = torch.zeros(2, 2)
    torch.save({"state_dict": {"vit_model.w": t, "text_transformer.w": t, "cross_modal_image_transform.w": t},
                "hyper_parameters": {"config": {}, "args": _RunsCode(sentinel)}}, evil)  # fmt: skip
    live = start_server(index_root=str(index_root), loaded_model=None, model=str(evil))
    with live.client() as c:
        deadline = time.monotonic() + 60
        while "failed" not in (r := c.get("/readyz")).text:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.05)
        assert r.status_code == 503
        reason = r.json()["reason"]
        assert "the model failed to load" in reason and "allow_unsafe_pickle" in reason, reason
        assert c.get("/healthz").status_code == 200
        _json_error(c.post("/search/text", json={"query": "cat"}), 503, "not_ready")
    assert not sentinel.exists()
