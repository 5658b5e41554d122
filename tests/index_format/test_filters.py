"""Metadata filters: the filter's checks, the inverted maps (equality, ``in``, list-valued metadata, JSON value
equality), captions filtered by their image's metadata, and first-stage search restricted to the allowed rows
on every FAISS tier (real FAISS)."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from index_builder.version import build_faiss
from index_format import FilterError, check_filter, require_known, selection
from index_format.filters import GalleryFilters
from index_format.selection import search_allowed

IMAGES = [
    {"colour": "red", "n": 1, "tags": ["a", "b"], "ok": True},
    {"colour": "blue", "n": 1.0, "tags": ["b"], "ok": False},
    {"colour": "red", "n": "1", "tags": [], "ok": None},
    {"colour": "green", "n": 2, "nested": {"x": 1}, "tags": [["a"]], 'say "hi"': ["x", 1.5]},
    {},
]


@pytest.fixture
def filters(tmp_path) -> GalleryFilters:
    """Five images (two captions each) and two text-only captions, in the builder's metadata.sqlite schema."""
    db = sqlite3.connect(tmp_path / "metadata.sqlite")
    db.execute("CREATE TABLE images (row INTEGER PRIMARY KEY, id TEXT UNIQUE NOT NULL, path TEXT, metadata TEXT)")
    db.execute(
        "CREATE TABLE captions (row INTEGER PRIMARY KEY, id TEXT NOT NULL, image_id TEXT, text TEXT, metadata TEXT)"
    )
    db.executemany("INSERT INTO images VALUES (?, ?, ?, ?)",
                   [(i, f"im{i}", "", json.dumps(m)) for i, m in enumerate(IMAGES)])  # fmt: skip
    rows = [(2 * i + j, f"im{i}#{j}", f"im{i}", "caption", "{}") for i in range(len(IMAGES)) for j in range(2)]
    rows += [(10, "t0", None, "text", json.dumps({"lang": "en", "colour": "red"})), (11, "t1", None, "text", "{}")]
    db.executemany("INSERT INTO captions VALUES (?, ?, ?, ?, ?)", rows[::-1])  # row order is not insertion order
    db.commit()
    db.close()
    return GalleryFilters(tmp_path / "metadata.sqlite", len(IMAGES), 12)


def rows(filters, kind, flt):
    return filters.rows(kind, check_filter(flt)).tolist()


def test_equality_in_and_list_valued_metadata(filters):
    assert rows(filters, "images", {"colour": "red"}) == [0, 2]
    assert rows(filters, "images", {"colour": ["blue", "green", "mauve"]}) == [1, 3]
    assert rows(filters, "images", {"colour": "red", "tags": "a"}) == [0]  # keys AND, list metadata: contains
    assert rows(filters, "images", {"tags": ["b"]}) == [0, 1]
    assert rows(filters, "images", {"colour": "mauve"}) == []
    assert rows(filters, "images", {"lang": "en"}) == []  # a key of the text-only captions: no image has it


def test_values_compare_as_json(filters):
    assert rows(filters, "images", {"n": 1}) == [0, 1]  # 1 == 1.0, never "1" nor true
    assert rows(filters, "images", {"n": 1.0}) == [0, 1]
    assert rows(filters, "images", {"n": "1"}) == [2]
    assert rows(filters, "images", {"ok": True}) == [0]
    assert rows(filters, "images", {"ok": 1}) == []
    assert rows(filters, "images", {"ok": None}) == [2]  # explicit null only, not a missing key
    assert rows(filters, "images", {"tags": "a"}) == [0]  # the nested list [["a"]] is never matched


def test_captions_follow_their_image_and_text_captions_their_own(filters):
    assert rows(filters, "captions", {"colour": "red"}) == [0, 1, 4, 5, 10]
    assert rows(filters, "captions", {"lang": "en"}) == [10]
    assert filters.keys("images") == ["colour", "n", "nested", "ok", 'say "hi"', "tags"]
    assert filters.keys("captions") == ["colour", "lang", "n", "nested", "ok", 'say "hi"', "tags"]
    assert filters.unknown("images", {"colour": 1, "lang": 1, "nested": 1}) == ["lang"]
    assert filters.unknown("captions", {"colour": 1, "lang": 1, "size": 1}) == ["size"]


