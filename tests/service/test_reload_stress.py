"""Hot reload under load, repeated: the gallery is rebuilt and published 5 times (`make stress`; 2 in the short
run) by the real builder CLI while client threads search by text and by image. Zero failed requests, and every
answer comes whole from one index version: all its ids belong to the gallery of the version it names.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest
from live_server import ClientThreads

pytestmark = pytest.mark.stress


class Recorder(ClientThreads):
    """Client threads searching back to back; every answer is kept as (version, kind, ids, image ids)."""

    join_timeout = 120.0

    def __init__(self, url: str, image: bytes, clients: int) -> None:
        self.url, self.image = url, image
        self.answers: list[tuple[str, str, list[str], list[str]]] = []
        super().__init__(clients)

    def _run(self, n: int) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as c:
            i = n
            while not self.stop.is_set():
                i += 1
                try:
                    if i % 3:
                        r = c.post("/search/text", json={"query": "a small green circle above a star", "k": 30})
                        kind = "text"
                    else:
                        r = c.post("/search/image", files={"image": ("q.png", self.image)}, data={"k": "30"})
                        kind = "image"
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                    continue
                if r.status_code != 200:
                    self.failures.append(f"{kind}: {r.status_code} {r.text[:200]}")
                    continue
                body = r.json()
                ids = [x["id"] for x in body["results"]]
                images = [x.get("image_id") or x["id"] for x in body["results"]]
                self.answers.append((body["index_version"], kind, ids, images))


def test_five_publishes_under_load(start_server, index_root, world, run_builder, stress_full, report_figures):
    rebuilds, clients = (5, 8) if stress_full else (2, 4)
    live = start_server(index_root=str(index_root), reload_interval=0.2, reload_grace=0.5)
    first = live.wait_ready()["index_version"]
    galleries = {first: set(world["base_ids"])}  # version -> image ids
    all_items = list(world["items"].values())
    image = Path(world["items"]["test_00002"]["image"]).read_bytes()
    published, pickup_s = [], []
    started = time.monotonic()
    with Recorder(live.url, image, clients) as load:
        for step in range(rebuilds):
            items = [item for i, item in enumerate(all_items) if i != step]  # 43 images, a different one left out
            manifest = world["dir"] / f"reload-stress-{step}.jsonl"  # beside the images: inside the gallery root
            manifest.write_text("".join(json.dumps(item) + "\n" for item in items))
            run_builder("build", "--gallery", str(manifest), "--model", str(world["model"]), "--out",
                        str(index_root), "--no-progress", "--keep", "2")  # fmt: skip
            version = os.readlink(index_root / "current").split("/")[-1]
            assert version not in galleries
            galleries[version] = {item["id"] for item in items}
            published.append(version)
            t0 = time.monotonic()
            while live.wait_ready()["index_version"] != version:
                assert time.monotonic() - t0 < 30, f"{version} was not picked up"
                time.sleep(0.02)
            pickup_s.append(round(time.monotonic() - t0, 3))
            answered = len(load.answers)
            while len(load.answers) < answered + 2 * clients:  # let every client get answers from this version
                assert time.monotonic() - t0 < 120, "no answers after the reload"
                time.sleep(0.05)
    seconds = time.monotonic() - started

    partial = []
    by_version: dict[str, int] = {}
    for version, kind, ids, images in load.answers:
        by_version[version] = by_version.get(version, 0) + 1
        gallery = galleries.get(version)
        if gallery is None or not set(images) <= gallery or len(ids) != 30 or len(set(ids)) != len(ids):
            partial.append((version, kind, sorted(set(images) - (gallery or set()))[:3], len(ids)))
    report_figures({
        "rebuilds": rebuilds, "clients": clients, "seconds": round(seconds, 1), "requests": len(load.answers),
        "failed": len(load.failures), "answers_by_version": by_version, "pickup_after_publish_s": pickup_s,
        "answers_not_from_one_version": len(partial),
    })  # fmt: skip
    assert not load.failures, load.failures[:5]
    assert not partial, partial[:5]
    assert all(by_version.get(v, 0) > 0 for v in [first, *published]), by_version
