"""Checkpoint loading and saving: the project's format round trip, the converter, and every bad file."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from model import CheckpointError, UnsafeCheckpointError, load_model, save_model
from model.authors import convert_authors_state_dict, infer_authors_config
from model.convert import main as convert_main


@pytest.fixture(scope="module")
def authors_ckpt(golden_ckpt):
    return torch.load(golden_ckpt, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def batch(golden_expected):
    return (
        torch.from_numpy(golden_expected["image_tensor"]),
        torch.from_numpy(golden_expected["text_ids"]),
        torch.from_numpy(golden_expected["text_mask"]),
        torch.from_numpy(golden_expected["text_lengths"]),
    )


def outputs(model, batch):
    pixels, ids, mask, lengths = batch
    with torch.no_grad():
        images = model.encode_images(pixels)
        texts = model.encode_texts(ids, mask)
        return images, texts, model.similarity(images, texts, lengths)


def write_ckpt(path, ckpt):
    torch.save(ckpt, path)
    return path


def test_project_format_round_trip_is_identical(golden_model, batch, tmp_path):
    saved = save_model(golden_model, tmp_path / "m")
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors", "vocab.txt"]
    loaded = load_model(saved)
    assert loaded.config == golden_model.config
    before, after = outputs(golden_model, batch), outputs(loaded, batch)
    for a, b in zip(before[0] + before[1] + [before[2]], after[0] + after[1] + [after[2]], strict=True):
        assert torch.equal(a, b)
    assert loaded.identity != golden_model.identity  # hashes of different files
    assert loaded.tokenizer.max_length == 32


def test_float16_storage_is_close_and_half_the_size(golden_model, batch, tmp_path):
    full = save_model(golden_model, tmp_path / "f32")
    half = save_model(golden_model, tmp_path / "f16", dtype="float16")
    size = (half / "model.safetensors").stat().st_size / (full / "model.safetensors").stat().st_size
    assert 0.45 < size < 0.55
    scores = outputs(load_model(half), batch)[2]
    assert (scores - outputs(golden_model, batch)[2]).abs().max() < 5e-3


def test_save_replaces_existing_directory(golden_model, tmp_path):
    target = tmp_path / "m"
    save_model(golden_model, target)
    (target / "stale.txt").write_text("old")
    save_model(golden_model, target, dtype="float16")
    assert not (target / "stale.txt").exists()
    assert json.loads((target / "config.json").read_text())["weights_dtype"] == "float16"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary leftovers


def test_convert_is_pure_and_moves_downsample(authors_ckpt):
    sd = authors_ckpt["state_dict"]
    snapshot = dict(sd)
    cfg = infer_authors_config(sd, authors_ckpt["hyper_parameters"]["config"])
    out = convert_authors_state_dict(sd, cfg.image_stages)
    assert dict(sd) == snapshot and list(sd) == list(snapshot)  # input untouched
    assert (
        out["image_encoder.swin.layers.1.downsample.reduction.weight"]
        is sd["vit_model.layers.0.downsample.reduction.weight"]
    )
    assert out["image_encoder.level_norms.0.weight"] is sd["vit_model.norm_1.weight"]
    assert out["image_encoder.level_norms.2.weight"] is sd["vit_model.norm.weight"]
    assert out["image_proj.0.weight"] is sd["cross_modal_image_transform_1.weight"]
    assert out["text_proj.2.weight"] is sd["cross_modal_text_transform.weight"]
    assert not any("attn_mask" in k or "relative_position_index" in k or "pooler" in k for k in out)


def test_converter_cli(golden_ckpt, golden_model, batch, tmp_path, capsys):
    assert convert_main([str(golden_ckpt), str(tmp_path / "out"), "--dtype", "float32"]) == 0
    assert "saved" in capsys.readouterr().out
    converted = outputs(load_model(tmp_path / "out"), batch)[2]
    assert torch.equal(converted, outputs(golden_model, batch)[2])
    assert convert_main([str(tmp_path / "nope.ckpt"), str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err


# ---- bad files: each gives a CheckpointError naming the problem -------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "absent.ckpt")


def test_truncated_checkpoint(golden_ckpt, tmp_path):
    data = golden_ckpt.read_bytes()
    path = tmp_path / "cut.ckpt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(path)


@pytest.mark.parametrize("content", [b"", b"hello, I am not a checkpoint\n", bytes(range(256)) * 4])
def test_non_checkpoint_files(tmp_path, content):
    path = tmp_path / "junk.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a"):
        load_model(path)


def test_unsafe_pickle_refused_then_opt_in(authors_ckpt, tmp_path):
    ckpt = dict(authors_ckpt, hyper_parameters={"config": {}, "args": argparse.Namespace(lr=1)})
    path = write_ckpt(tmp_path / "unsafe.ckpt", ckpt)
    with pytest.raises(UnsafeCheckpointError, match="allow_unsafe_pickle=True"):
        load_model(path)
    assert load_model(path, allow_unsafe_pickle=True).config.embed_dim == 48


def test_not_a_hat_checkpoint(tmp_path):
    path = write_ckpt(tmp_path / "other.ckpt", {"state_dict": {"encoder.weight": torch.zeros(2, 2)}})
    with pytest.raises(CheckpointError, match="holds no HAT weights"):
        load_model(path)
    path = write_ckpt(tmp_path / "list.ckpt", [1, 2, 3])
    with pytest.raises(CheckpointError, match="not a checkpoint dictionary"):
        load_model(path)


def test_missing_key(authors_ckpt, tmp_path):
    sd = dict(authors_ckpt["state_dict"])
    del sd["text_transformer.encoder.layer.3.output.dense.bias"]
    path = write_ckpt(tmp_path / "m.ckpt", dict(authors_ckpt, state_dict=sd))
    with pytest.raises(
        CheckpointError, match=r"missing keys \(1\): text_encoder.bert.encoder.layer.3.output.dense.bias"
    ):
        load_model(path)


def test_unexpected_key(authors_ckpt, tmp_path):
    sd = dict(authors_ckpt["state_dict"], **{"itm_head.weight": torch.zeros(2, 2)})
    path = write_ckpt(tmp_path / "u.ckpt", dict(authors_ckpt, state_dict=sd))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): itm_head.weight"):
        load_model(path)


def test_wrong_shape(authors_ckpt, tmp_path):
    sd = dict(authors_ckpt["state_dict"])
    sd["text_transformer.encoder.layer.0.attention.self.query.bias"] = torch.zeros(7)
    path = write_ckpt(tmp_path / "s.ckpt", dict(authors_ckpt, state_dict=sd))
    with pytest.raises(CheckpointError, match=r"wrong shapes \(1\).*query.bias: checkpoint \(7,\) vs model \(128,\)"):
        load_model(path)


def test_projection_from_no_stage(authors_ckpt, tmp_path):
    sd = dict(authors_ckpt["state_dict"])
    sd["cross_modal_image_transform_1.weight"] = torch.zeros(48, 33)
    path = write_ckpt(tmp_path / "p.ckpt", dict(authors_ckpt, state_dict=sd))
    with pytest.raises(CheckpointError, match="takes 33 features"):
        load_model(path)


def test_project_format_errors(golden_model, tmp_path):
    saved = save_model(golden_model, tmp_path / "m")
    config = json.loads((saved / "config.json").read_text())

    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(saved)

    (saved / "config.json").write_text(json.dumps(dict(config, format_version=99)))
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_model(saved)

    (saved / "config.json").write_text(json.dumps(dict(config, model=dict(config["model"], colour="red"))))
    with pytest.raises(CheckpointError, match="colour"):
        load_model(saved)

    (saved / "config.json").write_text(json.dumps(config))
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_model(saved)
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        load_model(saved)
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        load_model(saved)
