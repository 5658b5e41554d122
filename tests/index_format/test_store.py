"""Feature stores: encodings round-trip, the pca store's bit budget and its rotation leaving scores intact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from index_format.store import (
    StoreError,
    StoreSpec,
    Table,
    allocate_bits,
    byte_rates,
    code_bytes,
    deal_axes,
    decode_norms,
    encode_norms,
    train_codebooks,
    whole_bytes,
    write_table,
)
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


def test_pq_rates_fill_whole_bytes_within_the_budget():
    """A run of axes whose count is no multiple of its axes a byte would pay a whole byte for a part: the run is
    extended to fill it, and the water level is searched so that the real bytes stay within the budget."""
    rates = np.array([8, 8, 4, 4, 4, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0.5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    assert code_bytes(rates) == 2 + 2 + 2 + 1  # 9 one-bit axes take two bytes, one 0.5-bit axis a whole byte
    full = whole_bytes(rates)
    # the 4-bit run takes a fourth axis (2 full bytes), which leaves 8 one-bit axes (1 byte instead of 2), and
    # the 0.5-bit run grows to the 16 axes its byte codes
    assert full.tolist() == [8, 8, 4, 4, 4, 4] + [1] * 8 + [0.5] * 16
    assert code_bytes(full) == 6 < code_bytes(rates)  # fewer bytes for more coded axes
    assert (np.diff(full) <= 0).all()
    rng = np.random.default_rng(0)
    for d, tokens, bits in ((64, [16.0, 4.0, 1.0], 1.0), (48, [64.0, 16.0, 4.0], 0.7), (32, [9.0, 3.0], 2.0)):
        importance = [np.sort(rng.gamma(0.5, size=d))[::-1] for _ in tokens]
        budget = bits * d * sum(tokens)
        got = byte_rates(importance, tokens, budget)
        size = sum(code_bytes(r) * t for r, t in zip(got, tokens, strict=True))
        assert size <= budget / 8  # what the codes really take
        assert size > 0.93 * budget / 8  # and most of it spent
        for r in got:
            assert (np.diff(r) <= 0).all()
            assert (whole_bytes(r) == r).all()


def test_deal_axes_balances_each_runs_bytes():
    rates = np.array([8.0, 8.0] + [1.0] * 16 + [0.5] * 16 + [0.0] * 4)
    variance = np.geomspace(10.0, 0.1, len(rates))
    order = deal_axes(rates, variance)
    assert sorted(order.tolist()) == list(range(len(rates)))  # a permutation ...
    assert (rates[order] == rates).all()  # ... within runs of equal rate
    assert order[:2].tolist() == [0, 1] and order[-4:].tolist() == [34, 35, 36, 37]
    first, second = order[2:10], order[10:18]  # the two bytes of the 1-bit run
    assert set(first) | set(second) == set(range(2, 18))
    # dealt, not cut in order: each byte holds one of the two largest, and their log-variances are close
    assert {2, 3} & set(first) and {2, 3} & set(second)
    logs = [np.log(variance[g]).sum() for g in (first, second)]
    cut = [np.log(variance[2:10]).sum(), np.log(variance[10:18]).sum()]
    assert abs(logs[0] - logs[1]) < 0.25 * abs(cut[0] - cut[1])


def test_pq_codebooks_take_at_most_their_bytes(tmp_path):
    images = [_features(60, r, 40, 6, seed) for r, seed in ((16, 3), (4, 4), (1, 5))]
    texts = [_features(10, 9, 40, 6, seed + 10).reshape(-1, 40) for seed in (3, 4, 5)]
    for bits in (0.75, 1.0, 1.5):
        books = train_codebooks([x.reshape(-1, 40) for x in images], texts, [16, 4, 1], bits, "pq")
        size = sum(b.packed_bytes() * t for b, t in zip(books, (16, 4, 1), strict=True))
        assert bits * 40 * 21 / 8 * 0.9 < size <= bits * 40 * 21 / 8
        write_table(tmp_path, "l1", [images[0]], images[0].shape[1:], StoreSpec("pq", bits), books[0])
        table = Table(tmp_path, "l1", "pq", books[0])
        assert table.nbytes() == 60 * 16 * (books[0].packed_bytes() + 1) + 60 * 2 * 4  # codes, norms, ranges


def test_norms_in_one_byte_keep_their_relative_error_small():
    rng = np.random.default_rng(0)
    norms = rng.lognormal(mean=rng.normal(0, 3, size=(50, 1)), sigma=0.1, size=(50, 64))  # items far apart in scale
    norms[3, 5] = 0.0  # an all-zero token
    norms[7] = 2.5  # an item whose tokens all have one norm
    norms[9, :3] = [1e-6, 1.0, 1e6]  # an item with a wide range: coarser steps, nothing clamped
    codes, ranges = encode_norms(norms)
    assert codes.dtype == np.uint8 and ranges.shape == (50, 2)
    back = decode_norms(codes, ranges)
    assert back[3, 5] == 0.0 and (codes[3, 5] == 0) and (codes[np.arange(50) != 3] > 0).all()
    np.testing.assert_allclose(back[7], 2.5, rtol=1e-6)
    ordinary = np.ones(50, bool)
    ordinary[[3, 9]] = False
    rel = np.abs(back[ordinary] / norms[ordinary] - 1)
    assert rel.max() < 3e-3  # half a log step of a spread of about e^0.8
    assert rel.mean() < 1e-3
    half_step = np.exp(np.log(1e12) / 508) - 1  # 5.6%
    np.testing.assert_allclose(back[9, :3], [1e-6, 1.0, 1e6], rtol=1e-5)  # the range's ends are exact
    np.testing.assert_allclose(back[9, 3:], norms[9, 3:], rtol=half_step)
    # indexing as the tables do: a row, rows, rows of a [T, D] table (one token an item)
    np.testing.assert_allclose(decode_norms(codes[4], ranges[4]), back[4])
    flat_codes, flat_ranges = encode_norms(norms[:5].reshape(-1, 1))
    picked = decode_norms(flat_codes[[0, 70], 0], flat_ranges[[0, 70]])
    np.testing.assert_allclose(picked, norms[:5].reshape(-1)[[0, 70]], rtol=1e-6)


def test_coded_tables_keep_one_byte_norms_and_old_float32_norms_still_read(tmp_path):
    x = _features(30, 8, 24, 4, 7)
    books = train_codebooks([x.reshape(-1, 24)], [_features(5, 6, 24, 4, 8).reshape(-1, 24)], [8], 1.0, "pq")
    write_table(tmp_path, "l1", [x[:10], x[10:]], x.shape[1:], StoreSpec("pq", 1.0), books[0])
    table = Table(tmp_path, "l1", "pq", books[0])
    assert table.parts["norms"].dtype == np.uint8
    want = np.linalg.norm(x[[4, 29, 4]], axis=-1)
    np.testing.assert_allclose(table.norms([4, 29, 4]).numpy(), want, rtol=3e-3)
    assert table.norms(np.array([4])).dtype == torch.float32
    # an index written before one-byte norms: float32 norms and no ranges file
    np.save(tmp_path / "l1.norms.npy", np.linalg.norm(x, axis=-1).astype(np.float32))
    (tmp_path / "l1.normrange.npy").unlink()
    old = Table(tmp_path, "l1", "pq", books[0])
    np.testing.assert_allclose(old.norms([4, 29, 4]).numpy(), want, rtol=1e-6)
    # one-byte norms without their ranges: a StoreError naming the file, not a crash at search time
    write_table(tmp_path, "l2", [x], x.shape[1:], StoreSpec("pq", 1.0), books[0])
    (tmp_path / "l2.normrange.npy").unlink()
    with pytest.raises(StoreError, match="normrange"):
        Table(tmp_path, "l2", "pq", books[0])
    # the float16 store keeps float32 norms (its features err far less than one-byte norms would)
    write_table(tmp_path, "f", [x], x.shape[1:], StoreSpec("float16"), None)
    assert Table(tmp_path, "f", "float16").parts["norms"].dtype == np.float32
    with pytest.raises(StoreError, match="not finite"):
        write_table(tmp_path, "bad", [x * np.inf], x.shape[1:], StoreSpec("pq", 1.0), books[0])


def _features(n: int, r: int, d: int, rank: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((rank, d))
    return (rng.standard_normal((n, r, rank)) @ basis + 0.05 * rng.standard_normal((n, r, d))).astype(np.float32)


@pytest.mark.parametrize("spec", ["float16", "int8", "pca:2", "pca:4", "pq:1", "pq:2"])
def test_tables_reproduce_scores(tmp_path, spec):
    images = [_features(40, r, 32, 6, seed) for r, seed in ((16, 0), (4, 1))]
    texts = [_features(10, 9, 32, 6, seed + 10)[:, :9] for seed in (0, 1)]
    lengths = torch.full((10,), 9)
    s = StoreSpec.parse(spec)
    flat = [x.reshape(-1, 32) for x in images]
    others = [t.reshape(-1, 32) for t in texts]
    books = train_codebooks(flat, others, [16, 4], s.bits, s.kind) if s.coded else [None, None]
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
    tol = {"float16": 2e-3, "int8": 1e-2, "pca:4": 3e-2, "pca:2": 6e-2, "pq:2": 6e-2, "pq:1": 1e-1}[spec]
    assert (got - ref[rows]).abs().max() < tol
    if s.kind == "pca":  # rows come back in the rotated frame: norms are preserved, coordinates are not
        decoded = tables[0].rows(rows).numpy()
        np.testing.assert_allclose(np.linalg.norm(decoded, axis=-1), tables[0].norms(rows).numpy(), rtol=0.1)
    # (a pq table spends nothing on directions the captions do not use: its rows' norms may differ, the scores
    # use the stored exact norms)
    if s.coded:
        assert tables[0].nbytes() < images[0].size * 2 / 3  # well under float16


def test_pca_rotation_is_orthonormal():
    x = _features(50, 8, 24, 5, 2).reshape(-1, 24)
    (book,) = train_codebooks([x], [None], [8.0], 2.0)
    np.testing.assert_allclose(book.basis @ book.basis.T, np.eye(24), atol=1e-5)
    t = torch.randn(3, 24)
    assert torch.allclose(book.rotate(t) @ book.rotate(t).T, t @ t.T, atol=1e-4)


@pytest.mark.parametrize("kind", ["pca", "pq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_coded_axes_score_as_the_full_decode(tmp_path, dtype, kind):
    """Scoring a pca level from its coded components (plus a ones column) and the captions' Gram matrices gives
    the full decode's scores, from a narrower product; the Gram matrix is what the context norms need."""
    from model.alignment import level_similarities

    images = [_features(30, r, 48, 5, seed) for r, seed in ((12, 3), (3, 4))]
    texts = [_features(6, 7, 48, 5, seed + 20) for seed in (3, 4)]
    lengths = torch.tensor([7, 5, 7, 3, 6, 7])
    spec = StoreSpec.parse(f"{kind}:1")
    books = train_codebooks([x.reshape(-1, 48) for x in images], [t.reshape(-1, 48) for t in texts], [12, 3], 1.0,
                            kind)  # fmt: skip
    tables = []
    for level, (x, book) in enumerate(zip(images, books, strict=True)):
        write_table(tmp_path, f"image.l{level}", [x], x.shape[1:], spec, book)
        tables.append(Table(tmp_path, f"image.l{level}", kind, book))
    assert all(t.narrows for t in tables)  # 1 bit a dimension leaves components uncoded
    rows = np.array([5, 0, 29, 11])
    norms = [t.norms(rows) for t in tables]
    rotated = [t.rotate(torch.from_numpy(x)) for t, x in zip(tables, texts, strict=True)]
    full = level_similarities([t.rows(rows, dtype) for t in tables], [r.to(dtype) for r in rotated], lengths,
                              image_norms=norms)  # fmt: skip
    coded = [t.coded_rows(rows, dtype) for t in tables]
    assert all(c.shape[-1] < 48 for c in coded)
    grams = [r @ r.transpose(1, 2) for r in rotated]
    narrowed = [t.narrow(r).to(dtype) for t, r in zip(tables, rotated, strict=True)]
    narrow = level_similarities(coded, narrowed, lengths, image_norms=norms, text_grams=grams)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for f, n in zip(full, narrow, strict=True):
        assert (f - n).abs().max() < tol
    # Without the Gram matrices the narrowed captions would give wrong context norms: the check can fail.
    wrong = level_similarities(coded, [t.narrow(r) for t, r in zip(tables, rotated, strict=True)], lengths,
                               image_norms=norms)  # fmt: skip
    assert max(float((f - w).abs().max()) for f, w in zip(full, wrong, strict=True)) > 1e-3
    with pytest.raises(ValueError, match="text_gram must be"):
        level_similarities(coded, [t.narrow(r) for t, r in zip(tables, rotated, strict=True)], lengths,
                           image_norms=norms, text_grams=[torch.zeros(6, 2, 2), None])  # fmt: skip


