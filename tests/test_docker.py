"""`docker compose up` end to end: build the image, start the api on an empty volume (first start generates the
demo gallery and builds its index), search by text and by image, re-index with the `index-builder` service and
see the running api serve the new version, then `docker compose down -v`.

Needs a reachable Docker engine with Compose v2 (`../shared/tools/docker-engine.sh` sets one up on Debian);
skipped with a loud reason otherwise. A cold build downloads torch and its CUDA libraries from PyPI (several
GB); later runs reuse the cached layers. The CPU image is built once a session (fixture `hat_image`, shared
with test_docker_ray.py); each rebuild retags `hat-search:latest` / `hat-search:gpu`, and at the end of the
session the images a rebuild left untagged and the build cache above 15 GB are removed (fixture
`docker_engine`), so repeated CI runs do not fill the disk.
"""

from __future__ import annotations

import json
import subprocess
import time

import httpx
import pytest
from docker_helpers import compose_project

pytestmark = pytest.mark.slow

READY_TIMEOUT = 900  # first start: 1,000 generated scenes and their index on a small CPU
REINDEX_TIMEOUT = 900
RELOAD_TIMEOUT = 120  # the api polls `current` every 2 s


@pytest.fixture(scope="module")
def compose(hat_image):
    with compose_project("hat-search-test", "tools") as c:
        yield c


def test_compose_up_search_reindex_down(compose):
    compose("up", "-d", "api", timeout=300)

    compose.wait_healthy("api", READY_TIMEOUT)

    with httpx.Client(base_url=compose.base_url, timeout=60) as http:
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

        job = compose.run_job("index-builder", "--profile", "tools", timeout=REINDEX_TIMEOUT)
        assert job.returncode == 0, f"{job.stdout[-2000:]}\n{job.stderr[-2000:]}"
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

    compose.build("api", *gpu)
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
