"""The vectorised SCAN scorer against the golden scores, a plain per-pair implementation, and itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.alignment import (
    hierarchical_similarity,
    level_attention,
    level_similarities,
    region_norms,
    scan,
    scan_i2t,
    scan_t2i,
)

TOL = 1e-5


def naive_pair(x: torch.Tensor, t: torch.Tensor, lam: float, direction: str) -> float:
    """The formula of the design brief, written out for one image [R, D] and one caption [n, D]."""
    if direction == "t2i":
        x, t = t, x  # words attend over regions: swap the roles
    s = F.leaky_relu(t @ x.T, 0.1)  # [n, R]
    s = s / (s.norm(dim=1, keepdim=True) + 1e-8)  # over regions for each word
    a = torch.softmax(lam * s.T, dim=1)  # [R, n], softmax over words
    c = a @ t  # [R, D]
    cos = (x * c).sum(1) / (x.norm(dim=1) * c.norm(dim=1)).clamp_min(1e-8)
    return float(cos.mean())


def naive(images, texts, lengths, lam, direction):
    out = torch.empty(images.shape[0], texts.shape[0], dtype=torch.float64)
    for i in range(images.shape[0]):
        for j in range(texts.shape[0]):
            out[i, j] = naive_pair(images[i].double(), texts[j, : lengths[j]].double(), lam, direction)
    return out


def random_inputs(seed=0, n=4, m=6, regions=13, words=11, dim=16):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, regions, dim, generator=gen) * torch.rand(n, regions, 1, generator=gen) * 3
    texts = torch.randn(m, words, dim, generator=gen)
    lengths = torch.randint(2, words + 1, (m,), generator=gen)
    lengths[0] = words
    return images, texts, lengths


@pytest.mark.parametrize("tag", ["lam9", "lam4"])
@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_golden_scan_scores(golden_scan, tag, direction):
    images = torch.from_numpy(golden_scan[f"{tag}_images"])
    texts = torch.from_numpy(golden_scan[f"{tag}_texts"])
    lengths = torch.from_numpy(golden_scan[f"{tag}_lengths"])
    lam = float(golden_scan[f"{tag}_lambda"])
    got = scan(images, texts, lengths, lam, direction).numpy()
    np.testing.assert_allclose(got, golden_scan[f"{tag}_{direction}"], atol=TOL, rtol=0)


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
@pytest.mark.parametrize("dim", [16, 8])  # t2i: 13 regions <= 16 uses X X^T, > 8 forms the context
def test_matches_plain_formula(direction, dim):
    images, texts, lengths = random_inputs(dim=dim)
    got = scan(images, texts, lengths, 9.0, direction)
    want = naive(images, texts, lengths, 9.0, direction)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=TOL, rtol=0)


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_chunking_does_not_change_scores(direction):
    images, texts, lengths = random_inputs(seed=1, n=7, m=9)
    whole = scan(images, texts, lengths, 9.0, direction)
    for chunk in (1, 50, 13 * 11 * 3):
        np.testing.assert_allclose(
            scan(images, texts, lengths, 9.0, direction, chunk_elements=chunk).numpy(), whole.numpy(), atol=1e-6
        )


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_padding_content_is_ignored(direction):
    images, texts, lengths = random_inputs(seed=2)
    garbage = texts.clone()
    for j, n in enumerate(lengths):
        garbage[j, n:] = 1e3 * torch.randn_like(garbage[j, n:])
    np.testing.assert_allclose(
        scan(images, garbage, lengths, 9.0, direction).numpy(),
        scan(images, texts, lengths, 9.0, direction).numpy(),
        atol=1e-6,
    )
    # Extra zero padding columns change nothing either.
    padded = torch.cat([texts, torch.zeros(texts.shape[0], 5, texts.shape[2])], dim=1)
    np.testing.assert_allclose(
        scan(images, padded, lengths, 9.0, direction).numpy(),
        scan(images, texts, lengths, 9.0, direction).numpy(),
        atol=1e-6,
    )


def test_cached_region_norms_give_same_scores():
    images, texts, lengths = random_inputs(seed=3)
    np.testing.assert_allclose(
        scan_i2t(images, texts, lengths, image_norms=region_norms(images)).numpy(),
        scan_i2t(images, texts, lengths).numpy(),
        atol=0,
    )


def test_hierarchical_similarity_is_sum_of_levels():
    a = random_inputs(seed=4)
    b = random_inputs(seed=5, regions=5)
    lengths = a[2]
    total = hierarchical_similarity([a[0], b[0]], [a[1], b[1]], lengths, 9.0, "i2t")
    want = scan_i2t(a[0], a[1], lengths) + scan_i2t(b[0], b[1], lengths)
    np.testing.assert_allclose(total.numpy(), want.numpy(), atol=1e-6)


# Half precision: products in bf16/fp16, element-wise work in fp32. Measured max abs error of a level score
# on inputs like these (seeds 6-9, D = 64, 49 regions, up to 20 words): bf16 1.7e-4..1.7e-3, fp16 1.4e-5..2.5e-4.
# The bounds are about 3x the worst measured value.
HALF_BOUNDS = {torch.bfloat16: 5e-3, torch.float16: 1e-3}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_half_precision_error_bound(dtype, direction):
    images, texts, lengths = random_inputs(seed=6, n=5, m=8, regions=49, words=20, dim=64)
    ref = scan(images, texts, lengths, 9.0, direction)
    # Round the inputs to the half type first: the bound covers the scorer, given stored half features.
    got = scan(images.to(dtype), texts.to(dtype), lengths, 9.0, direction)
    assert got.dtype == torch.float32
    err = (got - ref).abs().max().item()
    assert err < HALF_BOUNDS[dtype], f"{dtype} {direction}: max abs error {err:.2e}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available on this machine")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu(golden_scan, dtype):
    images = torch.from_numpy(golden_scan["lam9_images"])
    texts = torch.from_numpy(golden_scan["lam9_texts"])
    lengths = torch.from_numpy(golden_scan["lam9_lengths"])
    for direction in ("i2t", "t2i"):
        got = scan(images.cuda().to(dtype), texts.cuda().to(dtype), lengths.cuda(), 9.0, direction).cpu()
        bound = TOL if dtype == torch.float32 else 5e-2
        np.testing.assert_allclose(got.numpy(), golden_scan[f"lam9_{direction}"], atol=bound, rtol=0)


def test_empty_inputs_give_empty_scores():
    images, texts, lengths = random_inputs()
    assert scan_i2t(images[:0], texts, lengths).shape == (0, texts.shape[0])
    assert scan_t2i(images, texts[:0], lengths[:0]).shape == (images.shape[0], 0)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda i, t, n: (i[0], t, n), "images must be"),
        (lambda i, t, n: (i, t[..., :3], n), "feature sizes differ"),
        (lambda i, t, n: (i, t, n[:-1]), "lengths has"),
        (lambda i, t, n: (i, t, n * 0), "text lengths must lie"),
        (lambda i, t, n: (i, t, n + 100), "text lengths must lie"),
    ],
)
def test_bad_inputs_are_named(mutate, message):
    with pytest.raises(ValueError, match=message):
        scan_i2t(*mutate(*random_inputs()))


def test_unknown_direction():
    with pytest.raises(ValueError, match="direction"):
        scan(*random_inputs(), 9.0, "sideways")


@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_level_attention_is_the_scorers(direction):
    """The weights ``level_attention`` reports are the ones the score uses: written out from the brief's formula
    they agree, the score recomputed from them equals the vectorised scorer's, and each word's map is a
    distribution over the regions."""
    images, texts, lengths = random_inputs(seed=3)
    n = int(lengths[1])
    image, text = images[2], texts[1, :n]
    got = level_attention(image, text, 9.0, direction)
    s = F.leaky_relu(text @ image.T, 0.1)  # [n, R]
    if direction == "i2t":
        s = s / (s.norm(dim=1, keepdim=True) + 1e-8)
        want = torch.softmax(9.0 * s.T, dim=1)  # [R, n] over words
        maps = want.T / want.T.sum(dim=1, keepdim=True)
    else:
        s = s / (s.norm(dim=0, keepdim=True) + 1e-8)
        want = maps = torch.softmax(9.0 * s, dim=1)  # [n, R] over regions
    torch.testing.assert_close(got.weights, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.word_maps, maps, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.word_maps.sum(dim=1), torch.ones(n), atol=1e-5, rtol=0)
    scorer = scan(images[2:3], texts[1:2], lengths[1:2], 9.0, direction)
    assert abs(got.score - float(scorer[0, 0])) < 1e-5


def test_level_similarities_sum_to_the_hat_score():
    images, texts, lengths = random_inputs()
    levels = [images, images[:, :7] * 2]
    words = [texts, texts.flip(1)]
    parts = level_similarities(levels, words, lengths, 9.0, "i2t")
    assert torch.equal(parts[0] + parts[1], hierarchical_similarity(levels, words, lengths, 9.0, "i2t"))
