"""Fixtures of the service tests: a generated gallery, an index built by the real builder, live servers.

Servers are real uvicorn servers on a loopback port (``tests/live_server.py``), talked to over the socket with
httpx. In-process servers (a thread each) share one loaded model, so a new server costs a fraction of a second;
the command-line tests start ``python -m service`` as a subprocess.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_server import LiveServer

from service.app import create_app
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO / "models" / "demo"
BASE_IMAGES = 40  # the first index; the reload test publishes a second one with all WORLD_IMAGES
WORLD_IMAGES = 44
ODD_ID = "set a/ünï cödé?#%.png"  # one id that needs URL encoding (slash, space, non-ASCII, ?, #, %)


def _run_builder(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m index_builder ARGS``; fails the test with the builder's output when it fails."""
    cmd = [sys.executable, "-m", "index_builder", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"index builder failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def run_builder():
    """``run_builder(*args)``: ``python -m index_builder ARGS``, failing the test with its output on error."""
    return _run_builder


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> dict:
    """The generated world (44 test images, 5 captions each) and JSONL manifests for the builder."""
    out = tmp_path_factory.mktemp("world")
    subprocess.run(
        [sys.executable, "-m", "training.synthetic", "--out", str(out), "--seed", "0",
         "--train", "0", "--val", "0", "--test", str(WORLD_IMAGES)],
        cwd=REPO, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    images = json.loads((out / "dataset.json").read_text())["images"]
    items = [
        {
            "id": ODD_ID if i == BASE_IMAGES - 1 else Path(im["filename"]).stem,
            "image": str(out / "images" / im["filename"]),
            "captions": [s["raw"] for s in im["sentences"]],
            "metadata": {"split": im["split"], "n": i},
        }
        for i, im in enumerate(images)
    ]
    manifests = {}
    for name, subset in (("base", items[:BASE_IMAGES]), ("all", items)):
        manifests[name] = out / f"{name}.jsonl"
        manifests[name].write_text("".join(json.dumps(item) + "\n" for item in subset))
    return {
        "dir": out,
        "items": {item["id"]: item for item in items},
        "base_ids": [item["id"] for item in items[:BASE_IMAGES]],
        "manifests": manifests,
        "odd_id": ODD_ID,
        "model": DEMO_MODEL,
    }


@pytest.fixture(scope="session")
def _built_index(world, tmp_path_factory) -> Path:
    """One build of the base gallery (the slow part), copied per module by ``index_root``."""
    root = tmp_path_factory.mktemp("index-template") / "root"
    _run_builder("build", "--gallery", str(world["manifests"]["base"]), "--model", str(DEMO_MODEL),
                "--out", str(root), "--no-progress")  # fmt: skip
    return root


@pytest.fixture(scope="session")
def sharded_root(world, tmp_path_factory) -> Path:
    """The base gallery built with ``--shards 3`` (ROOT/shards/00..02), store float16.

    float16 because the sharding tests compare answers with an unsharded index's to 1e-5: under a coded store
    (pq, the default) each shard trains its own codebook on its own images, so their scores differ at the store's
    own error level (README, "Sharded serving").
    """
    root = tmp_path_factory.mktemp("sharded") / "root"
    _run_builder("build", "--gallery", str(world["manifests"]["base"]), "--model", str(DEMO_MODEL),
                 "--out", str(root), "--shards", "3", "--store", "float16", "--no-progress")  # fmt: skip
    return root


@pytest.fixture(scope="session")
def float16_root(world, tmp_path_factory) -> Path:
    """The base gallery unsharded with store float16: what ``sharded_root``'s answers are compared with."""
    root = tmp_path_factory.mktemp("float16") / "root"
    _run_builder("build", "--gallery", str(world["manifests"]["base"]), "--model", str(DEMO_MODEL),
                 "--out", str(root), "--store", "float16", "--no-progress")  # fmt: skip
    return root


@pytest.fixture(scope="module")
def index_root(_built_index, tmp_path_factory) -> Path:
    """A module's own index root (40 images, 200 captions), built by ``python -m index_builder build``."""
    root = tmp_path_factory.mktemp("index") / "root"
    shutil.copytree(_built_index, root, symlinks=True, ignore=shutil.ignore_patterns(".lock"))
    return root


@pytest.fixture(scope="session")
def demo_model():
    from model import load_model

    return load_model(DEMO_MODEL)


@pytest.fixture(scope="module")
def start_server(demo_model) -> Iterator:
    """``start_server(loaded_model=demo, **settings) -> LiveServer`` (started; stopped at the end of the module).

    ``loaded_model=None`` makes the app load ``settings.model`` itself.
    """
    servers = []

    def start(loaded_model=demo_model, **values) -> LiveServer:
        values.setdefault("reload_interval", 0.2)
        server = LiveServer(create_app(Settings(**values), model=loaded_model)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def server(start_server, index_root) -> LiveServer:
    """A ready server on the module's index, with an admin key and small upload and pixel limits."""
    live = start_server(
        index_root=str(index_root), admin_key="test-key", max_upload_bytes=200_000, max_image_pixels=1_000_000
    )
    live.wait_ready()
    return live


@pytest.fixture
def client(server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c
