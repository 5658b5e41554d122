"""Loading and saving HAT models: the authors' Lightning ``.ckpt`` files and the project's own format.

The project's format is a directory::

    config.json        {"format": "hat-search-model", "format_version": 1, "model": {...}, "tokenizer": {...}}
    model.safetensors  the weights (float32 or float16; loaded as float32)
    vocab.txt          the WordPiece vocabulary

Checkpoints are read with ``torch.load(weights_only=True)``; a file that needs full unpickling (which can run
arbitrary code) is refused unless the caller passes ``allow_unsafe_pickle=True`` (CLI:
``--allow-unsafe-pickle``) for a file they trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .authors import convert_authors_state_dict, infer_authors_config, is_authors_state_dict
from .config import HATConfig
from .errors import CheckpointError, UnsafeCheckpointError
from .hat import HATModel
from .pretrained import package_text_state, package_weights_sha256, sha256_file
from .tokenizer import VOCAB_FILENAME, HATTokenizer

logger = logging.getLogger(__name__)

FORMAT_NAME = "hat-search-model"
FORMAT_VERSION = 1
CONFIG_FILENAME = "config.json"
WEIGHTS_FILENAME = "model.safetensors"
_SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# torch.save's legacy (non-zip) format starts with a protocol-2 pickle of a magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a"


def read_authors_checkpoint(
    path: str | Path, *, allow_unsafe_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a Lightning ``.ckpt`` (or a bare state dict file) -> (state dict, ``hyper_parameters["config"]``).

    Raises:
        UnsafeCheckpointError: the file needs full unpickling and ``allow_unsafe_pickle`` is False.
        CheckpointError: missing, truncated or non-checkpoint file, or no HAT weights inside.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with path.open("rb") as handle:
        head = handle.read(4)
    if head[:2] != b"PK" and head != _LEGACY_MAGIC:  # zip archives (even truncated ones) start with "PK"
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (neither a torch zip archive nor a legacy file)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" not in str(exc) and "Weights only" not in str(exc):
            raise CheckpointError(f"{path} is not a PyTorch checkpoint ({_first_line(exc)})") from exc
        if not allow_unsafe_pickle:
            raise UnsafeCheckpointError(
                f"{path} contains Python objects that need full unpickling, which can run arbitrary code. "
                "If you trust this file, opt in with allow_unsafe_pickle=True (CLI: --allow-unsafe-pickle). "
                f"Detail: {unpickling_detail(exc)}"
            ) from exc
        logger.warning("loading %s with full unpickling (allow_unsafe_pickle=True)", path)
        obj = _load_unsafe(path)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {_first_line(exc)}"
        ) from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dictionary")
    state_dict = obj.get("state_dict", obj)
    hparams = obj.get("hyper_parameters") or {}
    config = hparams.get("config", hparams) if isinstance(hparams, Mapping) else {}
    if not isinstance(state_dict, Mapping) or not is_authors_state_dict(state_dict):
        raise CheckpointError(
            f"{path} holds no HAT weights: expected keys starting with 'vit_model.', 'text_transformer.' "
            "and 'cross_modal_image_transform'"
        )
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    return tensors, dict(config) if isinstance(config, Mapping) else {}


def _load_unsafe(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # any failure of an arbitrary pickle is reported the same way
        raise CheckpointError(f"{path} could not be unpickled: {_first_line(exc)}") from exc


def unpickling_detail(exc: BaseException) -> str:
    """The line of torch's weights-only refusal that names the offending object (else its first line): for
    every reader of ``torch.load(weights_only=True)`` files (checkpoints here, training states in training)."""
    for line in str(exc).splitlines():
        if "Unsupported" in line or "global" in line.lower() or "Can only" in line:
            return line.strip()
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return text[0] if text else type(exc).__name__


def load_into(model: HATModel, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state_dict`` into ``model`` (as float32), reporting missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:8])}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}")
    if wrong:
        problems.append(f"wrong shapes ({len(wrong)}): {'; '.join(wrong[:8])}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + " | ".join(problems))
    converted = {k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(converted, strict=True)


def _load_authors(path: Path, allow_unsafe_pickle: bool, text_heads: int | None) -> HATModel:
    state_dict, hparams = read_authors_checkpoint(path, allow_unsafe_pickle=allow_unsafe_pickle)
    config = infer_authors_config(state_dict, hparams, text_heads=text_heads)
    model = HATModel(config)
    load_into(model, convert_authors_state_dict(state_dict, config.image_stages), str(path))
    vocab_size = config.text.vocab_size
    tokenizer = HATTokenizer(max_length=config.max_text_len)
    if tokenizer.vocab_size > vocab_size:
        logger.warning(
            "%s: text encoder has %d token embeddings but the uncased BERT vocabulary has %d; "
            "tokenising arbitrary text will fail",
            path,
            vocab_size,
            tokenizer.vocab_size,
        )
    model.tokenizer = tokenizer
    model.identity = sha256_file(path)
    return model


def _load_project(directory: Path) -> HATModel:
    config_path = directory / CONFIG_FILENAME
    weights_path = directory / WEIGHTS_FILENAME
    if not config_path.is_file():
        raise CheckpointError(f"{directory} is not a saved HAT model: {CONFIG_FILENAME} is missing")
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{config_path} is not a {FORMAT_NAME} config")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{config_path} has format_version {meta.get('format_version')!r}; this version reads {FORMAT_VERSION}"
        )
    config = HATConfig.from_dict(meta.get("model", {}))
    if not weights_path.is_file():
        raise CheckpointError(f"{directory}: {WEIGHTS_FILENAME} is missing")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state_dict = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file: {_first_line(exc)}") from exc
    model = HATModel(config)
    identity = sha256_file(weights_path)
    if config.text_weights:
        package = _text_package(config.text_weights)
        sha = package_weights_sha256(package)
        if meta.get("text_weights_sha256") not in (None, sha):
            raise CheckpointError(
                f"{directory} was trained with different {package!r} text-encoder weights "
                f"(sha256 {meta.get('text_weights_sha256')}, installed {sha}); install the matching package version"
            )
        state_dict = {**state_dict, **{k: v.float() for k, v in package_text_state(package).items()}}
        identity = hashlib.sha256(f"{identity}+{sha}".encode()).hexdigest()
    load_into(model, state_dict, str(weights_path))
    tok_cfg = meta.get("tokenizer", {})
    vocab = directory / VOCAB_FILENAME
    model.tokenizer = HATTokenizer(
        vocab if vocab.is_file() else None,
        max_length=int(tok_cfg.get("max_length", config.max_text_len)),
        lowercase=bool(tok_cfg.get("lowercase", True)),
    )
    model.identity = identity
    return model


def _text_package(reference: str) -> str:
    if not reference.startswith("package:"):
        raise CheckpointError(f"text_weights must be '' or 'package:<name>', got {reference!r}")
    return reference.split(":", 1)[1]


def _saved_state(model: HATModel, dtype: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors to store, and extra config entries; package-referenced text weights are left out."""
    state = model.state_dict()
    extra: dict[str, str] = {}
    if model.config.text_weights:
        package = _text_package(model.config.text_weights)
        reference = package_text_state(package)
        changed = [k for k, v in reference.items() if not torch.equal(state[k].cpu().float(), v.float())]
        if changed:
            raise CheckpointError(
                f"the text encoder differs from {package!r} ({len(changed)} tensors, e.g. {changed[0]}): "
                "it cannot be referenced; save with text_weights=''"
            )
        state = {k: v for k, v in state.items() if k not in reference}
        extra["text_weights_sha256"] = package_weights_sha256(package)
    target = _SAVE_DTYPES[dtype]
    tensors = {
        k: (v.detach().to("cpu", target) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in state.items()
    }
    return tensors, extra


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    allow_unsafe_pickle: bool = False,
    text_heads: int | None = None,
) -> HATModel:
    """Load a HAT model in eval mode on ``device``.

    Args:
        path: the authors' Lightning ``.ckpt`` (architecture read from tensor shapes and the stored config)
            or a directory in the project's own format (see :func:`save_model`).
        device: where the model lives.
        allow_unsafe_pickle: allow full unpickling of a trusted ``.ckpt`` that ``weights_only`` refuses.
        text_heads: BERT attention heads for authors' checkpoints (default ``hidden_size / 64``).

    The returned model carries ``model.tokenizer`` and ``model.identity`` (SHA-256 of the weights file).
    """
    path = Path(path)
    if path.is_dir():
        model = _load_project(path)
    elif path.exists():
        model = _load_authors(path, allow_unsafe_pickle, text_heads)
    else:
        raise CheckpointError(f"model not found: {path}")
    return model.to(device).eval()


def save_model(model: HATModel, path: str | Path, *, dtype: str = "float32") -> Path:
    """Save ``model`` in the project's format at directory ``path`` (replaced atomically if it exists).

    ``dtype`` (``float32``, ``float16`` or ``bfloat16``) is the storage type of the floating-point weights.
    """
    from safetensors.torch import save_file

    if dtype not in _SAVE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_SAVE_DTYPES)}, got {dtype!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state, extra = _saved_state(model, dtype)
        save_file(state, str(tmp / WEIGHTS_FILENAME), metadata={"format": FORMAT_NAME})
        tokenizer = model.tokenizer or HATTokenizer(max_length=model.config.max_text_len)
        tokenizer.save(tmp)
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "weights_dtype": dtype,
            **extra,
            "model": model.config.to_dict(),
            "tokenizer": tokenizer.to_config(),
        }
        (tmp / CONFIG_FILENAME).write_text(json.dumps(meta, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        for item in tmp.iterdir():
            item.chmod(0o666 & ~umask)  # mkdtemp and safetensors create owner-only files
            with item.open("rb") as handle:
                os.fsync(handle.fileno())
        tmp.chmod(0o777 & ~umask)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
