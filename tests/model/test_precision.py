"""model.precision: the query encoder's precisions and the start-up choice between them."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from session_helpers import RecordingSession

from model import load_model
from model.precision import (
    MAX_FEATURE_ERROR,
    PROBES,
    TEXT_PRECISIONS,
    TIE_MARGIN,
    OnnxTextEncoder,
    choose_text_precision,
    keep_wide_if_faster,
    pick_precision,
    text_encoder_in,
    use_text_precision,
    wide_encoding,
)

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo"


@pytest.fixture(scope="module")
def model():
    return load_model(DEMO)


def _features(model, encoder, texts):
    batch = model.tokenizer(list(texts))
    with torch.inference_mode():
        feats = encoder(batch.input_ids, batch.attention_mask)
        return [proj(f) for proj, f in zip(model.text_proj, feats, strict=True)], batch.lengths


def test_int8_is_refused_for_the_demo_model(model):
    """The demo model's MiniLM hidden states have outlier dimensions: dynamic int8 moves its features by far
    more than the bound (measured ~30%), so the start-up choice must not take it."""
    texts = list(PROBES)
    reference, lengths = _features(model, model.text_encoder, texts)
    got, _ = _features(model, text_encoder_in(model, "int8"), texts)
    worst = max(float(((o[j, :n] - r[j, :n]).norm(dim=-1) / r[j, :n].norm(dim=-1)).max())
                for o, r in zip(got, reference, strict=True) for j, n in enumerate(lengths.tolist()))  # fmt: skip
    assert worst > MAX_FEATURE_ERROR
    _, choice = choose_text_precision(model, runs=1)
    assert "int8" in choice.refused and choice.refused["int8"].startswith("feature error")


@pytest.mark.parametrize(("precision", "bound"), [("bfloat16", 0.02)])
def test_each_precision_stays_close_to_float32(model, precision, bound):
    """bfloat16 linear layers move the demo model's features by about 1% (measured 1.01%), near the bound."""
    texts = [*PROBES, "a small green circle", "three large red squares below a purple triangle on grey"]
    reference, lengths = _features(model, model.text_encoder, texts)
    encoder = text_encoder_in(model, precision)
    assert encoder is not model.text_encoder  # a copy: the model's own encoder is untouched
    got, _ = _features(model, encoder, texts)
    for ref, out in zip(reference, got, strict=True):
        assert out.dtype == torch.float32 and out.shape == ref.shape
        for j, n in enumerate(lengths.tolist()):  # padding positions aside
            err = (out[j, :n] - ref[j, :n]).norm(dim=-1) / ref[j, :n].norm(dim=-1)
            assert float(err.max()) < bound, (precision, float(err.max()))
            assert float(err.max()) > 0  # really another precision, not the float32 encoder again


def test_onnx_runs_the_float32_encoder(model):
    """ONNX Runtime runs the same float32 encoder: batches of captions of different lengths (padded to the longest,
    as a batched search gives them) and one caption alone, shorter and longer than the traced example, give
    float32's features on every real token."""
    encoder = text_encoder_in(model, "onnx")
    assert isinstance(encoder, OnnxTextEncoder) and encoder is not model.text_encoder
    long = " ".join(["a small green circle above a large red square and"] * 6)  # ~60 tokens
    for texts in ([*PROBES, long, "a star"], ["a star"], [long]):
        reference, lengths = _features(model, model.text_encoder, texts)
        got, _ = _features(model, encoder, texts)
        for ref, out in zip(reference, got, strict=True):
            assert out.dtype == torch.float32 and out.shape == ref.shape
            for j, n in enumerate(lengths.tolist()):
                err = (out[j, :n] - ref[j, :n]).norm(dim=-1) / ref[j, :n].norm(dim=-1)
                assert float(err.max()) < 1e-5, (texts[j], float(err.max()))


def test_onnx_wide_session_runs_only_in_wide_encoding_blocks(model):
    """``widen`` adds a session with more threads; forwards use it inside ``wide_encoding()`` only (not in
    ``wide_encoding(False)``, not after the block, not in another thread), and it gives the narrow session's
    features."""
    encoder = OnnxTextEncoder(model.text_encoder, 1)
    assert encoder.wide is None and not encoder.widen(1)  # no more threads than the narrow session: nothing added
    assert encoder.widen(2) and encoder.wide is not None and encoder.wide_threads == 2
    calls: list[str] = []
    encoder.session = RecordingSession(encoder.session, "narrow", calls)
    encoder.wide = RecordingSession(encoder.wide, "wide", calls)
    texts = [*PROBES, "a star"]
    narrow, lengths = _features(model, encoder, texts)
    with wide_encoding():
        wide, _ = _features(model, encoder, texts)
        elsewhere = threading.Thread(target=_features, args=(model, encoder, ["a star"]))
        elsewhere.start()
        elsewhere.join()
        with wide_encoding(False):
            _features(model, encoder, ["a star"])
        _features(model, encoder, ["a star"])
    _features(model, encoder, ["a star"])
    assert calls == ["narrow", "wide", "narrow", "narrow", "wide", "narrow"]
    for a, b in zip(narrow, wide, strict=True):
        for j, n in enumerate(lengths.tolist()):
            err = (a[j, :n] - b[j, :n]).norm(dim=-1) / a[j, :n].norm(dim=-1)
            assert float(err.max()) < 1e-5


