"""kill -9 the builder at random points: the live index stays intact and serving, the resumed build equals an
uninterrupted one.

A small gallery is published first (the live index) and a real search service serves it. A larger gallery is
then built into the same root by ``python -m index_builder build`` and SIGKILLed at points drawn from a seeded
RNG, stratified over the build's phases as timed by an uninterrupted reference build (encoding, segment merge,
FAISS + metadata before the publish, after the publish) and anchored on the build's progress on disk. After
each kill: ``current`` opens as a whole index (the one before, or the new one when the kill came after its
publish), the service (searched in the background all along) answers, and the same command run again resumes
from the committed shards and publishes an index equal to the reference one, leaving nothing behind.

Short (CI): 24 images, 6 shards, 2 kills. ``HAT_STRESS=full``: 96 images, 12 shards, 2 decoding workers, 5 kills.
``HAT_CRASH_SEED`` replays a kill plan (the seed is printed and reported).
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from builder_helpers import DEMO_MODEL, REPO, Prober, assert_same_index, run_cli, search_text, session_alive
from live_server import LiveServer

from index_builder import BuildOptions, IndexRoot, build, open_index
from model import load_model
from service.app import create_app
from service.settings import Settings

SIZES = {
    "short": {"images": 24, "shard_size": 4, "workers": 0, "kills": 2},
    "full": {"images": 96, "shard_size": 8, "workers": 2, "kills": 5},
}
LIVE_IMAGES = 8  # the gallery published before the trials
POLL_S = 0.002


# ------------------------------------------------------------------------------------ watching a build's root


def _state(root: Path, old_segments: set[str], live_version: str | None) -> dict:
    """What a build has left on disk so far (every step it takes is an atomic rename, so each is visible);
    ``old_segments``: the segment directories there before it started."""
    staging = [d for d in root.glob("staging/build-*") if d.is_dir()]
    committed = sum((d / "shard.json").is_file() for s in staging for d in s.glob("shard-*"))
    segments = {d.name for d in root.glob("segments/*")}
    current = IndexRoot(root).current_version()
    return {
        "committed": committed,
        "building_segment": any(s.startswith("building-") for s in segments),
        "new_segment": any(not s.startswith("building-") for s in segments - old_segments),
        "version_tmp": any(root.glob("versions/.tmp-*")),
        "published": current is not None and current != live_version,
    }


def _phase(state: dict, n_shards: int) -> str:
    if state["published"]:
        return "after publish"
    if state["version_tmp"] or state["new_segment"]:
        return "faiss+metadata (segment written, version not yet published)"
    if state["building_segment"] or state["committed"] == n_shards:
        return "segment merge (all shards committed)"
    if state["committed"]:
        return "encoding"
    return "start-up / first shard"


def _before(root: Path) -> tuple[str | None, set[str]]:
    """(the version ``current`` names, the segment directories present) before a build starts."""
    return IndexRoot(root).current_version(), {d.name for d in root.glob("segments/*")}


def _timeline(cmd: list[str], root: Path, n_shards: int) -> dict:
    """Run an uninterrupted build, noting (seconds from its start) when each step first shows on disk."""
    events: dict[str, float] = {}
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:
        now, s = time.monotonic() - started, _state(root, set(), None)
        if s["committed"]:
            events.setdefault("first_shard", now)
        if s["committed"] == n_shards:
            events.setdefault("all_shards", now)
        if s["new_segment"]:
            events.setdefault("segment_written", now)
        if s["published"]:
            events.setdefault("published", now)
        time.sleep(POLL_S)
    events["exit"] = time.monotonic() - started
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    # A step shorter than the polling interval may go unseen: it then happened by the next one seen.
    for name, later in (("published", "exit"), ("segment_written", "published"), ("all_shards", "segment_written"),
                        ("first_shard", "all_shards")):
        events.setdefault(name, events[later])
    return {"events": events, "summary": json.loads(out.strip().splitlines()[-1])}


def _plan(rng: random.Random, kills: int, ev: dict, n_shards: int) -> list[dict]:
    """Kill points, stratified over the phases of the reference build: the build is killed ``delay_s`` after
    an anchor shows on disk (``shards`` committed shards, the new segment, the publish). Anchoring on the
    build's own progress, not on the clock, keeps the kills in their phase when the machine is busier or
    quieter than during the reference build; delays stay within half (or 0.8 of) the phase's length there."""
    per_shard = (ev["all_shards"] - ev["first_shard"]) / max(1, n_shards - 1)
    half = n_shards // 2

    def encoding(target: str, low: int, high: int) -> dict:
        return {"target": target, "anchor": "shards", "shards": rng.randint(low, max(low, high)),
                "delay_s": rng.uniform(0.0, 0.8 * per_shard)}

    def after(target: str, anchor: str, start: str, end: str) -> dict:
        return {"target": target, "anchor": anchor, "delay_s": rng.uniform(0.0, 0.5 * (ev[end] - ev[start]))}

    late = [
        lambda: after("segment merge", "all_shards", "all_shards", "segment_written"),
        lambda: after("faiss+metadata", "segment_written", "segment_written", "published"),
        lambda: after("after publish", "published", "published", "exit"),
    ]
    if kills >= 5:
        plan = [encoding("encoding (first half)", 1, half), encoding("encoding (second half)", half + 1, n_shards - 1)]
        plan += [make() for make in late] + [encoding("encoding", 1, n_shards - 1) for _ in range(kills - 5)]
    else:  # short: one kill while encoding, one in a later phase
        plan = [encoding("encoding", 1, n_shards - 1), rng.choice(late)()][:kills]
    rng.shuffle(plan)
    return [{**k, "delay_s": round(k["delay_s"], 4)} for k in plan]


