"""Feature stores: encodings round-trip, the pca store's bit budget and its rotation leaving scores intact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from index_format.store import StoreSpec, Table, allocate_bits, train_codebooks, write_table
from model.alignment import hierarchical_similarity


def test_store_spec_parsing():
    assert StoreSpec.parse("float16").kind == "float16"
    assert StoreSpec.parse("pca") == StoreSpec("pca", 2.0)
    assert StoreSpec.parse("pca:3").bits == 3.0
    for bad in ("float64", "pca:0", "pca:x", "int8:2", ""):
        with pytest.raises(ValueError, match="store"):
            StoreSpec.parse(bad)


def test_allocate_bits_spends_within_budget_and_favours_important_levels():
    importance = [np.geomspace(1, 1e-4, 32), np.geomspace(1, 1e-4, 32)]
    tokens = [16.0, 2.0]
    budget = 2 * 32 * sum(tokens)
    widths = allocate_bits(importance, tokens, budget)
    spent = sum(float(w.sum()) * t for w, t in zip(widths, tokens, strict=True))
    assert spent <= budget
    assert spent > 0.9 * budget
    for w in widths:
        assert set(np.unique(w)) <= {0, 2, 4, 8}
        assert (np.diff(w) <= 0).all()  # non-increasing along importance
    # The level with fewer tokens (each bit is cheaper, each error weighs more) gets more bits per token.
    assert widths[1].sum() > widths[0].sum()


def _features(n: int, r: int, d: int, rank: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((rank, d))
    return (rng.standard_normal((n, r, rank)) @ basis + 0.05 * rng.standard_normal((n, r, d))).astype(np.float32)


@pytest.mark.parametrize("spec", ["float16", "int8", "pca:2", "pca:4"])
def test_tables_reproduce_scores(tmp_path, spec):
    images = [_features(40, r, 32, 6, seed) for r, seed in ((16, 0), (4, 1))]
    texts = [_features(10, 9, 32, 6, seed + 10)[:, :9] for seed in (0, 1)]
    lengths = torch.full((10,), 9)
    s = StoreSpec.parse(spec)
    books = (
        train_codebooks([x.reshape(-1, 32) for x in images], [t.reshape(-1, 32) for t in texts], [16, 4], s.bits)
        if s.kind == "pca" else [None, None]
    )
    tables = []
    for level, (x, book) in enumerate(zip(images, books, strict=True)):
        write_table(tmp_path, f"image.l{level}", [x[:25], x[25:]], x.shape[1:], s, book)
        tables.append(Table(tmp_path, f"image.l{level}", s.kind, book))
    assert all(len(t) == 40 for t in tables)
    ref = hierarchical_similarity([torch.from_numpy(x) for x in images], [torch.from_numpy(t) for t in texts], lengths)
    rows = np.array([3, 39, 0, 17])
    got = hierarchical_similarity(
        [t.rows(rows) for t in tables],
        [t.rotate(torch.from_numpy(x)) for t, x in zip(tables, texts, strict=True)],
        lengths,
        image_norms=[t.norms(rows) for t in tables],
    )
    tol = {"float16": 2e-3, "int8": 1e-2, "pca:4": 3e-2, "pca:2": 6e-2}[spec]
    assert (got - ref[rows]).abs().max() < tol
    if s.kind == "pca":  # rows come back in the rotated frame: norms are preserved, coordinates are not
        decoded = tables[0].rows(rows).numpy()
        np.testing.assert_allclose(np.linalg.norm(decoded, axis=-1), tables[0].norms(rows).numpy(), rtol=0.1)
        assert tables[0].nbytes() < images[0].size * 2 / 3  # well under float16


def test_pca_rotation_is_orthonormal():
    x = _features(50, 8, 24, 5, 2).reshape(-1, 24)
    (book,) = train_codebooks([x], [None], [8.0], 2.0)
    np.testing.assert_allclose(book.basis @ book.basis.T, np.eye(24), atol=1e-5)
    t = torch.randn(3, 24)
    assert torch.allclose(book.rotate(t) @ book.rotate(t).T, t @ t.T, atol=1e-4)
