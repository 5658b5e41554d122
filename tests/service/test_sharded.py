"""A sharded root served by ``python -m service``'s app: the same answers as the unsharded index.

Both indexes are built by the real builder from the same 44-image gallery (``--shards 3`` and without, both
``--store float16``), and searched over HTTP. With every image a candidate both searches are exhaustive, so
they must agree exactly; with few candidates each shard re-ranks its own, so the sharded answers are at least
as good at every rank and every score is that id's own HAT score.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from index_format import open_index, shard_of

TOL = 1e-5


@pytest.fixture(scope="module")
def sharded_copy(sharded_root, tmp_path_factory) -> Path:
    """This module's own copy (one test adds to it)."""
    root = tmp_path_factory.mktemp("sharded-copy") / "root"
    shutil.copytree(sharded_root, root, symlinks=True, ignore=shutil.ignore_patterns(".lock"))
    return root


@pytest.fixture(scope="module")
def servers(start_server, float16_root, sharded_copy):
    plain = start_server(index_root=str(float16_root), max_k=1000)  # exhaustive answers: every caption
    sharded = start_server(index_root=str(sharded_copy), max_k=1000)
    plain.wait_ready()
    sharded.wait_ready()
    return plain, sharded


def _text(server, query: str, k: int, candidates: int) -> list[dict]:
    with server.client() as c:
        r = c.post("/search/text", json={"query": query, "k": k, "candidates": candidates})
    assert r.status_code == 200, r.text
    return r.json()["results"]


def _image(server, path: str, k: int, candidates: int) -> list[dict]:
    with server.client() as c:
        r = c.post("/search/image", files={"image": Path(path).read_bytes()}, data={"k": k, "candidates": candidates})
    assert r.status_code == 200, r.text
    return r.json()["results"]


def test_every_image_in_exactly_one_shard(world, sharded_root):
    index = open_index(sharded_root)
    try:
        assert len(index.parts) == 3
        held = [
            {item["id"] for item in part.images(range(part.num_images))} for part in index.parts
        ]
        assert sum(map(len, held)) == len(world["base_ids"]) == index.num_images
        for s, ids in enumerate(held):
            assert ids and all(shard_of(i, 3) == s for i in ids)
        assert index.num_captions == 5 * len(world["base_ids"])
        assert index.image_by_id(world["odd_id"])["id"] == world["odd_id"]
    finally:
        index.close()


def test_exhaustive_searches_agree_exactly(world, servers):
    plain, sharded = servers
    n = len(world["base_ids"])
    for image_id in world["base_ids"][:6]:
        query = world["items"][image_id]["captions"][0]
        want, got = _text(plain, query, n, n), _text(sharded, query, n, n)
        assert [r["id"] for r in got] == [r["id"] for r in want] or _tied(want, got)
        for a, b in zip(want, got, strict=True):
            assert abs(a["score"] - b["score"]) <= TOL


def _tied(want: list[dict], got: list[dict]) -> bool:
    """Same scores rank by rank (only equal scores may swap places)."""
    return all(abs(a["score"] - b["score"]) <= TOL for a, b in zip(want, got, strict=True))


@pytest.mark.parametrize("kind", ["text", "image"])
def test_few_candidates_at_least_as_good(world, servers, kind):
    """Each shard re-ranks its own top candidates: at every rank the sharded score is >= the unsharded one, and
    every returned score is that id's HAT score (from an exhaustive unsharded search)."""
    plain, _ = servers
    n_images = len(world["base_ids"])
    for image_id in world["base_ids"][10:16]:
        item = world["items"][image_id]
        if kind == "text":
            few_plain, few_sharded = (_text(s, item["captions"][1], 5, 6) for s in servers)
            full = {r["id"]: r["score"] for r in _text(plain, item["captions"][1], n_images, n_images)}
        else:
            few_plain, few_sharded = (_image(s, item["image"], 5, 8) for s in servers)
            full = {r["id"]: r["score"] for r in _image(plain, item["image"], 5 * n_images, 5 * n_images)}
        assert len(few_sharded) == len(few_plain) == 5
        for a, b in zip(few_plain, few_sharded, strict=True):
            assert b["score"] >= a["score"] - TOL
        for r in few_sharded:
            assert abs(r["score"] - full[r["id"]]) <= TOL
        assert [r["rank"] for r in few_sharded] == [1, 2, 3, 4, 5]


def test_index_info_and_image_files(world, servers):
    _, sharded = servers
    with sharded.client() as c:
        info = c.get("/index").json()
        assert info["images"] == len(world["base_ids"])
        assert info["version"].count("=") == 3 and info["manifest"]["sharded"]["shards"] == 3
        from urllib.parse import quote

        r = c.get("/images/" + quote(world["odd_id"], safe=""))
        assert r.status_code == 200 and r.content == Path(world["items"][world["odd_id"]]["image"]).read_bytes()


def test_a_new_shard_version_is_served(world, servers, sharded_copy, run_builder):
    """Hot reload: ``add`` publishes new versions of the shards that get new ids; the service picks them up."""
    _, sharded = servers
    extra = [item for i, item in world["items"].items() if i not in set(world["base_ids"])]
    manifest = world["dir"] / "extra.jsonl"  # beside the images (the gallery-root rule)
    manifest.write_text("".join(json.dumps(item) + "\n" for item in extra))
    proc = run_builder("add", "--gallery", str(manifest), "--model", str(world["model"]), "--out", str(sharded_copy),
                "--no-progress")  # fmt: skip
    assert json.loads(proc.stdout)["indexed"] == len(extra)
    new_id = extra[0]["id"]

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with sharded.client() as c:
            if c.get("/index").json()["images"] == len(world["items"]):
                break
        time.sleep(0.2)
    n = len(world["items"])
    found = {r["id"] for r in _text(sharded, world["items"][new_id]["captions"][0], n, n)}
    assert found == set(world["items"])  # the new images are searched, the old ones still are