def test_keys_no_json_path_can_name_are_read_too(filters):
    assert rows(filters, "images", {'say "hi"': 1.5}) == [3]
    assert rows(filters, "images", {'say "hi"': ["x", 7]}) == [3]
    assert rows(filters, "images", {"nested": 1}) == []  # an object value is never matched


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"colour": []}, "empty list"),
        ({"colour": {"a": 1}}, "not an object"),
        ({"colour": ["red", ["blue"]]}, "not a nested list"),
        ({"n": float("nan")}, "not a JSON value"),
        (["colour"], "must be a JSON object"),
    ],
)
def test_bad_filters_are_refused_by_name(bad, words):
    with pytest.raises(FilterError, match=words) as info:
        check_filter(bad)
    assert info.value.code == "invalid_filter"


def test_unknown_keys_are_named_with_the_known_ones(filters):
    require_known({"colour": ("red",)}, filters.keys("images"))
    with pytest.raises(FilterError) as info:
        require_known({"colour": ("red",), "color": ("red",)}, filters.keys("images"))
    assert info.value.code == "unknown_filter_key"
    assert "'color'" in info.value.message and '"colour", "n", "nested", "ok"' in info.value.message


# --------------------------------------------------------------------------------- restricted first stage


def _vectors(n: int, d: int = 32, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("tier", ["flat", "ivf-flat", "ivf-pq"])
@pytest.mark.parametrize("exact_subset", [True, False])
def test_restricted_search_returns_the_best_allowed(tier, exact_subset, monkeypatch):
    """Every tier returns min(k, allowed) allowed rows even at nprobe 1 (raised until k are found), the best of
    them exactly for flat and for the exact subset; IVF with the selector is as approximate as IVF alone."""
    x = _vectors(3_000)
    limits = {"flat": (10_000, 100_000), "ivf-flat": (100, 100_000), "ivf-pq": (100, 1_000)}[tier]
    index, info = build_faiss(x, *limits)
    if tier != "flat":
        index.nprobe = 1  # the fewest lists: a selective filter then needs the fallbacks
    monkeypatch.setattr(selection, "EXACT_SUBSET", 10_000 if exact_subset else 0)
    factor = info.get("refine", {}).get("k_factor")
    rng = np.random.default_rng(1)
    q = x[:3] + 0.1 * _vectors(3, seed=2)
    for size in (5, 30, 600):
        allowed = np.sort(rng.choice(len(x), size, replace=False))
        scores, rows = search_allowed(index, q, 10, factor, allowed, lambda r: x[r])
        want = min(10 * (factor or 1), size)
        assert rows.shape == (3, want) and np.isin(rows, allowed).all()
        exact = np.argsort(-(q @ x[allowed].T), axis=1)[:, :want]
        if tier == "flat" or exact_subset:
            assert (rows == allowed[exact]).all()
            np.testing.assert_allclose(scores, np.take_along_axis(q @ x[allowed].T, exact, axis=1), atol=1e-5)

    if tier == "ivf-flat" and not exact_subset:  # approximate at the manifest's nprobe, as without a filter
        index.nprobe = info["nprobe"]
        _, rows = search_allowed(index, q, 10, None, allowed, lambda r: x[r])
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, allowed[exact], strict=True)])
        assert recall >= 0.8  # uniformly random vectors: the hardest case for IVF lists


def test_exact_subset_is_used_when_the_index_refuses_selectors(monkeypatch):
    class NoSelectors:  # what a FAISS GPU index answers to a search with a selector
        def search(self, *args, **kwargs):
            raise RuntimeError("IDSelector not supported on GPU")

    monkeypatch.setattr(selection, "EXACT_SUBSET", 0)
    x = _vectors(200)
    allowed = np.arange(0, 200, 3)
    import faiss

    monkeypatch.setattr(faiss, "try_extract_index_ivf", lambda index: None)
    _, rows = search_allowed(NoSelectors(), x[[0, 3]], 4, None, allowed, lambda r: x[r])
    assert rows[0, 0] == 0 and rows[1, 0] == 3 and np.isin(rows, allowed).all()
