"""``python -m service.cluster``: the HTTP API of ``python -m service`` on Ray Serve, over a sharded root.

A local Ray cluster runs in this process (``service.cluster.deployments.deploy``, the code path of the CLI);
the CLI itself is started once as a subprocess. Answers are compared with ``python -m service``'s app serving
the same sharded root: the same per-part code runs in both, so ids and scores agree exactly. Replicas are killed
for real (``ray.kill``); Ray Serve replaces them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from live_server import ClientThreads, poll, wait_ready

from service.settings import Settings

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TOL = 1e-5


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(world, sharded_root):
    ray = pytest.importorskip("ray")
    from ray import serve

    from service.cluster.deployments import deploy

    ray.init(num_cpus=8, include_dashboard=False, logging_level="WARNING")
    port = _port()
    # shard_timeout 8 s: in CI (2 cores, Docker and Ray beside the test) a killed replica's calls were left
    # unanswered and the surviving replica answered its hedges only after more than 3 s (2026-12-03); a shard
    # without any replica is still left out after the deadline (test_shard_without_replicas_...).
    settings = Settings(index_root=str(sharded_root), model=str(world["model"]), port=port, reload_interval=0.5,
                        shard_timeout=8.0, max_upload_bytes=200_000)  # fmt: skip
    try:
        deploy(settings, 3, 2)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, 300)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def local(start_server, sharded_root):
    server = start_server(index_root=str(sharded_root), max_upload_bytes=200_000)
    server.wait_ready()
    return server.url


def _post_text(url: str, query, **extra) -> httpx.Response:
    return httpx.post(url + "/search/text", json={"query": query, **extra}, timeout=60)


def test_same_answers_as_python_m_service(world, cluster, local):
    for image_id in world["base_ids"][:8]:
        item = world["items"][image_id]
        want = _post_text(local, item["captions"][2], k=10, candidates=20).json()
        got = _post_text(cluster, item["captions"][2], k=10, candidates=20).json()
        assert got["partial"] is False and got["missing_shards"] == []
        assert [r["id"] for r in got["results"]] == [r["id"] for r in want["results"]]
        for a, b in zip(want["results"], got["results"], strict=True):
            assert abs(a["score"] - b["score"]) <= TOL
        assert got["index_version"] == want["index_version"]
        files = {"image": Path(item["image"]).read_bytes()}
        want = httpx.post(local + "/search/image", files=files, data={"k": "5"}, timeout=60).json()
        got = httpx.post(cluster + "/search/image", files=files, data={"k": "5"}, timeout=60).json()
        assert [r["id"] for r in got["results"]] == [r["id"] for r in want["results"]]


def test_same_api_errors_page_and_metadata(world, cluster, local):
    assert _post_text(cluster, "\u200b").json()["error"]["code"] == _post_text(local, "\u200b").json()["error"]["code"]
    bad = httpx.post(cluster + "/search/image", files={"image": b"not an image"}, timeout=30)
    assert bad.status_code == 415 and bad.json()["error"]["code"] == "unsupported_image"
    assert _post_text(cluster, "a red circle", k=0).status_code == 422
    ready = httpx.get(cluster + "/readyz").json()
    assert [s["shard"] for s in ready["shards"]] == [0, 1, 2] and all(s["ready"] for s in ready["shards"])
    assert sum(s["images"] for s in ready["shards"]) == len(world["base_ids"])
    paths = lambda url: set(httpx.get(url + "/openapi.json").json()["paths"])  # noqa: E731
    assert paths(cluster) == paths(local)
    assert httpx.get(cluster + "/").status_code == 200
    metrics = httpx.get(cluster + "/metrics").text
    assert "hat_ready 1.0" in metrics and f"hat_index_images {float(len(world['base_ids']))}" in metrics
    from urllib.parse import quote

    odd = world["odd_id"]
    r = httpx.get(cluster + "/images/" + quote(odd, safe=""))
    assert r.status_code == 200 and r.content == Path(world["items"][odd]["image"]).read_bytes()


def _replicas(deployment: str) -> list:
    import ray

    # Serve names its replica actors SERVE_REPLICA::<app>#<deployment>#<id>; named actors are listed by the GCS
    # (ray.util.state would need the dashboard, which these clusters do not run).
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and f"::hat#{deployment}#" in a["name"]]  # fmt: skip
    alive = []
    for name in names:
        with contextlib.suppress(ValueError):  # gone since the listing
            alive.append(ray.get_actor(name, namespace="serve"))
    return alive


class _Load(ClientThreads):
    """Text searches from ``clients`` threads until the context ends, every answer recorded with its time."""

    join_timeout = 90.0

    def __init__(self, url: str, queries: list[str], clients: int = 4) -> None:
        super().__init__(clients)
        self.url, self.queries = url, queries
        self.records: list[tuple[float, int, dict]] = []

    def _run(self, i: int) -> None:
        url, queries = self.url, self.queries
        with httpx.Client(base_url=url, timeout=60) as c:
            n = i
            while not self.stop.is_set():
                n += 1
                sent = time.monotonic()
                try:
                    r = c.post("/search/text", json={"query": queries[n % len(queries)], "k": 5, "candidates": 20})
                    self.records.append((time.monotonic(), r.status_code, {**r.json(), "_sent": sent}))
                except httpx.HTTPError as exc:
                    self.records.append((time.monotonic(), -1, {"error": str(exc)}))


def test_killed_replica_loses_no_request(world, cluster):
    import ray

    queries = [world["items"][i]["captions"][0] for i in world["base_ids"]]
    with _Load(cluster, queries) as load:
        for _ in range(2):
            _wait_replicas("shard-00", 2)  # Ray Serve replaced the one killed before
            time.sleep(2)
            ray.kill(_replicas("shard-00")[0], no_restart=True)
        time.sleep(3)
    statuses = [s for _, s, _ in load.records]
    assert len(statuses) > 20 and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert not any(body["partial"] for _, _, body in load.records)
    _wait_replicas("shard-00", 2)


def _wait_replicas(deployment: str, count: int, timeout: float = 180) -> None:
    """Until ``count`` replicas of ``deployment`` run (Serve's own view: a replacement's actor exists well before
    it has opened its shard, and killing the one running replica beside it would leave the shard without one)."""
    from ray import serve

    def running() -> bool:
        states = serve.status().applications["hat"].deployments[deployment].replica_states
        return states.get("RUNNING", 0) >= count and sum(states.values()) == states.get("RUNNING", 0)

    poll(lambda: running() and len(_replicas(deployment)) >= count, timeout, interval=1.0)


OUTAGE_S = 12.0  # how long test_shard_without_replicas_gives_partial_answers keeps shard 01 without a replica


def test_shard_without_replicas_gives_partial_answers(world, cluster):
    import ray

    queries = [world["items"][i]["captions"][0] for i in world["base_ids"]]
    _wait_replicas("shard-01", 2)
    with _Load(cluster, queries) as load:
        time.sleep(2)
        killed_at = time.monotonic()
        # Shard 01 stays without a replica for longer than HAT_SHARD_TIMEOUT (8 s here): each replica Serve starts
        # in that window is killed as soon as Ray lists its actor. Killing the two once was not enough: Serve started
        # replacements in ~7 s, within the deadline, the waiting searches got whole answers and CI (2026-12-03)
        # saw no partial answer to check. Serve keeps retrying a deployment whose replicas ran before.
        while time.monotonic() < killed_at + OUTAGE_S:
            for actor in _replicas("shard-01"):
                with contextlib.suppress(Exception):  # already gone
                    ray.kill(actor, no_restart=True)
            time.sleep(0.2)
        deadline = killed_at + 150
        recovered = None
        while time.monotonic() < deadline and recovered is None:
            time.sleep(1)
            done = [(t, b) for t, s, b in load.records if t > killed_at and s == 200]
            partial = [t for t, b in done if b["partial"]]
            # whole again: 10 whole answers after the last partial one (after the outage when there was none)
            since = partial[-1] if partial else killed_at + OUTAGE_S
            later = [b for t, b in done if t > since + 1]
            if len(later) >= 10 and all(not b["partial"] for b in later):
                recovered = (partial[-1] if partial else done[0][0]) - killed_at
    after = [(t, s, b) for t, s, b in load.records if t > killed_at]
    assert all(s == 200 for _, s, _ in after), {s for _, s, _ in after}  # never a 5xx, never a hang
    flagged = [b for _, _, b in after if b["partial"]]
    assert all(b["missing_shards"] == [1] for b in flagged)
    assert all(b["missing_shards"] == [] for _, _, b in after if not b["partial"])
    if not flagged:
        # Serve put a replica back within a search's deadline (HAT_SHARD_TIMEOUT, 8 s) despite the kills: the
        # searches waited for it and got whole answers, which is right too. They must have waited, then: the
        # searches sent during the outage took seconds, not a shard 01 that was never gone. (The
        # partial path itself is pinned without Ray's timing: test_cluster_engine.py, dead and hanging shards.)
        waits = [t - b["_sent"] for t, _, b in after if b["_sent"] > killed_at + 0.5]
        assert waits and max(waits) > 2.0, waits[:10]
    assert recovered is not None, "answers did not become whole again"
    print(f"\nshard 01 down: {len(flagged)} partial answers of {len(after)}, whole again after {recovered:.1f} s")


def test_command_line(world, sharded_root, tmp_path):
    """``python -m service.cluster --ray local`` starts, answers, and stops on SIGTERM; bad input: one line."""
    bad = subprocess.run([sys.executable, "-m", "service.cluster", "--index", str(tmp_path / "none"),
                          "--replicas", "0"], cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.startswith("error: --replicas must be at least 1")
    env = {**os.environ, "HAT_PROCESSES": "2"}
    bad = subprocess.run([sys.executable, "-m", "service.cluster", "--index", str(sharded_root)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.startswith("error: HAT_PROCESSES is for python -m service"), bad.stderr
    port = _port()
    env = {**os.environ, "HAT_PORT": str(port), "HAT_MODEL": str(world["model"])}
    proc = subprocess.Popen([sys.executable, "-m", "service.cluster", "--index", str(sharded_root), "--ray", "local"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, 300)
        query = world["items"][world["base_ids"][0]]["captions"][0]
        assert len(_post_text(url, query, k=3).json()["results"]) == 3
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-3000:]
        assert f"on http://127.0.0.1:{port}/" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# Runs main() with ray.init wrapped: once Ray is up, the handler main() set is put back (Ray installs its own while
# it starts) and the process sends itself SIGTERM, i.e. a stop that arrives after Ray's start, before deploy().
_STOPPED_DURING_START_UP = """
import os, signal, sys
import ray
from service.cluster.__main__ import main

real_init = ray.init

def init(*args, **kwargs):
    ours = signal.getsignal(signal.SIGTERM)
    started = real_init(*args, **kwargs)
    signal.signal(signal.SIGTERM, ours)
    os.kill(os.getpid(), signal.SIGTERM)
    return started

ray.init = init
sys.exit(main(sys.argv[1:]))
"""


def test_command_line_stopped_during_start_up(world, sharded_root):
    """SIGTERM before the application is deployed: nothing is deployed, Ray is shut down, exit status 0 (a
    supervisor's stop during start-up is a clean stop, not a traceback)."""
    env = {**os.environ, "HAT_PORT": str(_port()), "HAT_MODEL": str(world["model"])}
    done = subprocess.run([sys.executable, "-c", _STOPPED_DURING_START_UP, "--index", str(sharded_root), "--ray",
                           "local"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "serving " not in done.stdout and "Traceback" not in out, out[-3000:]
