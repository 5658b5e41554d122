"""The start-up line: what the service runs with, said once in one log line when the first load is done.

    serving: model models/demo (a7522e9404e1, float32 weights) on cpu; index v-20261203T071250Z-5a5c4a
    (40 images, 200 captions; store float16); FAISS images flat-ip [IndexFlatIP], captions flat-ip
    [IndexFlatIP]; query encoder int8; re-rank float32; 1 torch thread x 2 workers, batches of up to 8
"""

from __future__ import annotations

from typing import Any

from .settings import REPO, Settings


def serving_line(
    settings: Settings, model: Any, index: Any = None, index_error: str | None = None, text_precision: str | None = None
) -> str:
    """The line for ``model`` (a loaded ``HATModel``) and ``index`` (the open index, or None with the reason
    ``index_error``): model path and identity, device, precisions (``text_precision``: the query encoder's, when
    the service chose it), index version and FAISS index types."""
    import torch

    weights = next(iter(model.parameters())).dtype
    threads = torch.get_num_threads()
    parts = [
        f"model {_path(settings.model)} ({model.identity[:12]}, {str(weights).removeprefix('torch.')} weights) "
        f"on {model.device}",
        _index_text(index, index_error),
        *([f"query encoder {text_precision}"] if text_precision else []),
        f"re-rank {settings.rerank_dtype}",
        f"{threads} torch thread{'s' if threads != 1 else ''} x "
        + (f"{settings.processes} search processes, " if settings.processes else f"{settings.workers} workers, ")
        + f"batches of up to {settings.max_batch}",
    ]
    return "serving: " + "; ".join(parts)


def _path(path: str) -> str:
    """``models/demo`` for the bundled model, else the path as configured."""
    prefix = str(REPO) + "/"
    return path.removeprefix(prefix)


def _index_text(index: Any, error: str | None) -> str:
    """``index VERSION (N images, M captions; store S); FAISS images TYPE [Class], captions ...``."""
    if index is None:
        return f"no index ({error or 'none loaded'})"
    parts = getattr(index, "parts", None) or [index]  # a sharded index holds one index per shard
    store = index.manifest.get("store")
    shards = f"; {len(parts)} shards" if len(parts) > 1 else ""
    text = f"index {index.version} ({index.num_images} images, {index.num_captions} captions; store {store}{shards})"
    kinds = []
    for kind in ("images", "captions"):
        types = sorted({_faiss_type(part, kind) for part in parts} - {None})
        if types:
            kinds.append(f"{kind} {' / '.join(types)}")
    return f"{text}; FAISS {', '.join(kinds) or 'none (empty index)'}"


def _faiss_type(part: Any, kind: str) -> str | None:
    """``flat-ip [IndexFlatIP]``, ``ivf1024-flat-ip nprobe 32 [IndexIVFFlat]``: the manifest's type of the ``kind``
    index and the FAISS class in memory (``Gpu...`` on a GPU), or None without one (no vectors of that kind)."""
    index = part.faiss.get(kind)
    if index is None:
        return None
    info = part.manifest.get("faiss", {}).get(kind) or {}
    text = info.get("type", "?")
    if not info.get("exact", True):
        text += f" nprobe {info.get('nprobe', part.manifest['faiss'].get('nprobe'))}"
    if part.refine.get(kind):
        text += f" refine x{part.refine[kind]}"
    return f"{text} [{type(index).__name__}]"