def test_wide_session_kept_only_when_faster(model):
    """``keep_wide_if_faster`` times both sessions and drops the wide one unless it gains more than ``gain``."""
    encoder = OnnxTextEncoder(model.text_encoder, 1)
    assert encoder.widen(2)
    narrow, wide = keep_wide_if_faster(model, encoder, runs=3, gain=-1e9)  # any time is fast enough: kept
    assert narrow > 0 and wide > 0 and encoder.wide is not None and encoder.wide_threads == 2
    keep_wide_if_faster(model, encoder, runs=3, gain=1.0)  # would have to take no time at all: dropped
    assert encoder.wide is None and encoder.wide_threads == 0
    with wide_encoding():  # without a wide session the narrow one answers
        assert _features(model, encoder, ["a star"])[0][0].shape[0] == 1


def test_use_adds_the_wide_session_to_onnx_only(model):
    """``use_text_precision`` tries a wide session for onnx (kept or dropped by its timing, said either way)."""
    more = torch.get_num_threads() + 1
    onnx = load_model(DEMO)
    choice = use_text_precision(onnx, "onnx", wide_threads=more)
    assert choice.wide_ms is not None and choice.wide_threads in (0, more)
    assert onnx.text_encoder.wide_threads == choice.wide_threads
    assert (onnx.text_encoder.wide is not None) == bool(choice.wide_threads)
    said = (f"; {more} threads while the other search workers are idle (" if choice.wide_threads
            else "; no wide session (more threads: ")  # fmt: skip
    assert said in choice.describe() and " against " in choice.describe()
    assert use_text_precision(onnx, "onnx").wide_ms is None and onnx.text_encoder.wide is None  # not asked
    plain = load_model(DEMO)
    assert use_text_precision(plain, "bfloat16", wide_threads=more).wide_threads == 0  # torch: no per-call threads
    assert "threads while" not in use_text_precision(plain, "float32", wide_threads=more).describe()


def test_choice_is_measured_and_within_the_bound(model):
    _, choice = choose_text_precision(model, runs=3)
    assert choice.chosen in TEXT_PRECISIONS and set(choice.ms) | set(choice.refused) == set(TEXT_PRECISIONS)
    assert choice.chosen == pick_precision(choice.ms, choice.error) and all(v > 0 for v in choice.ms.values())
    assert choice.ms[choice.chosen] <= min(choice.ms.values()) * (1 + TIE_MARGIN)
    assert all(choice.error[name] <= MAX_FEATURE_ERROR for name in choice.ms)
    assert choice.chosen in choice.describe() and "ms (err" in choice.describe()
    # a bound nothing but float32 meets leaves float32
    _, strict = choose_text_precision(model, runs=1, max_error=1e-9)
    assert strict.chosen == "float32" and set(strict.refused) == {"bfloat16", "int8", "onnx"}


def test_pick_prefers_exactness_within_the_margin():
    """A less exact candidate wins only by more than ``TIE_MARGIN`` of the fastest's time; among the close ones the
    most exact (equal errors: the faster)."""
    error = {"float32": 0.0, "bfloat16": 5.7e-3, "onnx": 8.3e-7}
    assert pick_precision({"float32": 92.1, "bfloat16": 34.9, "onnx": 40.4}, error) == "onnx"  # 16% slower: a tie
    assert pick_precision({"float32": 92.1, "bfloat16": 30.0, "onnx": 40.4}, error) == "bfloat16"  # 35%: real
    assert pick_precision({"float32": 36.0, "bfloat16": 30.0, "onnx": 40.4}, error) == "float32"
    assert pick_precision({"float32": 92.1, "bfloat16": 34.9, "onnx": 40.4}, error, margin=0.0) == "bfloat16"
    assert pick_precision({"a": 10.0, "b": 11.0}, {"a": 1e-3, "b": 1e-3}) == "a"
    assert pick_precision({"float32": 50.0}, {"float32": 0.0}) == "float32"


def test_use_sets_the_encoder_and_keeps_the_identity(model):
    other = load_model(DEMO)
    identity = other.identity
    assert use_text_precision(other, "bfloat16").chosen == "bfloat16"
    assert other.identity == identity and other.text_encoder is not model.text_encoder
    levels, _ = other.encode_text_strings(["a red circle"])
    ref, _ = model.encode_text_strings(["a red circle"])
    assert all(a.dtype == torch.float32 for a in levels)
    assert all(float((a - b).norm() / b.norm()) < 0.02 for a, b in zip(levels, ref, strict=True))
    with pytest.raises(ValueError, match="text precision must be one of"):
        text_encoder_in(model, "int4")
