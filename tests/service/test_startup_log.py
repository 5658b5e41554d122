"""What the logs say at start-up: one line naming the model, device, precisions, index version and FAISS types;
nothing from FAISS's instruction-set probing (``faiss.loader``), in the service or in the builder."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from index_format import DEFAULT_STORE, open_index
from model import TEXT_PRECISIONS
from service.settings import Settings
from service.startup import serving_line

REPO = Path(__file__).resolve().parents[2]
FAISS_PROBING = ("faiss.loader", "Loading faiss", "Could not load library")


def _environment(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAT_")}
    return {**env, **values}


def test_serving_line_names_what_is_in_use(demo_model, index_root):
    index = open_index((index_root / "current").resolve())
    try:
        line = serving_line(Settings(rerank_dtype="bfloat16", workers=3, max_batch=4), demo_model, index)
    finally:
        index.close()
    assert line.startswith("serving: model models/demo (") and "\n" not in line
    assert f"({demo_model.identity[:12]}, float32 weights) on cpu" in line
    assert f"index {index.version} (40 images, 200 captions; store {DEFAULT_STORE})" in line  # the builder's default
    assert "FAISS images flat-ip [IndexFlatIP], captions flat-ip [IndexFlatIP]" in line
    assert "re-rank bfloat16" in line and "x 3 workers, batches of up to 4" in line


def test_serving_line_without_an_index(demo_model):
    line = serving_line(Settings(), demo_model, None, "HAT_INDEX_ROOT is not set: no index to search")
    assert "; no index (HAT_INDEX_ROOT is not set: no index to search); re-rank float32;" in line


def test_service_start_up_log_is_one_line_and_no_faiss_probing(index_root, tmp_path):
    log = tmp_path / "service.log"
    env = _environment(HAT_INDEX_ROOT=str(index_root), HAT_PORT="0", HAT_RELOAD_INTERVAL="0")
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=env, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 180
        while "serving: " not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    text = log.read_text()
    lines = [line for line in text.splitlines() if "serving: " in line]
    assert len(lines) == 1, text
    assert "INFO service: serving: model models/demo (" in lines[0] and "on cpu" in lines[0], lines[0]
    assert "; index v-" in lines[0] and "FAISS images flat-ip [IndexFlatIP], captions flat-ip" in lines[0]
    assert "re-rank float32" in lines[0]
    # HAT_TEXT_PRECISION unset = auto: the candidates were timed, and the choice is in the serving line
    (measured,) = [line for line in text.splitlines() if "INFO service: text encoder " in line]
    chosen = measured.split("INFO service: text encoder ", 1)[1].split(":", 1)[0]
    assert chosen in TEXT_PRECISIONS and "float32 " in measured and " ms (err " in measured, text
    # onnx with the default 2 workers also tries a wide session for queries that find the service quiet, kept when
    # it timed faster at start-up; either way the measured line says so, and the serving line names a kept one
    threads = max(1, (os.cpu_count() or 1) // 2)  # HAT_THREADS unset: the cores over the 2 workers
    kept = f"; {2 * threads} threads while the other search workers are idle (" in measured
    if chosen == "onnx":
        assert kept or "; no wide session (more threads: " in measured, measured
    else:
        assert "wide session" not in measured and "threads while" not in measured, measured
    wide = f" ({2 * threads} threads while the other workers are idle)" if kept else ""
    assert f"; query encoder {chosen}{wide}; re-rank float32;" in lines[0], lines[0]
    assert not [line for line in text.splitlines() if any(p in line for p in FAISS_PROBING)], text


def test_builder_log_has_no_faiss_probing(index_root, world, tmp_path):
    """``remove`` writes FAISS indices (it imports faiss) without loading a model: a cheap builder run."""
    root = tmp_path / "root"
    shutil.copytree(index_root, root, symlinks=True, ignore=shutil.ignore_patterns(".lock"))
    cmd = [sys.executable, "-m", "index_builder", "remove", "--out", str(root), world["base_ids"][0]]
    proc = subprocess.run(cmd, cwd=REPO, env=_environment(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert '"removed": 1' in proc.stdout
    assert "INFO" in proc.stderr  # the builder logs at INFO: the probing would show if it were logged
    assert not [line for line in proc.stderr.splitlines() if any(p in line for p in FAISS_PROBING)], proc.stderr