class BuildFinishedError(Exception):
    """The build finished before its kill point (the machine ran it faster than planned)."""


def _run_until_killed(cmd: list[str], root: Path, plan: dict, n_shards: int, log: Path) -> dict:
    live_version, old_segments = _before(root)
    started = time.monotonic()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    anchor_at = None
    while True:
        if proc.poll() is not None:
            assert proc.returncode == 0, f"the build failed before its kill point: {log.read_text()[-2000:]}"
            raise BuildFinishedError
        now = time.monotonic()
        if anchor_at is None:
            s = _state(root, old_segments, live_version)
            seen = {"shards": s["committed"] >= plan.get("shards", n_shards), "all_shards": s["committed"] == n_shards,
                    "segment_written": s["new_segment"], "published": s["published"]}
            if seen[plan["anchor"]]:
                anchor_at = now
        if anchor_at is not None and now - anchor_at >= plan["delay_s"]:
            break
        time.sleep(POLL_S)
    os.kill(proc.pid, signal.SIGKILL)
    killed_at = time.monotonic() - started
    if proc.wait(timeout=30) == 0:  # it exited normally between the last look and the kill
        raise BuildFinishedError
    assert proc.returncode == -signal.SIGKILL, proc.returncode
    state = _state(root, old_segments, live_version)
    since = time.monotonic()
    orphans_s = lock_s = None
    while orphans_s is None or lock_s is None:
        # Decoding workers outlive their parent until they notice it is gone, and hold the writer lock
        # (an flock, inherited by fork) until then: a restart within that time is refused.
        now = time.monotonic() - since
        assert now < 60, f"orphaned builder processes {session_alive(proc.pid)}"
        if orphans_s is None and not session_alive(proc.pid):
            orphans_s = round(now, 2)
        if lock_s is None and not _lock_held(root):
            lock_s = round(now, 2)
        time.sleep(0.05)
    return {"killed_at_s": round(killed_at, 3), "state": state, "live_before": live_version,
            "orphans_s": orphans_s, "lock_held_s": lock_s}


