"""The compose profile `ray` end to end: a Ray head and two worker containers, the `ray-build` job encoding the
demo gallery on the workers and publishing into the shared volume, and the `api` serving that version; then
`docker compose --profile ray down -v`.

Same engine needs, skip and clean-up as test_docker.py (whose image it shares: fixture `hat_image`). Prints
the wall time of the ray-build job (docs/benchmarks.md, "Building on a Ray cluster in Docker").
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from docker_helpers import Compose, compose_project, free_port

pytestmark = pytest.mark.slow

RAY = ("--profile", "ray")
WORKERS = ("ray-worker-1", "ray-worker-2")
READY_TIMEOUT = 900  # the api's first start: 1,000 generated scenes and their index
CLUSTER_TIMEOUT = 300
BUILD_JOB_TIMEOUT = 900
RELOAD_TIMEOUT = 120  # the api polls `current` every 2 s


@pytest.fixture(scope="module")
def ray_compose(hat_image):
    with compose_project("hat-search-ray-test", "ray", log_lines=40) as c:
        c.env["HAT_CLUSTER_PUBLISH_PORT"] = str(free_port())  # ray-head publishes ray-serve's HTTP entry point
        yield c


def _manifest(c: Compose, version: str) -> dict:
    done = c("exec", "-T", "api", "cat", f"/data/index/versions/{version}/manifest.json", timeout=60)
    return json.loads(done.stdout)


def test_ray_profile_builds_on_two_workers_and_api_serves_it(ray_compose):
    c = ray_compose
    # The api's first start generates the demo gallery into the shared volume (and indexes it in-process);
    # the cluster comes up meanwhile.
    c("up", "-d", "api", timeout=300)
    c(*RAY, "up", "-d", "ray-head", *WORKERS, timeout=CLUSTER_TIMEOUT)
    c.wait_healthy("api", READY_TIMEOUT)
    for name in ("ray-head", *WORKERS):
        c.wait_healthy(name, CLUSTER_TIMEOUT, *RAY)

    with httpx.Client(base_url=c.base_url, timeout=60) as http:
        first = http.get("/index").json()
        assert first["images"] == 1000, first

        # A failing build fails the job: non-zero exit status, the live index untouched.
        bad = c.run_job("ray-build", *RAY, timeout=BUILD_JOB_TIMEOUT,
                        env={"HAT_BUILD_GALLERY": "/data/no-such-gallery.jsonl"})  # fmt: skip
        assert bad.returncode != 0, bad.stdout[-2000:]
        assert "no-such-gallery" in bad.stderr, bad.stderr[-2000:]
        assert http.get("/index").json()["version"] == first["version"]

        started = time.monotonic()
        done = c.run_job("ray-build", *RAY, timeout=BUILD_JOB_TIMEOUT)
        wall_s = time.monotonic() - started
        assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"\nray-build job: {wall_s:.1f} s wall (start of the container to its exit, cluster up); "
              f"builder's own figure {summary['seconds']} s; summary {json.dumps(summary)}")  # fmt: skip
        assert summary["indexed"] == 1000 and summary["encoded_shards"] == 4, summary
        assert "ray-job: 2 worker nodes up: ray-worker-1, ray-worker-2" in done.stdout, done.stdout[-2000:]

        manifest = _manifest(c, summary["version"])
        engine = manifest["engine"]
        print(f"manifest engine: {json.dumps(engine)}")
        assert engine["ray"] == "ray-head:6379" and engine["device"] == "cpu" and engine["actors"] == 2, engine
        # the work was spread: both worker containers encoded shards, the head (0 CPUs) none
        assert sorted(engine["nodes"]) == list(WORKERS), engine
        assert manifest["counts"]["images"] == 1000, manifest["counts"]

        deadline = time.monotonic() + RELOAD_TIMEOUT
        while (now := http.get("/index").json())["version"] != summary["version"]:
            assert time.monotonic() < deadline, f"the api serves {now['version']}, not {summary['version']}"
            time.sleep(2)
        assert now["images"] == 1000 and not now["refused_versions"], now
        found = http.post("/search/text", json={"query": "a red circle left of a blue square", "k": 5})
        assert found.status_code == 200, found.text
        body = found.json()
        assert body["index_version"] == summary["version"] and len(body["results"]) == 5, body


def test_ray_profile_serves_a_sharded_index(ray_compose):
    """``ray-build`` with ``HAT_SHARDS=2`` into /data/sharded, then ``ray-serve`` (``python -m service.cluster
    --replicas 2 --spread --proxy head-only``): the api's HTTP API on the head's published port, every shard
    answered from both workers."""
    c = ray_compose
    env = {"HAT_SHARDS": "2", "HAT_BUILD_OUT": "/data/sharded"}
    done = c.run_job("ray-build", *RAY, timeout=BUILD_JOB_TIMEOUT, env=env)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["indexed"] == 1000 and summary["version"].startswith("00="), summary
    port = c.env["HAT_CLUSTER_PUBLISH_PORT"]
    started = time.monotonic()
    c(*RAY, "up", "-d", "ray-serve", timeout=300)
    c.wait_healthy("ray-serve", READY_TIMEOUT, *RAY)
    print(f"\nray-serve ready after {time.monotonic() - started:.1f} s")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        ready = http.get("/readyz").json()
        assert [s["shard"] for s in ready["shards"]] == [0, 1] and all(s["ready"] for s in ready["shards"]), ready
        assert ready["index_version"] == summary["version"], ready
        seen: set[str] = set()
        deadline = time.monotonic() + 60
        while seen != set(WORKERS) and time.monotonic() < deadline:  # each poll is answered by either replica
            seen |= {s["node"] for s in http.get("/readyz").json()["shards"]}
            time.sleep(0.5)
        assert seen == set(WORKERS), seen
        found = http.post("/search/text", json={"query": "a red circle left of a blue square", "k": 5})
        assert found.status_code == 200, found.text
        body = found.json()
        assert len(body["results"]) == 5 and body["partial"] is False, body
    c(*RAY, "stop", "ray-serve", timeout=120, check=False)