@pytest.mark.parametrize("spec", ["pca:1", "pca:3", "pq:1", "pq:2"])
def test_scores_from_codes_equal_the_full_decode(tmp_path, spec):
    """The re-rank's path: dot products read from the codes (a lookup table per byte, summed), never decoding a
    token, then the i2t score from the dots, the norms and the captions' Gram matrices. Equal to scoring the
    fully decoded features, for several captions of different lengths at once, with the wide codes of pca:3 and
    the mixed byte widths of pq."""
    from model.alignment import level_similarities, scan_i2t_dots

    s = StoreSpec.parse(spec)
    images = [_features(40, r, 48, 5, seed) for r, seed in ((12, 5), (3, 6))]
    texts = [_features(6, 9, 48, 5, seed + 20) for seed in (5, 6)]
    lengths = torch.tensor([9, 4, 7, 2, 9, 5])
    books = train_codebooks([x.reshape(-1, 48) for x in images], [t.reshape(-1, 48) for t in texts], [12, 3],
                            s.bits, s.kind)  # fmt: skip
    tables = []
    for level, (x, book) in enumerate(zip(images, books, strict=True)):
        write_table(tmp_path, f"image.l{level}", [x], x.shape[1:], s, book)
        tables.append(Table(tmp_path, f"image.l{level}", s.kind, book))
    assert all(t.coded for t in tables)
    rows = np.array([7, 0, 39, 12, 12])
    norms = [t.norms(rows) for t in tables]
    rotated = [t.rotate(torch.from_numpy(x)) for t, x in zip(tables, texts, strict=True)]
    full = level_similarities([t.rows(rows) for t in tables], rotated, lengths, image_norms=norms)
    dots, grams = [], []
    for t, r in zip(tables, rotated, strict=True):
        d = t.dots(rows, r.reshape(-1, 48))
        decoded = t.rows(rows) if s.kind == "pca" else t.book.unrotate(t.decoder(t.parts["pq"][rows]))
        assert d.shape == (5, decoded.shape[1], 6 * 9)
        np.testing.assert_allclose(d.numpy(), (decoded @ r.reshape(-1, 48).T).numpy(), atol=2e-4, rtol=1e-4)
        dots.append(d.view(5, -1, 6, 9))
        grams.append(r @ r.transpose(1, 2))
    got = level_similarities([None, None], [None, None], lengths, image_norms=norms, text_grams=grams,
                             image_dots=dots)  # fmt: skip
    for f, g in zip(full, got, strict=True):
        assert (f - g).abs().max() < 1e-5
    # the score depends on the dots: wrong dots give other scores (the check can fail)
    moved = scan_i2t_dots(dots[0] * 1.5, lengths, image_norms=norms[0], text_gram=grams[0])
    assert (moved - full[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="text_grams"):
        level_similarities([None, None], [None, None], lengths, image_norms=norms, image_dots=dots)


@pytest.mark.parametrize("tile, little_endian", [(1 << 20, True), (100, True), (100, False)])
def test_dots_from_codes_read_in_tiles(tmp_path, monkeypatch, tile, little_endian):
    """``dots`` reads the candidates' codes a tile at a time into a reused index buffer (low byte
    written in place on little-endian machines, an int32 add elsewhere): every tiling gives the decoded
    features' dot products, in the order of the rows asked for (repeated and unsorted rows included), and a
    second call on a smaller request reuses the buffer without stale indices."""
    from index_format import store

    monkeypatch.setattr(store, "INDEX_TILE", tile)
    monkeypatch.setattr(store, "LITTLE_ENDIAN", little_endian)
    s = StoreSpec.parse("pq:2")
    x = _features(30, 7, 48, 5, 3)
    (book,) = train_codebooks([x.reshape(-1, 48)], [_features(4, 5, 48, 5, 9).reshape(-1, 48)], [7], s.bits, s.kind)
    write_table(tmp_path, "image.l0", [x], x.shape[1:], s, book)
    t = Table(tmp_path, "image.l0", s.kind, book)
    words = torch.from_numpy(_features(1, 5, 48, 5, 11)[0])
    for rows in (np.array([29, 3, 3, 0, 17, 8, 21, 5]), np.array([4])):
        decoded = t.book.unrotate(t.decoder(t.parts["pq"][rows]))
        got = t.dots(rows, words)
        assert got.shape == (len(rows), 7, 5)
        np.testing.assert_allclose(got.numpy(), (decoded @ words.T).numpy(), atol=2e-4, rtol=1e-4)


def test_dots_scratch_buffers_are_reused_safely(tmp_path):
    """``dots`` writes each call's lookup table and indices into reused scratch buffers: calls with more, then
    fewer words (a larger buffer holding stale rows) and concurrent calls from several threads each give the
    decoded features' dot products, and calls one after another from different threads reuse one pair of
    buffers (not one per thread). The table mixes one-component bytes (a broadcast product) and wider ones."""
    import threading

    s = StoreSpec.parse("pq:2")
    x = _features(30, 7, 48, 5, 3)
    (book,) = train_codebooks([x.reshape(-1, 48)], [_features(4, 5, 48, 5, 9).reshape(-1, 48)], [7], s.bits, s.kind)
    write_table(tmp_path, "image.l0", [x], x.shape[1:], s, book)
    t = Table(tmp_path, "image.l0", s.kind, book)
    assert {g[0].shape[1] for g in t.decoder.groups} >= {1, 2}  # both kinds of group are exercised
    rows = np.array([29, 3, 0, 17])
    decoded = t.book.unrotate(t.decoder(t.parts["pq"][rows]))
    words = {n: torch.from_numpy(_features(1, n, 48, 5, 20 + n)[0]) for n in (12, 5, 9, 3, 7, 2)}

    def check(n: int) -> None:
        got = t.dots(rows, words[n])
        assert got.shape == (4, 7, n)
        np.testing.assert_allclose(got.numpy(), (decoded @ words[n].T).numpy(), atol=2e-4, rtol=1e-4)

    for n in (12, 5, 9):
        check(n)
    for n in (3, 7):  # one after another, each from a new thread
        thread = threading.Thread(target=check, args=(n,))
        thread.start()
        thread.join()
    assert len(t.decoder._scratch._free) == 1
    errors = []

    def hammer(n: int) -> None:
        try:
            for _ in range(30):
                check(n)
        except AssertionError as exc:  # reported below: a thread's failure is not the test's otherwise
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in (12, 2, 7, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert 1 <= len(t.decoder._scratch._free) <= 4


def test_pq_codes_are_the_nearest_weighted_centroids():
    """PQCodebook.encode (FAISS product quantisers per run of bytes, bisection for one-axis bytes) picks, for every
    byte, the centroid nearest in the weighted coordinates: checked against a brute-force search."""
    rng = np.random.default_rng(3)
    x = _features(300, 8, 48, 5, 11).reshape(-1, 48)
    t = _features(40, 6, 48, 5, 12).reshape(-1, 48)
    (book,) = train_codebooks([x], [t], [8.0], 2.0, "pq")
    assert len(set(book.dims.tolist())) > 1 and (book.dims == 1).any()  # mixed widths, one-axis bytes included
    probe = x[rng.choice(len(x), 500, replace=False)]
    codes = book.encode(probe)
    z = probe @ book.basis.T - book.mean
    nearest = np.zeros_like(codes)
    for b, (first, dims) in enumerate(zip(book.first, book.dims, strict=True)):
        w = book.weight[first : first + dims]
        diff = (z[:, None, first : first + dims] - book.centroids[b][None, :, :dims]) * w
        nearest[:, b] = (diff**2).sum(-1).argmin(1)
    assert (codes == nearest).mean() > 0.999  # float rounding may flip exact near-ties only
    picked = book.centroids[np.arange(len(book.first))[None, :], codes.astype(int)]
    best = book.centroids[np.arange(len(book.first))[None, :], nearest.astype(int)]
    for b, (first, dims) in enumerate(zip(book.first, book.dims, strict=True)):
        w = book.weight[first : first + dims]
        got = (((z[:, first : first + dims] - picked[:, b, :dims]) * w) ** 2).sum(-1)
        want = (((z[:, first : first + dims] - best[:, b, :dims]) * w) ** 2).sum(-1)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
