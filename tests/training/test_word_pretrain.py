"""The image encoder's n-gram warm-up: targets from captions, a training loop that learns them, and its place
in ``training.train`` (runs once, before HAT's epochs; a resumed run does not repeat it)."""

from __future__ import annotations

import pytest
import torch

from training import TrainConfig, build_model, train
from training.loop import _epoch_loader, _read_resume_state
from training.synthetic import main as synthetic_main
from training.word_pretrain import caption_ngrams, ngram_targets, pretrain_image_encoder


def test_caption_ngrams_are_lowercased_words_and_adjacent_pairs():
    assert caption_ngrams("A red Circle, left of it!") == {
        "a",
        "red",
        "circle",
        "left",
        "of",
        "it",
        "a red",
        "red circle",
        "circle left",
        "left of",
        "of it",
    }
    assert caption_ngrams("...") == set()


def test_ngram_targets_vocabulary_rules_and_rows():
    images = [
        ["a red circle", "the circle"],  # the union over an image's captions
        ["a red square"],
        ["a blue square"],
        ["a blue circle"],
    ]
    vocab, targets = ngram_targets(images, max_vocab=10, min_images=2, max_fraction=0.5)
    # "a" is in every image (over max_fraction); "the", "the circle", "a red" ... in one image (under min_images).
    assert vocab == ["a blue", "a red", "blue", "circle", "red", "square"]
    assert targets.shape == (4, 6) and targets.dtype == torch.float32
    assert targets[0].tolist() == [0, 1, 0, 1, 1, 0]
    assert targets[2].tolist() == [1, 0, 1, 0, 0, 1]
    top, _ = ngram_targets(images, max_vocab=2, min_images=2, max_fraction=0.5)
    assert top == ["a blue", "a red"]  # most frequent first, ties by the n-gram itself


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("ngram-world")
    synthetic_main(["--out", str(out), "--seed", "5", "--train", "64", "--val", "8", "--test", "4", "--size", "73"])
    return out


@pytest.mark.slow
def test_pretraining_learns_the_targets_and_leaves_no_head(world, tiny_minilm_config):
    """On 16 images the warm-up must get below the best image-blind loss (each n-gram's base rate)."""
    from training.data import read_karpathy
    from training.loop import PreloadedImages

    torch.manual_seed(0)
    cfg = TrainConfig(batch_size=16, model=tiny_minilm_config.to_dict(), augment=False)
    model = build_model(cfg, None, None)
    keys = set(model.state_dict())
    entries = read_karpathy(world / "dataset.json", world / "images", "train")[:16]
    _, targets = ngram_targets([e.captions for e in entries], min_images=2)
    rate = targets.mean(0).clamp(1e-6, 1 - 1e-6)
    blind = float(-(rate * rate.log() + (1 - rate) * (1 - rate).log()).mean())
    data = PreloadedImages(entries, 64)
    records = pretrain_image_encoder(
        model,
        lambda k: _epoch_loader(cfg, data, -1 - k)[0],
        targets,
        epochs=150,
        lr=1e-3,
        autocast=lambda: torch.autocast("cpu", enabled=False),
    )
    assert [r["pretrain_epoch"] for r in records] == list(range(150))
    assert records[-1]["loss"] < 0.8 * blind, (blind, records[-5:])
    assert records[-1]["train_f1"] > 0.5, records[-5:]
    assert set(model.state_dict()) == keys  # the prediction head is not part of the model


@pytest.mark.slow
def test_train_runs_the_warm_up_once_and_resume_skips_it(world, tiny_minilm_config, tmp_path):
    cfg = TrainConfig(
        epochs=1,
        batch_size=16,
        workers=0,
        val_images=8,
        pretrain_epochs=2,
        augment=False,
        amp="off",
        model=tiny_minilm_config.to_dict(),
    )
    out = tmp_path / "run"
    result = train(cfg, world / "dataset.json", world / "images", out)
    assert [r["pretrain_epoch"] for r in result["pretrain"]] == [0, 1]
    assert result["pretrain"][0]["images_per_second"] > 0
    assert result["seconds"] >= result["pretrain_seconds"] > 0
    assert [h["epoch"] for h in result["history"]] == [0]
    saved = _read_resume_state(out / "last.pt")["state"]
    assert saved["pretrain"] == result["pretrain"]
    cfg.epochs = 2
    again = train(cfg, world / "dataset.json", world / "images", out, resume=True)
    assert again["pretrain"] == result["pretrain"]  # not run again
    assert [h["epoch"] for h in again["history"]] == [0, 1]


def test_heads_on_shallower_levels_add_their_losses_and_leave_no_head(tiny_minilm_config):
    """``levels=k`` puts a head on each of the last k levels; the loss is their sum; none stays in the model."""
    pixels = torch.randn(8, 3, 64, 64)
    targets = (torch.rand(8, 30, generator=torch.Generator().manual_seed(1)) > 0.7).float()
    off = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    first_loss = {}
    for levels in (1, 3):
        torch.manual_seed(0)
        model = build_model(TrainConfig(model=tiny_minilm_config.to_dict()), None, None)
        keys = set(model.state_dict())
        records = pretrain_image_encoder(model, lambda k: [(pixels, torch.arange(8))], targets, 1, 1e-3, off, levels)
        first_loss[levels] = records[0]["loss"]
        assert set(model.state_dict()) == keys
    # untrained heads each start near ln 2 per target: three heads give about three times one head's loss
    assert 2.5 < first_loss[3] / first_loss[1] < 3.5, first_loss
    with pytest.raises(ValueError, match="levels must lie in"):
        pretrain_image_encoder(model, lambda k: [], targets, 1, 1e-3, off, levels=4)
