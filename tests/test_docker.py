"""`docker compose up` end to end: build the image, start the api on an empty volume (first start generates the
demo gallery and builds its index), search by text and by image, re-index with the `index-builder` service and
see the running api serve the new version, then `docker compose down -v`.

Needs a reachable Docker engine with Compose v2 (`../shared/tools/docker-engine.sh` sets one up on Debian);
skipped with a loud reason otherwise. A cold build downloads torch and its CUDA libraries from PyPI (several
GB); later runs reuse the cached layers. Each rebuild retags `hat-search:latest` / `hat-search:gpu`; the image a
rebuild left untagged is removed afterwards (only that one), so repeated CI runs do not fill the disk.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT = 3600  # a cold build downloads torch + CUDA wheels
READY_TIMEOUT = 900  # first start: 1,000 generated scenes and their index on a small CPU
REINDEX_TIMEOUT = 900
RELOAD_TIMEOUT = 120  # the api polls `current` every 2 s
TAGS = ("hat-search:latest", "hat-search:gpu")
# The build cache kept after the test: enough for the dependency layers of both images (so the next run is
# warm), not every rebuild's (50 GB of cache once filled the disk halfway through a CI run).
BUILD_CACHE_KEPT = "15GB"


def _image_id(tag: str) -> str | None:
    done = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", tag], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def _remove_superseded(before: dict[str, str | None]) -> None:
    """Remove the images our tags pointed at before the test if a rebuild moved the tags off them."""
    for tag, old in before.items():
        if old and old != _image_id(tag):
            # fails harmlessly when another tag or a container still uses the image
            subprocess.run(["docker", "image", "rm", old], capture_output=True, text=True, timeout=300)


def _docker_problem() -> str | None:
    if shutil.which("docker") is None:
        return "no `docker` command on PATH"
    for args in (["docker", "info"], ["docker", "compose", "version"]):
        try:
            done = subprocess.run(args, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"`{' '.join(args)}` failed: {exc}"
        if done.returncode != 0:
            return f"`{' '.join(args)}` exited {done.returncode}: {(done.stderr or done.stdout).strip()[-300:]}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Compose:
    def __init__(self, project: str, port: int) -> None:
        self.project = project
        self.env = {**os.environ, "HAT_PUBLISH_PORT": str(port)}

    def __call__(self, *args: str, timeout: float, check: bool = True) -> subprocess.CompletedProcess:
        cmd = ["docker", "compose", "-p", self.project, *args]
        done = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            tail = f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
            raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}:\n{tail}")
        return done

    def health(self) -> str:
        cid = self("ps", "-q", "api", timeout=60).stdout.strip()
        if not cid:
            return "no container"
        done = subprocess.run(
            ["docker", "inspect", "--format", "{{json .State}}", cid], capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            return "gone"
        state = json.loads(done.stdout)
        if state.get("Status") != "running":
            return f"{state.get('Status')} (exit {state.get('ExitCode')})"
        return (state.get("Health") or {}).get("Status", "no healthcheck")


@pytest.fixture(scope="module")
def compose():
    problem = _docker_problem()
    if problem:
        pytest.skip(
            f"DOCKER ENGINE NOT REACHABLE: {problem}. The docker compose end-to-end test did not run; "
            "set up an engine with ../shared/tools/docker-engine.sh (as root) to run it."
        )
    c = Compose(f"hat-search-test-{uuid.uuid4().hex[:8]}", _free_port())
    before = {tag: _image_id(tag) for tag in TAGS}
    try:
        yield c
    finally:
        logs = c("logs", "--no-color", "--tail", "60", timeout=120, check=False)
        print(f"--- docker compose logs (last lines) ---\n{logs.stdout}{logs.stderr}")
        c("--profile", "tools", "down", "-v", "--remove-orphans", timeout=300, check=False)
        _remove_superseded(before)
        subprocess.run(["docker", "builder", "prune", "-f", "--keep-storage", BUILD_CACHE_KEPT],
                       capture_output=True, text=True, timeout=600)  # fmt: skip


def test_compose_up_search_reindex_down(compose):
    compose("build", "api", timeout=BUILD_TIMEOUT)
    compose("up", "-d", "api", timeout=300)

    deadline = time.monotonic() + READY_TIMEOUT
    while (status := compose.health()) != "healthy":
        assert status in ("starting", "unhealthy"), f"api container: {status}"
        assert time.monotonic() < deadline, f"api not healthy after {READY_TIMEOUT} s (last: {status})"
        time.sleep(5)

    base = f"http://127.0.0.1:{compose.env['HAT_PUBLISH_PORT']}"
    with httpx.Client(base_url=base, timeout=60) as http:
        ready = http.get("/readyz")
        assert ready.status_code == 200, ready.text
        first = http.get("/index").json()
        assert first["images"] == 1000, first

        text = http.post("/search/text", json={"query": "a red circle left of a blue square", "k": 5})
        assert text.status_code == 200, text.text
        body = text.json()
        assert len(body["results"]) == 5 and body["index_version"] == first["version"]

        image = http.get(body["results"][0]["image_url"])
        assert image.status_code == 200 and image.content
        found = http.post("/search/image", files={"image": ("q.png", image.content, "image/png")}, data={"k": "5"})
        assert found.status_code == 200, found.text
        assert len(found.json()["results"]) == 5

        compose("--profile", "tools", "run", "--rm", "index-builder", timeout=REINDEX_TIMEOUT)
        deadline = time.monotonic() + RELOAD_TIMEOUT
        while (now := http.get("/index").json())["version"] == first["version"]:
            assert time.monotonic() < deadline, f"the api still serves {first['version']} after re-indexing"
            time.sleep(2)
        assert now["images"] == 1000 and not now["refused_versions"], now
        again = http.post("/search/text", json={"query": "a red circle", "k": 3}).json()
        assert again["index_version"] == now["version"]


def test_gpu_image_builds_and_its_compose_variant_validates(compose):
    """The GPU image (VARIANT=gpu: faiss-gpu) builds and imports; it cannot run a GPU here (none present)."""
    gpu = ["-f", "docker-compose.yml", "-f", "docker-compose.gpu.yml"]
    config = json.loads(compose(*gpu, "--profile", "tools", "config", "--format", "json", timeout=60).stdout)
    for name in ("api", "index-builder"):
        service = config["services"][name]
        assert service["image"] == "hat-search:gpu" and service["build"]["args"]["VARIANT"] == "gpu", service
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"], devices
    assert config["services"]["api"]["environment"]["HAT_DEVICE"] == "cuda"

    compose(*gpu, "build", "api", timeout=BUILD_TIMEOUT)
    probe = (
        "import faiss, os, torch; "
        "assert hasattr(faiss, 'StandardGpuResources'), 'faiss without GPU support'; "
        "assert os.environ['HAT_IMAGE_VARIANT'] == 'gpu'; "
        "print(faiss.__version__, faiss.get_num_gpus(), torch.__version__, torch.version.cuda)"
    )
    done = subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "python", "hat-search:gpu", "-c", probe],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    faiss_version, gpus, torch_version, cuda = done.stdout.split()
    assert faiss_version == "1.15.1" and gpus == "0" and torch_version.startswith("2.14.1") and cuda.startswith("13")
