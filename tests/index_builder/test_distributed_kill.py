"""Killing parts of a build on Ray: a killed encoder actor is restarted and its shard redone; a SIGKILLed
driver leaves ``current`` alone and the same command resumes from the committed shards.

Every build here is ``python -m index_builder build ... --ray local`` in its own process (its own local
cluster), over 24 generated images in shards of 2, compared field by field (``index_format.compare``) with a
one-process build of the same gallery. A real search service serves the root throughout the driver kills.
Short (CI): one run of each kill. ``HAT_STRESS=full``: three of each (the issue's figures).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from builder_helpers import DEMO_MODEL, REPO, Prober, session_alive
from live_server import LiveServer

from index_builder import BuildOptions, IndexRoot, build, compare

pytest.importorskip("ray", reason="the Ray extra is not installed (pip install 'hat-search[ray]')")
pytestmark = [pytest.mark.slow, pytest.mark.stress]

SHARD_SIZE = 2
N_IMAGES = 24
N_SHARDS = N_IMAGES // SHARD_SIZE
OPTIONS = ["--device", "cpu", "--shard-size", str(SHARD_SIZE), "--batch-size", "2", "--workers", "0"]


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory) -> Path:
    """The one-process build every killed-and-finished Ray build must equal."""
    root = tmp_path_factory.mktemp("reference")
    build(world / "manifest.jsonl", str(DEMO_MODEL), root,
          BuildOptions(device="cpu", shard_size=SHARD_SIZE, batch_size=2, workers=0, progress=False))
    return root


def _command(gallery: Path, root: Path) -> list[str]:
    # The actors run as many torch threads as the one-process build did: the same kernels, the same bits.
    return [sys.executable, "-m", "index_builder", "build", "--gallery", str(gallery), "--model", str(DEMO_MODEL),
            "--out", str(root), *OPTIONS, "--ray", "local", "--ray-threads", str(torch.get_num_threads()),
            "--no-progress"]


def _committed(root: Path) -> int:
    return sum((d / "shard.json").is_file() for d in root.glob("staging/build-*/shard-*"))


def _encoder_pids(sid: int) -> list[int]:
    """The encoder actors' processes of the cluster a build (session ``sid``) started (Ray names them)."""
    pids = []
    for pid in session_alive(sid):
        try:
            if b"ShardEncoder" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            continue
    return pids


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as err:
        return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True,
                                start_new_session=True)


def _wait_for(proc: subprocess.Popen, condition, what: str, log: Path, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"the build ended ({proc.returncode}) before {what}: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def _reap(sid: int, wait_s: float = 10.0) -> int:
    """Processes of a killed driver's local cluster still alive ``wait_s`` after the kill, then killed: Ray's
    raylet and workers follow the driver within seconds, its agent processes linger longer (docs/scale.md)."""
    deadline = time.monotonic() + wait_s
    while session_alive(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = session_alive(sid)
    for pid in left:  # never leave a cluster behind
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(left)


def test_killed_encoder_actor_is_restarted_and_the_index_is_complete(world, reference, tmp_path, stress_full,
                                                                     report_figures):
    runs = []
    for run in range(3 if stress_full else 1):
        root, log = tmp_path / f"actor-{run}", tmp_path / f"actor-{run}.log"
        proc = _start(_command(world / "manifest.jsonl", root), log)
        try:
            def started(root=root, proc=proc):
                return _committed(root) >= 1 and _encoder_pids(proc.pid)

            victim = _wait_for(proc, started, "a committed shard", log)[0]
            os.kill(victim, signal.SIGKILL)
            at_kill = _committed(root)
            assert at_kill < N_SHARDS, "the build was over before the kill: nothing tested"
            def restarted(proc=proc, victim=victim):
                return [p for p in _encoder_pids(proc.pid) if p != victim] or (proc.poll() is not None and [-1])

            replacement = _wait_for(proc, restarted, "a restarted actor", log)
            out, _ = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
            _reap(proc.pid)
        assert proc.returncode == 0, log.read_text()[-3000:]
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["indexed"] == N_IMAGES and summary["encoded_shards"] == N_SHARDS
        assert compare(reference, root) == []
        runs.append({"committed_at_kill": at_kill, "restarted_actor_seen": replacement != [-1],
                     "seconds": summary["seconds"]})
    report_figures({"runs": runs})


def test_killed_driver_leaves_current_and_the_rerun_resumes(world, reference, tmp_path, stress_full,
                                                             report_figures):
    from model import load_model
    from service.app import create_app
    from service.settings import Settings

    gallery = world / "manifest.jsonl"
    lines = gallery.read_text().splitlines()
    live = world / "live-8.jsonl"
    live.write_text("\n".join(lines[:8]) + "\n")
    query = json.loads(lines[0])["captions"][0]
    root = tmp_path / "root"
    build(live, str(DEMO_MODEL), root, BuildOptions(device="cpu", workers=0, progress=False))
    live_version = IndexRoot(root).current_version()
    server = LiveServer(create_app(Settings(index_root=str(root), reload_interval=0.2, workers=1, threads=1),
                                   model=load_model(DEMO_MODEL))).start()
    server.wait_ready(timeout=120)
    runs = []
    try:
        with Prober(server.url, query) as prober:
            for run in range(3 if stress_full else 1):
                if run:  # start each trial from the live 8-image version again
                    build(live, str(DEMO_MODEL), root, BuildOptions(device="cpu", workers=0, progress=False))
                    live_version = IndexRoot(root).current_version()
                log = tmp_path / f"driver-{run}.log"
                proc = _start(_command(gallery, root), log)
                target = 2 + run * 3  # kill points spread over the encoding
                _wait_for(proc, lambda t=target: _committed(root) >= t, f"{target} committed shards", log)
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                at_kill = _committed(root)
                assert proc.returncode == -signal.SIGKILL and at_kill < N_SHARDS
                assert IndexRoot(root).current_version() == live_version  # nothing published, nothing damaged
                assert prober.probe()["index_version"] == live_version
                orphans_s = _reap(proc.pid)
                again = subprocess.run(_command(gallery, root), cwd=REPO, capture_output=True, text=True,
                                       timeout=600)
                assert again.returncode == 0, again.stderr[-3000:]
                summary = json.loads(again.stdout.strip().splitlines()[-1])
                reused = summary["resumed_shards"]
                assert reused >= at_kill and summary["resumed_shards"] + summary["encoded_shards"] == N_SHARDS
                assert compare(reference, root) == []
                published = IndexRoot(root).current_version()
                assert published != live_version
                deadline = time.monotonic() + 30  # the service polls ``current`` and swaps to the new version
                while prober.probe()["index_version"] != published and time.monotonic() < deadline:
                    time.sleep(0.2)
                assert prober.probe()["index_version"] == published
                runs.append({"committed_at_kill": at_kill, "shards_reused": reused,
                             "cluster_processes_left_10s_after_kill": orphans_s, "resume_seconds": summary["seconds"]})
        assert not prober.failures, prober.failures[:5]
        report_figures({"runs": runs, "probes": len(prober.answers)})
    finally:
        server.stop()
