"""Our own decoder fuzzing: a generated corpus of image files in every format Pillow writes here, many of them
broken the ways real files break (tests/decoder_corpus.py), through the builder and through the service.

The build finishes (exit 0) with every file either indexed or skipped with a reason; every file POSTed to
``/search/image`` of a real ``python -m service`` process gets 200 or a JSON 4xx, with no 5xx and no connection
error, and the server's resident memory grows by under 10%. Short in `make test` (300 files); `make stress`
(HAT_STRESS=full) makes 3,000.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest
from decoder_corpus import make_corpus
from live_server import wait_ready

pytestmark = pytest.mark.stress

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO / "models" / "demo"
MAX_PIXELS = 4_000_000  # the corpus's absurd sizes are refused from the header, not decoded for minutes


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024


def _reason_kind(reason: str) -> str:
    for kind in ("not an image", "decompression bomb", "cannot decode", "unsupported image variant", "file not found"):
        if kind in reason:
            return kind
    return reason


@pytest.fixture(scope="module")
def corpus(stress_full, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("decoder-corpus")
    made = make_corpus(folder, 3000 if stress_full else 300, seed=11)
    for name in list(made)[:40]:  # some captions, so that image -> caption searches have a text gallery
        (folder / name).with_suffix(".txt").write_text(f"a caption for {name}\n")
    return folder, made


@pytest.fixture(scope="module")
def built(corpus, run_builder, tmp_path_factory) -> dict:
    folder = corpus[0]
    root = tmp_path_factory.mktemp("decoder-index")
    report = root.parent / f"{root.name}-report.json"
    args = ["--gallery", str(folder), "--model", str(DEMO_MODEL), "--out", str(root), "--max-pixels", str(MAX_PIXELS)]
    proc = run_builder("build", *args, "--report", str(report), "--no-progress", timeout=1800)
    return {"root": root, "report": json.loads(report.read_text()), "stderr": proc.stderr}


def test_the_build_indexes_or_skips_every_file_with_a_reason(corpus, built, report_figures):
    _, made = corpus
    result = built["report"]
    skipped = {s["id"] or s["source"]: s["reason"] for s in result["skipped"]}  # ids: names in the folder
    assert "Traceback" not in built["stderr"], built["stderr"][-3000:]
    assert result["indexed"] + len(skipped) == len(made), (result["indexed"], len(skipped), len(made))
    assert set(skipped) <= set(made) and all(skipped.values())
    by_reason = Counter(_reason_kind(r) for r in skipped.values())
    formats = Counter(how.split(",")[0].split()[0] for how in made.values())
    report_figures({"files": len(made), "formats": dict(formats), "indexed": result["indexed"],
                    "skipped_by_reason": dict(by_reason), "build_seconds": result["seconds"]})  # fmt: skip
    assert set(by_reason) <= {"not an image", "decompression bomb", "cannot decode", "unsupported image variant"}
    assert result["indexed"] >= len(made) // 3  # most unmutated files decode


def test_every_upload_gets_200_or_a_json_4xx(corpus, built, report_figures, tmp_path):
    folder, made = corpus
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "HAT_INDEX_ROOT": str(built["root"]), "HAT_MODEL": str(DEMO_MODEL), "HAT_PORT": str(port),
           "HAT_RELOAD_INTERVAL": "0", "HAT_MAX_IMAGE_PIXELS": str(MAX_PIXELS)}  # fmt: skip
    log = tmp_path / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "service"], env=env, cwd=REPO, stdout=fh, stderr=fh)
    statuses: Counter = Counter()
    codes: Counter = Counter()
    failures: list[str] = []
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, timeout=180)
        names = sorted(made)
        with httpx.Client(base_url=url, timeout=120) as client:  # one keep-alive connection for all of them
            rss = []
            for i, name in enumerate(names):
                if i == 20:
                    rss.append(_rss_mb(proc.pid))  # after a warm-up
                target = "captions" if i % 2 else "image"
                try:
                    r = client.post("/search/image", files={"image": (name, (folder / name).read_bytes())},
                                    data={"k": "3", "target": target})  # fmt: skip
                except httpx.HTTPError as exc:
                    statuses[type(exc).__name__] += 1
                    failures.append(f"{name} ({made[name]}): {type(exc).__name__}: {exc}")
                    continue
                statuses[r.status_code] += 1
                if r.status_code != 200:
                    body = r.json()  # every refusal is JSON with a code and a message
                    codes[body["error"]["code"]] += 1
                    if r.status_code >= 500 or not body["error"]["message"]:
                        failures.append(f"{name} ({made[name]}): {r.status_code} {r.text[:300]}")
            rss.append(_rss_mb(proc.pid))
            assert client.get("/healthz").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    growth = 100 * (rss[-1] - rss[0]) / rss[0]
    report_figures({"uploads": sum(statuses.values()), "by_status": {str(k): v for k, v in statuses.items()},
                    "by_error_code": dict(codes), "rss_mb_after_warmup": round(rss[0], 1),
                    "rss_mb_end": round(rss[-1], 1), "rss_growth_pct": round(growth, 2)})  # fmt: skip
    assert not failures, failures[:20]
    assert set(statuses) <= {200, 413, 415, 422}, statuses
    assert "Traceback" not in log.read_text()
    assert growth < 10, (rss, growth)
