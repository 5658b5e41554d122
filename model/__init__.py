"""HAT (Hierarchical Alignment Transformers) for image-text retrieval: encoders, scorer, checkpoints.

Public API (see README "Python API"):

* :func:`load_model` / :func:`save_model`: the authors' Lightning ``.ckpt`` files and the project's format.
* :class:`HATModel`: ``encode_images``, ``encode_texts``, ``similarity``.
* :func:`preprocess_image`, :func:`load_image`: decoding and the authors' eval transform.
* :class:`HATTokenizer`: uncased BERT WordPiece, ``[CLS] ... [SEP]``, at most 32 tokens.
* :mod:`model.alignment`: ``scan_i2t``, ``scan_t2i``, ``hierarchical_similarity``.
* :func:`use_text_precision`: the query encoder in float32, bfloat16, int8 or float32 on ONNX Runtime
  (``auto``: timed at start-up); :func:`wide_encoding`: forwards on its wide session (more threads) in a block.
* :class:`CommandParser`: the argument parser of the project's commands (defaults and examples in the help).
"""

from .alignment import hierarchical_similarity, scan_i2t, scan_t2i
from .checkpoint import load_model, save_model
from .cli import CommandParser
from .config import HATConfig, SwinConfig, TextConfig
from .devices import DeviceError, resolve_device
from .errors import CheckpointError, HATError, ImageDecodeError, TokenizerError, UnsafeCheckpointError
from .hat import HATModel
from .precision import TEXT_PRECISIONS, use_text_precision, wide_encoding
from .preprocess import load_image, load_pixels, preprocess_image
from .tokenizer import HATTokenizer, TokenBatch

__all__ = [
    "TEXT_PRECISIONS",
    "CheckpointError",
    "CommandParser",
    "DeviceError",
    "HATConfig",
    "HATError",
    "HATModel",
    "HATTokenizer",
    "ImageDecodeError",
    "SwinConfig",
    "TextConfig",
    "TokenBatch",
    "TokenizerError",
    "UnsafeCheckpointError",
    "hierarchical_similarity",
    "load_image",
    "load_model",
    "load_pixels",
    "preprocess_image",
    "resolve_device",
    "save_model",
    "scan_i2t",
    "scan_t2i",
    "use_text_precision",
    "wide_encoding",
]
