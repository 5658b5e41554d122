"""Sustained load on the real server (``python -m service`` in its own process) from the project's load
generator (benchmarks/service_load.py: keep-alive HTTP clients in threads, another process), on loopback.

Zero errors on both search endpoints and a resident set that does not grow on (under 4% across the second
half of the measured requests, after a warm-up), a check shown to fail on a server with a leak. Short in
`make test` (1,500 requests for the memory check); `make stress` (HAT_STRESS=full) runs 8 and 32 clients for
60 s per endpoint on a 1,000-image gallery and 10,000 requests for the memory check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.stress

REPO = Path(__file__).resolve().parents[2]
LOAD = REPO / "benchmarks" / "service_load.py"


@pytest.fixture(scope="module")
def gallery(stress_full, world, index_root, tmp_path_factory, run_builder) -> dict:
    """Short: the module's 40-image index. Full: a 1,000-scene generated gallery (seed 1) and its index."""
    if not stress_full:
        return {"index": index_root, "queries": world["manifests"]["base"], "images": world["dir"] / "images"}
    out = tmp_path_factory.mktemp("load-gallery")
    subprocess.run(
        [sys.executable, "-m", "training.synthetic", "--out", str(out), "--seed", "1",
         "--train", "0", "--val", "0", "--test", "1000"],
        cwd=REPO, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    run_builder("build", "--gallery", str(out / "manifest.jsonl"), "--model", str(world["model"]),
                "--out", str(out / "index"), "--no-progress", timeout=900)  # fmt: skip
    return {"index": out / "index", "queries": out / "manifest.jsonl", "images": out / "images"}


def _load(gallery: dict, tmp_path: Path, *, clients: int, image_fraction: float, duration: float | None = None,
          requests: int | None = None, warmup: int = 100, env: list[str] = ()) -> dict:
    out = tmp_path / f"load-{clients}-{image_fraction}-{duration}-{requests}.json"
    cmd = [
        sys.executable, str(LOAD), "serve", "--index", str(gallery["index"]), "--queries", str(gallery["queries"]),
        "--image-dir", str(gallery["images"]), "--image-fraction", str(image_fraction), "--clients", str(clients),
        "--warmup", str(warmup), "--json", str(out), "--log", str(tmp_path / "server.log"),
        *(["--requests", str(requests)] if requests else ["--duration", str(duration)]),
        *[arg for entry in env for arg in ("--env", entry)],
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    summary = json.loads(out.read_text())
    return {
        "clients": clients,
        "endpoint": {0.0: "/search/text", 1.0: "/search/image"}.get(image_fraction, f"{image_fraction:.0%} image"),
        "window_s": summary["load"]["window_s"],
        "requests": summary["all"]["requests"],
        "errors": summary["all"]["errors_by_status"],
        "throughput_rps": summary["all"]["throughput_rps"],
        "latency_ms": summary["all"]["latency_ms"],
        "server_rss_mb": summary["server_rss_mb"],
    }


@pytest.mark.parametrize("endpoint", ["text", "image"])
def test_sustained_load_has_no_errors(gallery, stress_full, report_figures, tmp_path, endpoint):
    fraction = 1.0 if endpoint == "image" else 0.0
    runs = [_load(gallery, tmp_path, clients=c, image_fraction=fraction, duration=60 if stress_full else 5)
            for c in ((8, 32) if stress_full else (8,))]  # fmt: skip
    report_figures({"gallery_images": 1000 if stress_full else 40, "runs": runs})
    for run in runs:  # memory is reported here; test_resident_memory_is_stable judges its trend
        assert run["requests"] > 0 and not run["errors"], run


def test_search_processes_under_mixed_load_have_no_errors(gallery, stress_full, report_figures, tmp_path):
    """``python -m service`` with ``HAT_PROCESSES=2`` (worker processes spawned from the real entry point), 8
    clients, 80% text / 20% image: every request answered."""
    run = _load(gallery, tmp_path, clients=8, image_fraction=0.2, duration=30 if stress_full else 5,
                env=["HAT_PROCESSES=2"])  # fmt: skip
    report_figures({"gallery_images": 1000 if stress_full else 40, "processes": 2, "run": run})
    assert run["requests"] > 0 and not run["errors"], run
    log = (tmp_path / "server.log").read_text()
    assert "2 search processes started" in log and "x 2 search processes" in log, log[-2000:]


# A leak grows on; the allocator's arenas grow in the first few hundred requests and then hold (measured over
# 3,000 requests on the short gallery, twice: RssAnon 658 -> 700 MB and 656 -> 677 MB within the first tenth,
# then flat within +-10 MB; docs/reliability.md). So the check compares the median of the middle tenth of the
# samples with the median of the last tenth: a leak of b bytes per request adds about b * N / 2 there, the ramp
# adds nothing. The limit sits between what a server without a leak showed (up to +2.51% on a machine whose
# cores another busy process shared: more requests in flight, a higher high-water mark) and what a 50 kB per
# request leak shows (+6.56%, test_memory_check_catches_a_leak, which keeps that margin checked in CI).
SETTLED_GROWTH_LIMIT_PCT = 4.0
MEMORY_REQUESTS_SHORT = 1_500


def test_resident_memory_is_stable(gallery, stress_full, report_figures, tmp_path):
    """After a warm-up, neither the server's resident set nor its anonymous part grows on across the second
    half of the measured requests (8 clients, 80% text / 20% image)."""
    requests = 10_000 if stress_full else MEMORY_REQUESTS_SHORT
    run = _load(gallery, tmp_path, clients=8, image_fraction=0.2, requests=requests, warmup=200)
    report_figures({"gallery_images": 1000 if stress_full else 40, "run": run})
    assert run["requests"] == requests and not run["errors"], run
    assert not _memory_growth(run["server_rss_mb"]), run["server_rss_mb"]


def _memory_growth(rss: dict) -> list[str]:
    """The memory check: which of the whole resident set (which includes index pages the queries touch for the
    first time) and its anonymous part (heap and tensors, where a leak shows) grew on in the second half."""
    return [key for key in ("settled_growth_pct", "anon_settled_growth_pct") if rss[key] >= SETTLED_GROWTH_LIMIT_PCT]


LEAK = """
import os
import service.app

_create_app, _kept = service.app.create_app, []


def create_app(*args, **kwargs):
    app = _create_app(*args, **kwargs)
    size = int(os.environ["HAT_TEST_LEAK_BYTES"])

    @app.middleware("http")
    async def leak(request, call_next):
        _kept.append(os.urandom(size))  # random bytes: every page is touched, so resident
        return await call_next(request)

    return app


service.app.create_app = create_app
"""


def test_memory_check_catches_a_leak(gallery, report_figures, tmp_path):
    """The same check on a server that keeps 50 kB per request (a middleware loaded by ``sitecustomize``):
    it must fail, or the check above proves nothing."""
    hooks = tmp_path / "leaky"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(LEAK)
    env = [f"PYTHONPATH={hooks}{os.pathsep}{REPO}", "HAT_TEST_LEAK_BYTES=51200"]
    run = _load(gallery, tmp_path, clients=8, image_fraction=0.2, requests=MEMORY_REQUESTS_SHORT, warmup=200, env=env)
    report_figures({"leak_bytes_per_request": 51200, "run": run})
    assert run["requests"] == MEMORY_REQUESTS_SHORT and not run["errors"], run
    # The check trips, and on the anonymous part, where a leak of heap memory shows. (The whole resident set
    # grows by the same megabytes but on a base almost twice as large: 2.25% in one CI run, 4.02% in another.)
    assert "anon_settled_growth_pct" in _memory_growth(run["server_rss_mb"]), run["server_rss_mb"]
