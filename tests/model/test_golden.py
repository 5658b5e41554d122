"""The model reproduces the authors' implementation on the golden checkpoint (float32, CPU, within 1e-5)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from model import preprocess_image

TOL = 1e-5


@pytest.fixture(scope="module")
def encoded(golden_model, golden_expected):
    with torch.no_grad():
        images = golden_model.encode_images(torch.from_numpy(golden_expected["image_tensor"]))
        texts = golden_model.encode_texts(
            torch.from_numpy(golden_expected["text_ids"]), torch.from_numpy(golden_expected["text_mask"])
        )
    return images, texts, torch.from_numpy(golden_expected["text_lengths"])


def test_inferred_architecture(golden_model):
    cfg = golden_model.config
    assert (cfg.image.patch_size, cfg.image.embed_dim, cfg.image.window_size) == (4, 16, 7)
    assert cfg.image.depths == (2, 2, 2, 2)
    assert cfg.image.num_heads == (1, 2, 4, 8)
    assert (cfg.text.vocab_size, cfg.text.hidden_size, cfg.text.num_hidden_layers) == (1000, 128, 12)
    assert cfg.text.num_attention_heads == 2  # 128 / 64
    assert (cfg.text.intermediate_size, cfg.text.max_position_embeddings) == (256, 64)
    assert cfg.embed_dim == 48
    assert cfg.image_stages == (1, 2, 3)
    assert cfg.text_layers == (4, 10, 12)
    assert (cfg.lambda_softmax, cfg.direction, cfg.max_text_len) == (9.0, "i2t", 32)


@pytest.mark.parametrize("index", [0, 1])
def test_preprocessing_matches_authors_transform(golden_expected, index):
    image = Image.open(io.BytesIO(golden_expected[f"image_png_{index}"].tobytes()))
    tensor = preprocess_image(image, 224)
    assert tensor.shape == (3, 224, 224)
    np.testing.assert_allclose(tensor.numpy(), golden_expected["image_tensor"][index], atol=TOL, rtol=0)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_image_levels(encoded, golden_expected, level):
    got = encoded[0][level - 1].numpy()
    want = golden_expected[f"image_level{level}"]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_text_levels_valid_tokens(encoded, golden_expected, level):
    got = encoded[1][level - 1].numpy()
    want = golden_expected[f"text_level{level}"]
    assert got.shape == want.shape
    for j, n in enumerate(golden_expected["text_lengths"]):
        np.testing.assert_allclose(got[j, :n], want[j, :n], atol=TOL, rtol=0)


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_scores_per_level_and_sum(golden_model, encoded, golden_expected, direction):
    from model.alignment import scan

    images, texts, lengths = encoded
    for level in range(3):
        got = scan(images[level], texts[level], lengths, 9.0, direction).numpy()
        np.testing.assert_allclose(got, golden_expected[f"{direction}_level{level + 1}"], atol=TOL, rtol=0)
    total = golden_model.similarity(images, texts, lengths, direction=direction).numpy()
    np.testing.assert_allclose(total, golden_expected[f"{direction}_sum"], atol=TOL, rtol=0)


def test_default_direction_is_i2t(golden_model, encoded, golden_expected):
    images, texts, lengths = encoded
    np.testing.assert_allclose(
        golden_model.similarity(images, texts, lengths).numpy(), golden_expected["i2t_sum"], atol=TOL, rtol=0
    )


def test_text_padding_length_does_not_change_valid_tokens(golden_model, golden_expected):
    """The tokenizer pads to the longest caption, the authors to 32: the valid tokens must agree."""
    ids = torch.from_numpy(golden_expected["text_ids"])[:2]
    mask = torch.from_numpy(golden_expected["text_mask"])[:2]
    n = int(mask.sum(1).max())
    with torch.no_grad():
        full = golden_model.encode_texts(ids, mask)
        short = golden_model.encode_texts(ids[:, :n], mask[:, :n])
    for f, s in zip(full, short, strict=True):
        for j in range(2):
            valid = int(mask[j].sum())
            np.testing.assert_allclose(s[j, :valid].numpy(), f[j, :valid].numpy(), atol=1e-6, rtol=0)
