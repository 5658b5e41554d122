"""Corrupt index versions: refused with a clear, logged reason; the previous version keeps serving.

The reliability issue's four kinds of corruption (plus a truncated row table, a second kind of truncation):
a truncated feature store, a manifest of an unknown format version, an index built by another model (model
identity mismatch), and a missing FAISS file. Each broken version is made the way a real one could end up on
disk: a good version is copied under ``versions/`` to a new name, the copy is broken, and ``current`` is moved
to it atomically, as ``index_format.IndexRoot.publish`` does (a new symlink renamed over the old one).

Part one: a server on a good version is shown each broken version; it must keep answering from the good one,
list the refused version in ``/index`` with a reason naming the problem, and log that reason. Part two: a
server whose root's only version is broken stays alive (``/healthz`` 200), is not ready (``/readyz`` 503 with
the reason), answers searches with a JSON 503, and picks up a good version published later.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import httpx
import pytest
from live_server import poll
from PIL import Image

KINDS = ["truncated_feature_table", "truncated_row_table", "unknown_format_version", "model_mismatch", "missing_faiss"]


# ------------------------------------------------------------------------------------------------ helpers


def _current_name(root: Path) -> str:
    return Path(os.readlink(root / "current")).name


def _point_current(root: Path, name: str) -> None:
    """Move ``current`` to ``versions/NAME`` atomically, as the builder publishes (symlink, then rename)."""
    link = root / f".current-test-{uuid.uuid4().hex[:8]}"
    os.symlink(os.path.join("versions", name), link)
    os.replace(link, root / "current")


def _read_manifest(version_dir: Path) -> dict:
    return json.loads((version_dir / "manifest.json").read_text())


def _write_manifest(version_dir: Path, manifest: dict) -> None:
    (version_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _copy_version(source: Path, root: Path, name: str) -> Path:
    """Copy the version directory ``source`` to ``root/versions/NAME`` (its manifest renamed to match)."""
    target = root / "versions" / name
    tmp = root / "versions" / f".tmp-{name}"
    shutil.copytree(source, tmp)
    manifest = _read_manifest(tmp)
    manifest["version"] = name
    _write_manifest(tmp, manifest)
    os.rename(tmp, target)
    return target


def _break(kind: str, version: Path, root: Path) -> str:
    """Break the copied ``version`` in the way ``kind`` says; returns a fragment the refusal must name."""
    manifest = _read_manifest(version)
    if kind == "truncated_feature_table":
        # Segments are shared between versions: give the broken version its own copy of the segment and
        # truncate a token feature table there, so the good version's files stay intact.
        segment = manifest["segments"][0]
        own = f"{segment}-broken-{version.name}"
        shutil.copytree(root / "segments" / segment, root / "segments" / own)
        tables = sorted(p for p in (root / "segments" / own).glob("image.l1.*.npy") if ".norms." not in p.name)
        assert tables, "no image feature table in the segment"
        data = tables[0].read_bytes()
        tables[0].write_bytes(data[: len(data) // 2])
        manifest["segments"] = [own]
        _write_manifest(version, manifest)
        return tables[0].name
    if kind == "truncated_row_table":
        rows = version / "image_rows.npy"
        data = rows.read_bytes()
        rows.write_bytes(data[: len(data) // 2])
        return "row tables"
    if kind == "unknown_format_version":
        manifest["format_version"] = 999
        _write_manifest(version, manifest)
        return "format version 999"
    if kind == "model_mismatch":
        manifest["model"]["identity"] = "f" * 64
        _write_manifest(version, manifest)
        return "built by model ffffffffffff"
    if kind == "missing_faiss":
        (version / "images.faiss").unlink()
        return "images.faiss"
    raise AssertionError(kind)


_poll = functools.partial(poll, timeout=30, interval=0.05)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (96, 96), "blue").save(buf, "PNG")
    return buf.getvalue()


def _refusals_counted(client: httpx.Client) -> int:
    text = client.get("/metrics").text
    match = re.search(r'^hat_index_reloads_total\{result="refused"\} (\S+)$', text, re.MULTILINE)
    return int(float(match.group(1))) if match else 0


def _refusal_logged(caplog, name: str, fragment: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "service" and r.levelno >= logging.ERROR and name in r.getMessage() and fragment in r.getMessage()
    ]


# ------------------------------------------------------------------------------- part one: a running server


@pytest.fixture(scope="module")
def serving(start_server, index_root):
    """A ready server polling ``current`` every 0.1 s, and the good version it serves."""
    live = start_server(index_root=str(index_root), reload_interval=0.1, admin_key="k")
    good = live.wait_ready()["index_version"]
    return live, good, _current_name(index_root)


@pytest.mark.parametrize("kind", KINDS)
def test_broken_version_is_refused_and_the_previous_keeps_serving(kind, serving, index_root, caplog):
    caplog.set_level(logging.INFO, logger="service")
    live, good, good_name = serving
    name = f"v-broken-{kind.replace('_', '-')}"
    fragment = _break(kind, _copy_version(index_root / "versions" / good_name, index_root, name), index_root)
    with live.client() as c:
        refusals_before = _refusals_counted(c)
    _point_current(index_root, name)
    try:
        with live.client() as c:
            info = _poll(lambda: (body := c.get("/index").json()) and name in body["refused_versions"] and body)
            reason = info["refused_versions"][name]
            assert fragment in reason, reason
            assert info["version"] == good
            # Searches keep answering from the previous version.
            r = c.post("/search/text", json={"query": "a red circle left of a blue square", "k": 3})
            assert r.status_code == 200, r.text
            assert r.json()["index_version"] == good and len(r.json()["results"]) == 3
            r = c.post("/search/image", files={"image": ("q.png", _png())}, data={"k": "2"})
            assert r.status_code == 200, r.text
            assert r.json()["index_version"] == good and len(r.json()["results"]) == 2
            hit = c.get(r.json()["results"][0]["image_url"])
            assert hit.status_code == 200 and hit.headers["content-type"] == "image/png"
            ready = c.get("/readyz")
            assert ready.status_code == 200 and ready.json()["index_version"] == good
            # An explicit reload retries the broken version and answers 409 with the same reason.
            r = c.post("/admin/reload", headers={"X-Admin-Key": "k"})
            assert r.status_code == 409 and r.json()["error"]["code"] == "index_refused", r.text
            assert fragment in r.json()["error"]["message"] and name in r.json()["error"]["message"]
            assert c.post("/search/text", json={"query": "a green star", "k": 1}).json()["index_version"] == good
            # Counted twice (the poller's refusal, then the explicit reload's), and not retried by the poller.
            time.sleep(0.5)
            assert _refusals_counted(c) == refusals_before + 2
            assert name in c.get("/index").json()["refused_versions"]
        logged = _refusal_logged(caplog, name, fragment)
        assert logged, [r.getMessage() for r in caplog.records]
        assert "refused" in logged[0]
    finally:
        _point_current(index_root, good_name)


# ------------------------------------------------------------------------- part two: no valid index at start


def _root_with_only(kind: str, index_root: Path, tmp_path: Path) -> tuple[Path, str, str]:
    """A new index root whose one published version is a broken copy of ``index_root``'s current version."""
    root = tmp_path / "root"
    (root / "versions").mkdir(parents=True)
    shutil.copytree(index_root / "segments", root / "segments")
    name = f"v-only-{kind.replace('_', '-')}"
    fragment = _break(kind, _copy_version(index_root / "versions" / _current_name(index_root), root, name), root)
    _point_current(root, name)
    return root, name, fragment


