"""service/sharing.py: a re-rank split over idle search workers gives the scores it gives alone."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from session_helpers import RecordingSession

from index_format import open_index
from service import search
from service.search import SearchOptions, SearchParams
from service.settings import Settings
from service.sharing import MIN_CHUNK_PAIRS, IdleWorkers


def test_split_follows_the_idle_workers_and_keeps_the_order():
    helpers = IdleWorkers(3, min_pairs=16)
    rows = np.arange(100)
    seen: list[tuple[str, int]] = []

    def score(chunk):
        seen.append((threading.current_thread().name, len(chunk)))
        return torch.from_numpy(chunk.astype(np.float32) * 2)

    assert torch.equal(helpers.split(score, rows, 1), torch.arange(100, dtype=torch.float32) * 2)
    assert len(seen) == 3 and sum(n for _, n in seen) == 100  # nothing running: 3 idle, but 2 helper threads: 3 chunks
    assert any(name.startswith("hat-rerank") for name, _ in seen)
    seen.clear()
    with helpers.search(), helpers.search():  # two of three workers busy: one idle, two chunks
        assert helpers.idle() == 1
        helpers.split(score, rows, 1)
    assert len(seen) == 2
    seen.clear()
    with helpers.search(), helpers.search(), helpers.search():  # all busy: no split
        helpers.split(score, rows, 1)
    assert seen == [(threading.current_thread().name, 100)]
    seen.clear()
    helpers.split(score, np.arange(17), 1)  # too little work to split: 17 pairs, 16 a chunk at least
    assert len(seen) == 1
    seen.clear()
    helpers.split(score, np.arange(17), pairs_per_row=2)  # 34 pairs: two chunks
    assert len(seen) == 2
    helpers.close()


def test_wide_encoding_follows_the_idle_workers_and_the_setting():
    """A text batch may encode on the idle workers' threads when it holds every request in the service and some
    worker is idle (``HAT_WIDE_ENCODE``, on by default); never with other requests waiting, every worker busy or
    the setting off."""
    helpers = IdleWorkers(2)
    wide = SearchOptions.from_settings(Settings(), helpers)
    off = SearchOptions.from_settings(Settings(wide_encode=False), helpers)
    helpers.count_requests(1)
    with helpers.search():  # a batch of the one request there is; the other worker is idle
        assert wide.wide_encode(1) and not off.wide_encode(1)
        helpers.count_requests(1)  # another request waits: not quiet
        assert not wide.wide_encode(1) and wide.wide_encode(2)  # unless the batch holds it too
        with helpers.search():  # both workers busy
            assert not wide.wide_encode(2)
    helpers.count_requests(-2)
    assert helpers.requests == 0
    assert not SearchOptions.from_settings(Settings()).wide_encode(1)  # no workers known: never
    helpers.close()


def test_split_needs_enough_work_per_chunk():
    """The default bound: 100 demo-sized candidates (84 tokens x a 17-token query) stay whole, 100 HAT-base-sized
    ones (1,029 tokens) split in two; enough demo candidates split too."""
    helpers = IdleWorkers(2)
    sizes: list[int] = []

    def score(chunk):
        sizes.append(len(chunk))
        return torch.zeros(len(chunk))

    helpers.split(score, np.arange(100), 84 * 17)
    assert sizes == [100] and 2 * MIN_CHUNK_PAIRS > 100 * 84 * 17
    sizes.clear()
    helpers.split(score, np.arange(100), 1029 * 17)
    assert sorted(sizes) == [50, 50]
    sizes.clear()
    helpers.split(score, np.arange(400), 84 * 17)
    assert sorted(sizes) == [200, 200]
    helpers.close()


def test_a_failing_chunk_fails_the_split():
    helpers = IdleWorkers(2, min_pairs=16)

    def score(chunk):
        if chunk[0] > 0:
            raise ValueError("chunk failed")
        return torch.zeros(len(chunk))

    with pytest.raises(ValueError, match="chunk failed"):
        helpers.split(score, np.arange(64), 1)
    helpers.close()


@pytest.fixture(scope="module")
def state(index_root: Path):
    class State:
        index, lock = open_index(index_root), threading.Lock()

    yield State
    State.index.close()


def test_searches_split_over_idle_workers_equal_the_searches_alone(demo_model, state, world):
    """Text and image searches (explained too) with the candidates split over idle workers: the same hits,
    scores and explanations as each re-rank alone."""
    helpers = IdleWorkers(2, min_pairs=1)  # the demo's re-ranks are too small to split by default: split them all
    alone = SearchOptions.from_settings(Settings(split_rerank=False), helpers)
    shared = SearchOptions.from_settings(Settings(), helpers)
    assert alone.helpers is None and shared.helpers is helpers
    calls = []
    real = helpers.split

    def counting(score, rows, pairs_per_row):
        calls.append((len(rows), pairs_per_row))
        return real(score, rows, pairs_per_row)

    helpers.split = counting
    params = SearchParams(k=10, candidates=40)
    queries = [(world["items"][i]["captions"][0], params) for i in world["base_ids"][:6]]
    queries.append(("a red circle left of a blue square", SearchParams(k=5, candidates=40, explain=True)))
    image = Path(world["items"][world["base_ids"][0]]["image"]).read_bytes()
    uploads = [(image, "captions", params), (image, "captions", SearchParams(k=5, candidates=40, explain=True))]
    want = search.search_texts(demo_model, state, queries, alone) + search.search_images(
        demo_model, state, uploads, alone
    )
    assert not calls
    got = search.search_texts(demo_model, state, queries, shared) + search.search_images(
        demo_model, state, uploads, shared
    )
    assert calls and all(n == 40 for n, _ in calls)
    # the work each split was told of: a text query's tokens x an image's 84 (64 + 16 + 4), an image query's 84
    # tokens x a nominal caption's 16
    assert search.image_tokens(state.index) == 84
    pairs = [p for _, p in calls]
    assert len(pairs) == 9 and all(p % 84 == 0 for p in pairs)
    assert pairs[7:] == [84 * search.CAPTION_TOKENS] * 2 and all(3 <= p // 84 <= 64 for p in pairs[:7]), pairs
    for g, w in zip(got, want, strict=True):
        assert [r["id"] for r in g["results"]] == [r["id"] for r in w["results"]]
        np.testing.assert_allclose([r["score"] for r in g["results"]], [r["score"] for r in w["results"]], atol=1e-6)
        assert [r.get("explain") is None for r in g["results"]] == [r.get("explain") is None for r in w["results"]]
        for a, b in zip(g["results"], w["results"], strict=True):
            assert a["strength"] == b["strength"]
            if a.get("explain"):
                assert a["explain"]["levels"][0]["score"] == pytest.approx(b["explain"]["levels"][0]["score"], abs=1e-6)
    helpers.close()


def test_text_searches_encode_wide_while_a_worker_is_idle(state, world):
    """``search_texts`` runs the query encoder's wide session while another worker is idle and the narrow one
    when all are busy, with the same answers."""
    from model import load_model
    from model.precision import text_encoder_in

    model = load_model(Path(__file__).resolve().parents[2] / "models" / "demo")
    encoder = model.text_encoder = text_encoder_in(model, "onnx")
    assert encoder.widen(encoder.threads + 1)  # kept whatever its speed here (the start-up timing is not tested)
    calls: list[str] = []
    encoder.session = RecordingSession(encoder.session, "narrow", calls)
    encoder.wide = RecordingSession(encoder.wide, "wide", calls)
    helpers = IdleWorkers(2)
    options = SearchOptions.from_settings(Settings(split_rerank=False), helpers)
    queries = [(world["items"][i]["captions"][0], SearchParams(k=10, candidates=40)) for i in world["base_ids"][:4]]
    with helpers.search():
        wide = search.search_texts(model, state, queries, options)
        with helpers.search():
            narrow = search.search_texts(model, state, queries, options)
    assert calls == ["wide", "narrow"]
    for a, b in zip(wide, narrow, strict=True):
        assert [r["id"] for r in a["results"]] == [r["id"] for r in b["results"]]
        np.testing.assert_allclose([r["score"] for r in a["results"]], [r["score"] for r in b["results"]], atol=1e-5)
    helpers.close()


def test_image_tokens_from_the_manifest_or_the_tables(state):
    """An index whose manifest predates ``image_tokens`` gets the count from its first segment's tables."""

    older = SimpleNamespace(segments=state.index.segments, manifest={
        "model": {k: v for k, v in state.index.manifest["model"].items() if k != "image_tokens"}})
    assert "image_tokens" in state.index.manifest["model"]
    assert search.image_tokens(state.index) == search.image_tokens(older) == 84
