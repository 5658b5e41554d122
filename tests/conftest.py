"""Shared fixtures: the golden reference files in ../shared/golden/ (computed with the authors' code)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("HAT_GOLDEN_DIR", REPO.parent / "shared" / "golden"))


def _golden_file(name: str) -> Path:
    path = GOLDEN / name
    if not path.is_file():
        pytest.skip(
            f"GOLDEN REFERENCE FILES ABSENT: {path} not found. These tests prove the model is HAT; "
            "set HAT_GOLDEN_DIR to the folder holding them.",
        )
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