@pytest.mark.parametrize("kind", KINDS)
def test_start_with_only_a_broken_version_is_alive_not_ready_and_says_why(
    kind, start_server, index_root, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="service")
    root, name, fragment = _root_with_only(kind, index_root, tmp_path)
    live = start_server(index_root=str(root), reload_interval=0.1)
    with live.client() as c:
        r = _poll(lambda: (resp := c.get("/readyz")) and fragment in resp.text and resp)
        body = r.json()
        assert r.status_code == 503 and body["ready"] is False, r.text
        assert body["error"]["code"] == "not_ready"
        assert "no index loaded" in body["reason"] and fragment in body["reason"], body
        health = c.get("/healthz")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        searches = [
            c.post("/search/text", json={"query": "a red circle", "k": 3}),
            c.post("/search/image", files={"image": ("q.png", _png())}),
            c.get("/index"),
        ]
        for resp in searches:
            assert resp.status_code == 503, resp.text
            assert resp.headers["content-type"].startswith("application/json")
            error = resp.json()["error"]
            assert error["code"] == "not_ready" and fragment in error["message"], error
        assert "hat_ready 0.0" in c.get("/metrics").text
    assert _refusal_logged(caplog, name, fragment), [r.getMessage() for r in caplog.records]


def test_start_with_only_a_broken_version_then_a_good_one_is_published(start_server, index_root, tmp_path):
    root, name, fragment = _root_with_only("missing_faiss", index_root, tmp_path)
    live = start_server(index_root=str(root), reload_interval=0.1)
    with live.client() as c:
        _poll(lambda: (resp := c.get("/readyz")) and resp.status_code == 503 and fragment in resp.text)
        good = "v-published-later"
        _copy_version(index_root / "versions" / _current_name(index_root), root, good)
        _point_current(root, good)
        ready = _poll(lambda: (resp := c.get("/readyz")) and resp.status_code == 200 and resp.json())
        assert ready["index_version"] == good
        r = c.post("/search/text", json={"query": "a red circle", "k": 3})
        assert r.status_code == 200 and r.json()["index_version"] == good and len(r.json()["results"]) == 3
        info = c.get("/index").json()
        assert info["version"] == good and fragment in info["refused_versions"][name]