def _lock_held(root: Path) -> bool:
    with open(root / ".lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


# --------------------------------------------------------------------------------------------------- the test


@pytest.mark.stress
def test_kill_9_at_random_points_live_index_serves_and_resume_equals_uninterrupted(
    tmp_path, stress_full, report_figures
):
    from training.synthetic import main as synth

    wall = time.monotonic()
    size = SIZES["full" if stress_full else "short"]
    n_images, shard_size = size["images"], size["shard_size"]
    n_shards = -(-n_images // shard_size)
    seed = int(os.environ.get("HAT_CRASH_SEED") or random.SystemRandom().randrange(2**32))
    rng = random.Random(seed)
    print(f"\ncrash test seed {seed} (HAT_CRASH_SEED={seed} replays this kill plan)")

    world = tmp_path / "world"
    synth(["--out", str(world), "--seed", "11", "--train", "0", "--val", "0", "--test", str(n_images)])
    gallery = world / "manifest.jsonl"  # relative image paths, inside the manifest's folder
    lines = gallery.read_text().splitlines()
    live_gallery = world / "live.jsonl"
    live_gallery.write_text("\n".join(lines[:LIVE_IMAGES]) + "\n")
    queries = [json.loads(line)["captions"][1] for line in lines[:: max(1, n_images // 4)][:4]]

    root, ref_root = tmp_path / "root", tmp_path / "reference"
    build(live_gallery, str(DEMO_MODEL), root, BuildOptions(workers=0, progress=False, device="cpu"))
    version_a = IndexRoot(root).current_version()

    # float16 store: the check compares every feature of the resumed index with the uninterrupted one's to 1e-3;
    # the encoder's float32 outputs are not bit-identical between runs, and a coded store (pq, the default)
    # turns such last-bit differences into the odd flipped code (one quantisation step), which says nothing
    # about crash safety. The coded stores' own resume path is tested in test_build.py (add reuses the codebook).
    args = ["build", "--gallery", str(gallery), "--model", str(DEMO_MODEL), "--device", "cpu", "--no-progress",
            "--shard-size", str(shard_size), "--batch-size", str(min(8, shard_size)), "--workers", str(size["workers"]),
            "--store", "float16"]
    cmd = [sys.executable, "-m", "index_builder", *args]
    reference = _timeline([*cmd, "--out", str(ref_root)], ref_root, n_shards)
    ev = reference["events"]
    big_t = ev["exit"]
    assert reference["summary"]["indexed"] == n_images and reference["summary"]["encoded_shards"] == n_shards
    plan = _plan(rng, size["kills"], ev, n_shards)
    print("reference build: " + ", ".join(f"{k} {v / big_t:.3f} T" for k, v in ev.items()) + f" (T = {big_t:.2f} s)")
    print("kill plan: " + json.dumps(plan))

    demo = load_model(DEMO_MODEL)
    want = open_index(ref_root)
    server = LiveServer(create_app(Settings(index_root=str(root), reload_interval=0.2, workers=1, threads=1),
                                   model=demo)).start()
    server.wait_ready(timeout=120)
    trials = []
    try:
        with Prober(server.url, queries[0]) as prober:
            assert prober.probe()["index_version"] == version_a
            for number, kill in enumerate(plan, start=1):
                trial = {"trial": number, **kill}
                for attempt in range(1, 4):
                    try:
                        killed = _run_until_killed([*cmd, "--out", str(root)], root, kill, n_shards,
                                                   tmp_path / f"kill-{number}-{attempt}.log")
                        break
                    except BuildFinishedError:  # a complete build was published instead: try again, sooner
                        kill = {**kill, "delay_s": round(kill["delay_s"] / 4, 4)}
                else:
                    pytest.fail(f"trial {number}: the build always finished before its kill point {kill}")
                trial.update(attempts=attempt, delay_s=kill["delay_s"])
                state = killed["state"]
                trial.update(kill_fraction_of_t=round(killed["killed_at_s"] / big_t, 3),
                             killed_at_s=killed["killed_at_s"], phase=_phase(state, n_shards),
                             committed_shards=state["committed"], orphans_s=killed["orphans_s"],
                             lock_held_after_kill_s=killed["lock_held_s"])
                print(f"trial {number}: {json.dumps(trial)}")

                # (a) current is a whole index: the one before the kill, or the new one if it was published.
                current = IndexRoot(root).current_version()
                before = killed["live_before"]
                expected = n_images if state["published"] else (LIVE_IMAGES if before == version_a else n_images)
                assert current == before or state["published"], (current, before)
                index = open_index(root)
                assert index.version == current and index.num_images == expected
                assert index.faiss["images"].ntotal == expected and index.num_captions == 5 * expected
                hits = search_text(index, demo, queries[0])
                assert hits and hits[0] in {m["id"] for m in index.images(range(index.num_images))}
                index.close()
                answer = prober.probe()  # the live service answers right after the kill
                assert answer["results"], answer
                trial["current_after_kill"] = "new version" if state["published"] else "unchanged"

                # (c) the same command again resumes from the committed shards and equals the reference build.
                staging = [d for d in root.glob("staging/build-*") if d.is_dir()]
                reusable = sum((d / "shard.json").is_file() for s in staging for d in s.glob("shard-*"))
                resume_started = time.monotonic()
                summary = json.loads(run_cli(*args, "--out", str(root)).stdout.strip().splitlines()[-1])
                trial.update(resume_s=round(time.monotonic() - resume_started, 2),
                             resumed_shards=summary["resumed_shards"], encoded_shards=summary["encoded_shards"])
                assert summary["resumed_shards"] == reusable, (summary, reusable)
                assert summary["encoded_shards"] == n_shards - reusable and summary["indexed"] == n_images
                if trial["phase"] != "after publish":
                    assert reusable == state["committed"]  # every shard committed before the kill is reused
                got = open_index(root)
                assert got.version == summary["version"] == IndexRoot(root).current_version()
                assert_same_index(got, want, demo, queries)
                kept_segments = set()
                for name in IndexRoot(root).list_versions():
                    kept_segments |= set(json.loads((root / "versions" / name / "manifest.json").read_text())[
                        "segments"])
                leftovers = sorted(
                    str(p.relative_to(root)) for p in [*root.glob("segments/*"), *root.glob("versions/.tmp-*"),
                                                       *root.glob("staging/*")]
                    if p.parent.name != "segments" or p.name not in kept_segments
                )
                assert not leftovers, f"left behind after the resumed build: {leftovers}"
                got.close()
                deadline = time.monotonic() + 30  # the service moves to the resumed version by itself
                while prober.probe()["index_version"] != summary["version"]:
                    assert time.monotonic() < deadline, "the service did not reload the resumed version"
                    time.sleep(0.2)
                trials.append(trial)
            time.sleep(0.5)
        assert not prober.failures, prober.failures[:5]
        answers = len(prober.answers)
    finally:
        server.stop()
        want.close()

    phases = sorted({t["phase"] for t in trials})
    assert any(t["committed_shards"] and t["phase"] == "encoding" for t in trials), "no kill landed mid-encoding"
    report_figures({
        "seed": seed,
        "images": n_images,
        "shards": n_shards,
        "workers": size["workers"],
        "reference_build_s": round(big_t, 2),
        "reference_phases_fraction_of_t": {k: round(v / big_t, 3) for k, v in ev.items()},
        "kill_points_fraction_of_t": [t["kill_fraction_of_t"] for t in trials],
        "phases_hit": phases,
        "trials": trials,
        "service_answers": answers,
        "service_failures": 0,
        "wall_s": round(time.monotonic() - wall, 1),
    })


def test_next_build_removes_what_a_killed_run_left(world, tmp_path):
    """A run killed while merging its segment leaves ``segments/building-*``; one killed while deleting its
    published shards leaves ``staging/.discard-*`` (renamed away first, so never mistaken for resumable
    shards). The next build, under the writer lock, removes both and reuses nothing from them."""
    lines = (world / "manifest.jsonl").read_text().splitlines()[:4]
    gallery = world / "crash_leftovers.jsonl"
    gallery.write_text("\n".join(lines) + "\n")
    root = tmp_path / "root"
    opts = BuildOptions(workers=0, progress=False, device="cpu", shard_size=2)
    build(gallery, str(DEMO_MODEL), root, opts)
    assert not list(root.glob("staging/*"))  # the published build's shards are gone, renamed away first
    building = root / "segments" / "building-seg-20260101T000000000000Z-abcdef"
    building.mkdir()
    (building / "image.l1.npy").write_bytes(b"half a table")
    half_deleted = root / "staging" / ".discard-build-0123456789abcdef0123-1a2b3c4d" / "shard-00000"
    half_deleted.mkdir(parents=True)
    (half_deleted / "shard.json").write_text(json.dumps({"items": [], "captions": [], "skipped": []}))
    again = build(gallery, str(DEMO_MODEL), root, opts)
    assert again.resumed_shards == 0 and again.encoded_shards == 2
    assert not list(root.glob("staging/*")) and not list(root.glob("segments/building-*"))
    assert open_index(root).num_images == 4


_HOLDER = """
import multiprocessing, sys, time
from index_format import IndexRoot, close_inherited_locks

def worker(close):
    if close:
        close_inherited_locks()
    time.sleep(60)

with IndexRoot(sys.argv[1]).lock():
    child = multiprocessing.get_context("fork").Process(target=worker, args=(sys.argv[2] == "close",), daemon=False)
    child.start()
    print(child.pid, flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("workers_close_it", [True, False])
def test_a_killed_builders_lock_is_not_kept_by_its_forked_workers(tmp_path, workers_close_it):
    """The writer lock is free as soon as the builder dies, although its forked workers live on (the decoding
    workers call close_inherited_locks); without that call the orphan would keep it (the control case)."""
    from index_builder import BuildError

    root = tmp_path / "idx"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(root), "close" if workers_close_it else "keep"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)  # fmt: skip
    child = int(holder.stdout.readline())
    try:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        os.kill(child, 0)  # the forked worker is still alive
        if workers_close_it:
            with IndexRoot(root).lock():
                pass
        else:
            with pytest.raises(BuildError, match="another build"), IndexRoot(root).lock():
                pass
    finally:
        os.kill(child, signal.SIGKILL)
