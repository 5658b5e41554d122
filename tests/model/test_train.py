"""A tiny model trains for a few epochs on a tiny generated world: the loss goes down, recall beats chance,
the run resumes, and the best model loads back."""

from __future__ import annotations

import json

import pytest
import torch

from model import load_model
from model.config import HATConfig, SwinConfig, TextConfig
from model.data import read_karpathy
from model.evaluate import encode_split, evaluate_encoded
from model.evaluate import main as evaluate_main
from model.synthetic import main as synthetic_main
from model.train import TrainConfig, train

pytestmark = pytest.mark.slow


def tiny_config() -> dict:
    return HATConfig(
        image=SwinConfig(
            image_size=64, patch_size=8, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4
        ),
        text=TextConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64
        ),
        embed_dim=32,
        text_layers=(1, 2, 2),
        global_dim=32,
    ).to_dict()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-world")
    synthetic_main(["--out", str(out), "--seed", "3", "--train", "48", "--val", "16", "--test", "16", "--size", "73"])
    return out


@pytest.fixture(scope="module")
def run(world, tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(
        preset="demo",
        epochs=6,
        batch_size=16,
        lr=1e-3,
        lr_step=100,
        hardest_from_epoch=3,
        workers=0,
        val_images=16,
        model=tiny_config(),
        amp="off",
    )
    result = train(cfg, world / "dataset.json", world / "images", out)
    return out, result, cfg


def test_loss_goes_down_and_recall_beats_chance(world, run):
    out, result, _ = run
    history = result["history"]
    assert len(history) == 6
    # Compare like with like: epochs 0-2 sum all violations, 3-5 take the hardest.
    assert history[2]["loss"] < history[0]["loss"]
    assert history[5]["loss"] < history[3]["loss"]
    model = load_model(out / "best")
    entries = read_karpathy(world / "dataset.json", world / "images", "train")
    res = evaluate_encoded(model, encode_split(model, entries), "all")
    # Chance on 48 images / 240 captions: R@1/5/10 about 2/10/21 %, RSUM about 66.
    assert res["hat"]["rsum"] > 100, res["hat"]
    assert result["images_per_second"] > 0


def test_resume_continues_after_last_epoch(world, run):
    out, result, cfg = run
    cfg.epochs = 7
    again = train(cfg, world / "dataset.json", world / "images", out, resume=True)
    assert [h["epoch"] for h in again["history"]] == list(range(7))
    assert again["history"][:6] == result["history"]


def test_evaluate_cli_writes_json(world, run, tmp_path, capsys):
    out, _, _ = run
    target = tmp_path / "eval.json"
    argv = [
        "--model",
        str(out / "best"),
        "--dataset",
        str(world / "dataset.json"),
        "--images",
        str(world / "images"),
        "--split",
        "test",
        "--json",
        str(target),
    ]
    assert evaluate_main(argv) == 0
    data = json.loads(target.read_text())
    assert set(data) == {"hat", "level1", "level2", "level3", "global"}
    for variant in data.values():
        assert set(variant) == {"i2t", "t2i", "rsum"} and set(variant["i2t"]) == {"r1", "r5", "r10"}
    assert "protocol all" in capsys.readouterr().out
