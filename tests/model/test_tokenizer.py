"""Tokenisation as the authors: uncased WordPiece, [CLS] ... [SEP], at most 32 tokens, zero padded."""

from __future__ import annotations

import pytest
import torch

from model import HATTokenizer, TokenizerError
from model.tokenizer import default_vocab_path


@pytest.fixture(scope="module")
def tok():
    return HATTokenizer()


def test_default_vocabulary_is_uncased_bert(tok):
    assert default_vocab_path().is_file()
    assert tok.vocab_size == 30522


def test_cls_sep_padding_and_lengths(tok):
    batch = tok(["A Red Circle.", "a dog"])
    assert batch.input_ids[:, 0].tolist() == [101, 101]
    # [CLS] a red circle . [SEP]  /  [CLS] a dog [SEP] [PAD] [PAD]
    assert batch.input_ids.tolist() == [[101, 1037, 2417, 4418, 1012, 102], [101, 1037, 3899, 102, 0, 0]]
    assert batch.lengths.tolist() == [6, 4]
    assert batch.attention_mask[1].tolist() == [1, 1, 1, 1, 0, 0]
    assert torch.equal(batch.attention_mask.sum(1), batch.lengths)


def test_lower_casing_and_accents(tok):
    assert torch.equal(tok(["BLUE Square"]).input_ids, tok(["blue square"]).input_ids)
    assert torch.equal(tok(["café"]).input_ids, tok(["cafe"]).input_ids)


def test_truncated_to_32_with_sep(tok):
    batch = tok(["word " * 100])
    assert batch.input_ids.shape == (1, 32)
    assert batch.lengths.tolist() == [32]
    assert batch.input_ids[0, -1] == 102


def test_empty_caption_is_cls_sep(tok):
    assert tok([""]).input_ids.tolist() == [[101, 102]]


@pytest.mark.parametrize("bad", ["a string, not a list", [], ["ok", 3]])
def test_bad_inputs(tok, bad):
    with pytest.raises(TokenizerError):
        tok(bad)


def test_ids_outside_model_vocabulary_are_named(golden_model):
    ids = torch.tensor([[101, 5000, 102]])
    with pytest.raises(TokenizerError, match=r"token ids must lie in \[0, 1000\)"):
        golden_model.encode_texts(ids, torch.ones_like(ids))


def test_spans_point_into_the_text(tok):
    text = "A Red Café-bicycling  ünï " + "word " * 40
    spans = tok.spans(text)
    assert len(spans) == int(tok([text]).lengths[0]) == 32  # truncated as the batch is
    assert spans[0] is None and spans[-1] is None  # [CLS], [SEP]
    words = [text[start:end] for start, end in spans[1:-1]]
    assert words[:9] == ["A", "Red", "Café", "-", "bi", "cy", "cl", "ing", "ün"]
    with pytest.raises(TokenizerError):
        tok.spans(3)
