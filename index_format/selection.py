"""First-stage search restricted to a set of rows (a metadata filter's), for each FAISS tier of the index.

* Flat (exact) index: FAISS's own search with an ``IDSelectorArray`` of the allowed rows; FAISS visits only
  those rows (cost proportional to the filter's matches, not the gallery).
* IVF-Flat / IVF-PQ with at most ``EXACT_SUBSET`` allowed rows: the allowed rows' float32 vectors are read from
  the segments and scored exactly (an IVF index probes ``nprobe`` lists and would miss matches outside them: a
  selective filter could leave fewer than ``k``).
* Larger sets on IVF: FAISS with an ``IDSelectorBitmap`` (one bit test per vector in the probed lists) at the
  index's ``nprobe``; when fewer than ``k`` come back, ``nprobe`` doubles until they do or every list is probed.
* An index whose search refuses selectors (FAISS GPU indexes): the exact subset, whatever its size.

Every path returns the best ``k`` of the allowed rows by the score it uses, row -1 padded like FAISS.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

logger = logging.getLogger(__name__)
EXACT_SUBSET = 20_000  # on IVF tiers, allowed sets up to this size are scored exactly from the segments


def exact_subset(q: np.ndarray, k: int, allowed: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of ``allowed`` rows by inner product of their ``vectors [A, G]`` with ``q [B, G]`` ->
    (scores, rows) ``[B, k]``; ties in row order."""
    scores = q @ vectors.T  # [B, A]
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1).astype(np.float32), allowed[order].astype(np.int64)


def _bitmap(allowed: np.ndarray, n: int) -> np.ndarray:
    """FAISS's bitmap layout: bit ``i & 7`` of byte ``i >> 3`` set for each allowed row ``i``."""
    bits = np.zeros(n, dtype=bool)
    bits[allowed] = True
    return np.packbits(bits, bitorder="little")


def search_allowed(
    index,
    q: np.ndarray,
    k: int,
    factor: int | None,
    allowed: np.ndarray,
    vectors_of: Callable[[np.ndarray], np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """Search ``index`` for the best ``k`` (``k * factor`` for a compressed index re-scored afterwards) among
    the sorted ``allowed`` rows; ``vectors_of(rows)`` reads rows' float32 vectors from the segments."""
    import faiss

    allowed = np.ascontiguousarray(allowed, dtype=np.int64)
    want = min(k * factor if factor else k, len(allowed))
    ivf = faiss.try_extract_index_ivf(index)
    try:
        if ivf is None:
            params = faiss.SearchParameters(sel=faiss.IDSelectorArray(allowed))
            return index.search(q, want, params=params)
        if len(allowed) > EXACT_SUBSET:
            return _ivf_selected(index, ivf, q, want, allowed)
    except RuntimeError as exc:  # e.g. a GPU index: no selectors
        logger.info("filtered search falls back to exact scoring of %d rows: %s", len(allowed), str(exc)[:200])
    return exact_subset(q, want, allowed, vectors_of(allowed))


def _ivf_selected(index, ivf, q: np.ndarray, want: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    bitmap = _bitmap(allowed, index.ntotal)
    selector = faiss.IDSelectorBitmap(index.ntotal, faiss.swig_ptr(bitmap))
    nprobe = max(1, ivf.nprobe)
    while True:
        scores, rows = index.search(q, want, params=faiss.SearchParametersIVF(sel=selector, nprobe=nprobe))
        if nprobe >= ivf.nlist or int((rows >= 0).sum(axis=1).min()) >= want:
            return scores, rows
        nprobe = min(ivf.nlist, nprobe * 2)
