"""Property-based fuzzing of the live server from its own OpenAPI schema (schemathesis), over real HTTP.

Every generated request must get a response that matches the schema (status documented, body valid, content
type documented) and no 5xx; requests are counted by the server itself (its /metrics counters). Short in
`make test`; `make stress` (HAT_STRESS=full) generates enough for over 1,000 requests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.stress

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
CONFIG = Path(__file__).with_name("schemathesis.toml")
HOOKS = Path(__file__).with_name("schemathesis_hooks.py")
SEED = int(os.environ.get("HAT_FUZZ_SEED") or 20261125)  # another seed explores other requests


def _answered(server) -> dict[str, int]:
    """Responses the server has sent so far, by status (its own request counters)."""
    counts: dict[str, int] = {}
    for (_route, _method, status), n in dict(server.app.state.metrics.requests).items():
        counts[status] = counts.get(status, 0) + n
    return counts


def test_fuzz_every_operation_from_the_schema(server, stress_full, report_figures, tmp_path):
    examples = 300 if stress_full else 20
    before = _answered(server)
    report = tmp_path / "schemathesis.json"
    cmd = [
        str(SCHEMATHESIS), "--config-file", str(CONFIG), "run", f"{server.url}/openapi.json",
        "--max-examples", str(examples), "--seed", str(SEED), "--workers", "1",
        "--continue-on-failure", "--header", "X-Admin-Key: test-key",
        "--report", "json", "--report-json-path", str(report),
    ]  # fmt: skip
    started = time.monotonic()
    # The hooks rename generated filter keys to the index's metadata keys (see schemathesis_hooks.py).
    env = {**os.environ, "SCHEMATHESIS_HOOKS": HOOKS.stem,
           "PYTHONPATH": os.pathsep.join([str(HOOKS.parent), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=3000, env=env)
    seconds = time.monotonic() - started
    after = _answered(server)
    by_status = {s: after.get(s, 0) - before.get(s, 0) for s in sorted(set(after) | set(before))}
    by_status = {s: n for s, n in by_status.items() if n}
    run = json.loads(report.read_text())
    figures = {
        "schemathesis": run["schemathesis_version"],
        "seed": SEED,
        "max_examples_per_operation": examples,
        "operations_tested": run["operations"]["tested"],
        "test_cases": run["test_cases"]["generated"],
        "requests_answered": sum(by_status.values()),
        "responses_by_status": by_status,
        "failures": run["failures"],
        "errors": run["errors"],
        "seconds": round(seconds, 1),
    }
    report_figures(figures)
    assert done.returncode == 0, f"schemathesis found problems:\n{done.stdout[-6000:]}\n{done.stderr[-2000:]}"
    assert not run["failures"] and not run["errors"], figures
    assert run["operations"]["tested"] == run["operations"]["total"] >= 7, run["operations"]
    assert not any(s.startswith("5") for s in by_status), by_status
    assert sum(by_status.values()) >= (1000 if stress_full else 100), by_status
