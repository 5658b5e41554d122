"""Liveness and readiness: the service is alive at once and says why it is not ready until it is."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from live_server import poll

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




def test_cli_serves_without_an_index_then_picks_one_up(tmp_path, index_root):
    """``python -m service`` on an empty root: alive, 503 with the reason; ready once an index is published."""
    root = tmp_path / "root"
    root.mkdir()
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAT_")}
    env.update(HAT_INDEX_ROOT=str(root), HAT_PORT=str(port), HAT_RELOAD_INTERVAL="0.2", HAT_LOG_LEVEL="warning")
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        health = poll(lambda: httpx.get(f"{url}/healthz", timeout=5))
        assert health.status_code == 200 and health.json() == {"status": "ok"}

        def not_ready_without_index():
            r = httpx.get(f"{url}/readyz", timeout=5)
            return r if "nothing published" in r.text else None

        r = poll(not_ready_without_index)
        body = r.json()
        assert r.status_code == 503 and body["ready"] is False and str(root) in body["reason"]
        assert body["error"]["code"] == "not_ready"
        search = httpx.post(f"{url}/search/text", json={"query": "a red circle"}, timeout=10)
        assert search.status_code == 503 and "nothing published" in search.json()["error"]["message"]
        assert httpx.get(f"{url}/metrics", timeout=5).text.count("hat_ready 0.0") == 1

        for part in ("versions", "segments"):  # publish: data first, then the `current` pointer
            shutil.copytree(index_root / part, root / part, symlinks=True)
        os.symlink(os.readlink(index_root / "current"), root / "current")
        ready = poll(lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200, timeout=30)
        assert ready
        hits = httpx.post(f"{url}/search/text", json={"query": "a red circle", "k": 3}, timeout=30)
        assert hits.status_code == 200 and len(hits.json()["results"]) == 3
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "Traceback" not in out, out


def test_not_ready_without_an_index_root(start_server):
    live = start_server(index_root=None)
    with live.client() as c:
        r = poll(lambda: (resp := c.get("/readyz")) and "HAT_INDEX_ROOT" in resp.text and resp)
        assert r.status_code == 503 and "HAT_INDEX_ROOT is not set" in r.json()["reason"]
        assert c.get("/healthz").status_code == 200
        for resp in (c.get("/index"), c.get("/images/test_00001"), c.post("/search/text", json={"query": "x"}),
                     c.post("/search/image", files={"image": ("a.png", b"x")})):  # fmt: skip
            assert resp.status_code == 503 and resp.json()["error"]["code"] == "not_ready", resp.text


def test_model_that_fails_to_load_is_reported(start_server, index_root, tmp_path):
    live = start_server(index_root=str(index_root), loaded_model=None, model=str(tmp_path / "no-such-model"))
    with live.client() as c:
        r = poll(lambda: (resp := c.get("/readyz")) and "failed" in resp.text and resp)
        assert r.status_code == 503 and "no-such-model" in r.json()["reason"]
        assert c.get("/healthz").status_code == 200


def test_index_of_another_model_is_refused_once(start_server, index_root, tmp_path):
    """An index built by a different model is refused with the reason, and not retried in a loop."""
    root = tmp_path / "other"
    shutil.copytree(index_root, root, symlinks=True)
    manifest_path = root / "current" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["model"]["identity"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    live = start_server(index_root=str(root), reload_interval=0.05)
    with live.client() as c:
        r = poll(lambda: (resp := c.get("/readyz")) and "built by model" in resp.text and resp)
        assert r.status_code == 503 and "rebuild the index" in r.json()["reason"]
        time.sleep(0.5)  # ten poll intervals
        metrics = c.get("/metrics").text
        assert 'hat_index_reloads_total{result="refused"} 1' in metrics
        assert "hat_index_refused_versions 1.0" in metrics
