"""Hot reload: a rebuilt index is picked up while clients keep searching, without one failed request."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from live_server import ClientThreads, publish_while_searching

pytestmark = pytest.mark.slow  # runs the index builder (about 10-20 s on 2 CPU cores)


def _point_current(root: Path, version: str) -> None:
    """Move ``current`` atomically, as the builder does."""
    tmp = root / f".current-test-{version}"
    os.symlink(os.path.join("versions", version), tmp)
    os.replace(tmp, root / "current")


class Load(ClientThreads):
    """Client threads that search (text and image) and fetch result images in a loop, recording everything."""

    def __init__(self, url: str, image: bytes, threads: int = 2) -> None:
        self.url, self.image = url, image
        self.versions: list[str] = []
        self.requests = 0
        super().__init__(threads)

    def _run(self, n: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as c:
            i = 0
            while not self.stop.is_set():
                i += 1
                try:
                    if (i + n) % 2:
                        r = c.post("/search/text", json={"query": "a blue square left of a red circle", "k": 3})
                    else:
                        r = c.post("/search/image", files={"image": ("q.png", self.image)}, data={"k": "3"})
                    self._check(r)
                    if r.status_code == 200:
                        self.versions.append(r.json()["index_version"])
                        self._check(c.get(r.json()["results"][0]["image_url"]))
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))

    def _check(self, r: httpx.Response) -> None:
        self.requests += 1
        if r.status_code != 200:
            self.failures.append(f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text[:200]}")


def test_hot_reload_under_load(start_server, index_root, world, run_builder):
    live = start_server(index_root=str(index_root), reload_interval=0.2, reload_grace=0.5, admin_key="k")
    first = live.wait_ready()["index_version"]
    engine = live.app.state.engine
    image = Path(world["items"]["test_00002"]["image"]).read_bytes()
    with Load(live.url, image) as load:
        publish_while_searching(live, load.versions, lambda: run_builder(
            "build", "--gallery", str(world["manifests"]["all"]), "--model", str(world["model"]),
            "--out", str(index_root), "--no-progress",
        ))  # fmt: skip
    assert not load.failures, load.failures[:5]
    assert load.requests >= 20, load.requests  # the clients really were busy across the reload
    second = live.wait_ready()["index_version"]
    assert second != first and {first, second} <= set(load.versions)
    assert load.versions.index(second) > load.versions.index(first)
    with live.client() as c:
        info = c.get("/index").json()
        assert info["version"] == second and info["images"] == 44 and info["captions"] == 220
        assert c.get("/images/test_00043").status_code == 200  # only in the new version
        assert 'hat_index_reloads_total{result="success"} 2' in c.get("/metrics").text
    deadline = time.monotonic() + 10
    while engine._retiring:  # the replaced index is closed after the grace period
        assert time.monotonic() < deadline, "the old index was never closed"
        time.sleep(0.05)


def test_broken_version_is_refused_and_the_old_one_keeps_serving(start_server, index_root):
    live = start_server(index_root=str(index_root), reload_interval=0.05, admin_key="k")
    good = live.wait_ready()["index_version"]
    current = os.readlink(index_root / "current").split("/")[-1]
    broken = "v-broken-for-test"
    shutil.copytree(index_root / "versions" / current, index_root / "versions" / broken)
    faiss_file = index_root / "versions" / broken / "images.faiss"
    faiss_file.write_bytes(faiss_file.read_bytes()[:100])  # truncated
    _point_current(index_root, broken)
    with live.client() as c:
        deadline = time.monotonic() + 10
        while broken not in c.get("/index").json()["refused_versions"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # ten more polls: not retried
        metrics = c.get("/metrics").text
        assert 'hat_index_reloads_total{result="refused"} 1' in metrics
        r = c.post("/search/text", json={"query": "a green star", "k": 2})
        assert r.status_code == 200 and r.json()["index_version"] == good
        assert c.get("/readyz").json()["index_version"] == good
        reason = c.get("/index").json()["refused_versions"][broken]
        assert "images.faiss" in reason
        # An explicit reload retries it, and answers 409 with the reason.
        r = c.post("/admin/reload", headers={"X-Admin-Key": "k"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "index_refused"
        assert "images.faiss" in r.json()["error"]["message"]
        _point_current(index_root, current)  # back to the good one: nothing to change
        r = c.post("/admin/reload", headers={"X-Admin-Key": "k"})
        assert r.status_code == 200 and r.json() == {"changed": False, "version": good, "previous": good}
