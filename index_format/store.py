"""Token feature stores: how the re-ranker's per-level features are kept on disk.

A store holds token rows ``[T, D]`` of one level (an image's ``R_l`` regions or a caption's words, items laid
end to end) in one of four encodings, chosen at build time:

* ``float16``: the features as they are, 2 bytes per value.
* ``int8``: symmetric 8-bit codes with one float16 scale per token (about 2x smaller).
* ``pca[:BITS]``: transform coding. Tokens are rotated into the principal axes of the gallery's features and
  each axis gets 0, 2, 4 or 8 bits (Lloyd-Max buckets) by reverse water-filling, ``BITS`` per dimension on
  average over an item's tokens of all levels. Bits go where a score error would be largest: axes with
  variance along which the other modality's features also have energy, and levels with few tokens (a level
  score averages fewer token errors). The re-ranker rotates the query into the same axes instead of
  decoding back, so decoding is one table lookup per byte. ``pca:2`` is about 7.5x smaller than float16.

* ``pq[:BITS]``: product quantisation in the same axes, whitened by the captions' second moment: each byte codes
  1 to 16 axes as one of 256 centroids, ``BITS`` per dimension on average (every byte full, the bytes an item's
  codes take within the budget). The re-rank reads the dot products from the codes without decoding.

Every store also keeps each token's L2 norm, computed before compression (float32; in the coded stores one byte,
log-spaced over the item's own range, :func:`encode_norms`): the i2t scorer takes it as ``image_norms`` instead of
recomputing it. Stores are plain ``.npy`` files, memory-mapped when read.
"""

from __future__ import annotations

import heapq
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

STORE_KINDS = ("float16", "int8", "pca", "pq")
CODED_KINDS = ("pca", "pq")  # stores with codebooks (image tokens only; captions stay float16)
DEFAULT_BITS = {"pca": 2.0, "pq": 1.0}
# The store new indexes get: the smallest measured to keep >= 99% of float32's top 10 on the demo test split
# (99.03% over its 5,000 captions; 99,200 B per HAT-base image, 16.0x under float16) and re-ranked from its codes
# without decoding (docs/benchmarks.md, "Whole bytes, dealt axes, one-byte norms"). ``pq:1.5`` keeps more margin
# (99.28%, ~149 kB); ``--store float16`` keeps the features as encoded.
DEFAULT_STORE = "pq:1"
KMEANS_ROWS = 16_384  # token rows each pq byte's 256 centroids are fitted on (65,536 measured no better)
# int32 lookup indices built at a time when scoring from codes (4 MiB per decoder and thread, reused)
INDEX_TILE = 1 << 20
LITTLE_ENDIAN = sys.byteorder == "little"
CHUNK_TOKENS = 65_536  # token rows converted to float32 at a time when writing a table (bounds memory)


class StoreError(ValueError):
    """A feature store is missing, truncated or inconsistent with its description."""


@dataclass(frozen=True)
class StoreSpec:
    """What ``--store`` asked for: ``float16``, ``int8``, ``pca[:BITS]`` or ``pq[:BITS]`` (average bits per
    dimension; default 2 for pca, 1 for pq)."""

    kind: str = "float16"
    bits: float = 2.0

    @classmethod
    def parse(cls, text: str) -> StoreSpec:
        kind, _, arg = text.partition(":")
        if kind not in STORE_KINDS:
            raise ValueError(f"unknown feature store {text!r}; choose one of float16, int8, pca[:BITS], pq[:BITS]")
        if kind not in CODED_KINDS:
            if arg:
                raise ValueError(f"store {kind!r} takes no argument, got {text!r}")
            return cls(kind)
        try:
            bits = float(arg) if arg else DEFAULT_BITS[kind]
        except ValueError:
            bits = -1.0
        if not 0.25 <= bits <= 8:
            raise ValueError(f"{kind} store needs 0.25..8 average bits per dimension, got {text!r}")
        return cls(kind, bits)

    @property
    def coded(self) -> bool:
        """Whether image tokens are coded with trained codebooks (``pca`` or ``pq``)."""
        return self.kind in CODED_KINDS

    def label(self) -> str:
        return f"{self.kind}:{self.bits:g}" if self.coded else self.kind


# ----------------------------------------------------------------------------------------------- codecs


WIDTHS = (8, 4, 2)  # bits per coded component, widest first


@dataclass
class PCACodebook:
    """Transform coding of token rows: rotate into the principal axes, spend bits where the variance is.

    ``basis [D, D]`` (orthonormal rows, by decreasing variance), ``mean [D]`` (in rotated coordinates),
    ``widths [D]`` (8, 4, 2 or 0 bits per component, non-increasing) and ``levels [D, 256]`` (the value each
    code decodes to, the mean of its bucket). A component with 0 bits decodes to its mean.
    """

    basis: np.ndarray
    mean: np.ndarray
    widths: np.ndarray
    edges: np.ndarray  # [D, 255] upper bucket edges (only the first 2**width - 1 used)
    levels: np.ndarray  # [D, 256]

    @classmethod
    def quantize(cls, axes: Axes, widths: np.ndarray) -> PCACodebook:
        d = len(widths)
        z = (axes.sample - axes.centre) @ axes.basis.T  # centred coefficients [T, D]
        edges = np.zeros((d, 255))
        levels = np.zeros((d, 256))
        fit = z[:: max(1, len(z) // 50_000)]  # Lloyd on at most ~50k values per axis: plenty for 256 levels
        for k in np.flatnonzero(widths):
            edges[k], levels[k] = _scalar_quantizer(fit[:, k], int(widths[k]))
        f32 = np.float32
        return cls(
            axes.basis.astype(f32),
            (axes.basis @ axes.centre).astype(f32),
            np.asarray(widths, np.uint8),
            edges.astype(f32),
            levels.astype(f32),
        )

    def save(self, prefix: str) -> None:
        for name in ("basis", "mean", "widths", "edges", "levels"):
            np.save(f"{prefix}.{name}.npy", getattr(self, name))

    @classmethod
    def load(cls, prefix: str) -> PCACodebook:
        try:
            return cls(*(np.load(f"{prefix}.{n}.npy") for n in ("basis", "mean", "widths", "edges", "levels")))
        except (OSError, ValueError) as exc:
            raise StoreError(f"{prefix}: cannot read the compression codebook ({exc})") from exc

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``[..., D]`` into the codebook's rotated frame (scores and Gram matrices are unchanged)."""
        return x @ torch.from_numpy(self.basis).to(x.dtype).T

    def packed_bytes(self) -> int:
        """Bytes per token of the packed codes."""
        return sum(-(-int((self.widths == w).sum()) * w // 8) for w in WIDTHS)

    def decoder_groups(self) -> list[tuple[np.ndarray, int, int]]:
        """Per width: (table ``[n_bytes * 256, per]``, n_bytes, components): byte ``j`` of the group with value
        ``v`` decodes to row ``256 * j + v``, the ``per`` components it packs."""
        groups = []
        byte = np.arange(256)
        for width in WIDTHS:
            comps = np.flatnonzero(self.widths == width)
            if not comps.size:
                continue
            per = 8 // width
            n_bytes = -(-comps.size // per)
            fields = (byte[:, None] >> (np.arange(per)[None, :] * width)) & (2**width - 1)  # [256, per]
            padded = np.zeros((n_bytes * per, 256), np.float32)
            padded[: comps.size] = self.levels[comps] + self.mean[comps, None]
            per_byte = padded.reshape(n_bytes, per, 256)
            table = np.stack([per_byte[:, i, :][:, fields[:, i]] for i in range(per)], axis=2)  # [n_bytes,256,per]
            groups.append((np.ascontiguousarray(table.reshape(n_bytes * 256, per)), n_bytes, comps.size))
        return groups

    def encode(self, x: np.ndarray) -> np.ndarray:
        """``[T, D]`` -> packed codes ``[T, B]`` uint8 (components by decreasing width, low bits first)."""
        z = np.asarray(x, dtype=np.float32) @ self.basis.T - self.mean
        parts = []
        for width in WIDTHS:
            comps = np.flatnonzero(self.widths == width)
            if comps.size:
                codes = np.stack([np.searchsorted(self.edges[k, : 2**width - 1], z[:, k]) for k in comps], axis=1)
                parts.append(_pack(codes.astype(np.uint8), width))
        return np.concatenate(parts, axis=1) if parts else np.zeros((x.shape[0], 0), np.uint8)


@dataclass
class Axes:
    """Principal axes of a sample of token rows, ordered by ``importance`` (decreasing)."""

    basis: np.ndarray  # [D, D] orthonormal rows
    centre: np.ndarray  # [D]
    importance: np.ndarray  # [D] expected squared score error per unit of coefficient error, normalised
    sample: np.ndarray  # [T, D] float64 rows the codebook's buckets are fitted on
    weight: np.ndarray | None = None  # [D] sqrt of the other side's energy per axis (mean 1): error weights
    text_basis: np.ndarray | None = None  # [D, D] whitened axes: x = (coefficients + mean) @ text_basis


def principal_axes(x: np.ndarray, other: np.ndarray | None, seed: int = 0, max_rows: int = 200_000) -> Axes:
    """PCA of ``x [T, D]``; each axis's importance is its variance times ``E[other_k^2]``.

    ``other [T', D]`` are token rows of the modality ``x`` is scored against (same level): a coefficient's
    error enters a dot product multiplied by the other side's coordinate along that axis. Importance is
    normalised by ``E||x||^2 E||other||^2`` so that levels compare in units of cosine.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.shape[0] > max_rows:
        x = x[np.random.default_rng(seed).choice(x.shape[0], max_rows, replace=False)]
    centre = x.mean(axis=0)
    variance, vectors = np.linalg.eigh(np.cov((x - centre).T))
    variance = np.maximum(variance, 0.0)
    energy = np.ones(len(variance)) if other is None else ((np.asarray(other, np.float64) @ vectors) ** 2).mean(0)
    importance = variance * energy / max((x**2).sum(1).mean() * energy.sum(), 1e-30)
    order = np.argsort(importance)[::-1]
    weight = np.sqrt(energy / max(energy.mean(), 1e-30))
    return Axes(vectors[:, order].T.copy(), centre, importance[order], x, weight[order])


def whitened_axes(x: np.ndarray, other: np.ndarray, seed: int = 0, max_rows: int = 200_000) -> Axes:
    """Principal axes of ``x`` in the metric of the scores: ``y = x M`` with ``M = E[t t^T]^(1/2)`` over the
    other modality's tokens ``t``, so that a squared error in ``y`` is the expected squared error of the dot
    products ``x . t`` along every direction, not only along ``x``'s own principal axes.

    ``basis`` is then the encoding map ``A = B M`` (``B``: the principal axes of ``y``; coefficients
    ``z = (x - centre) A^T``) and ``text_basis`` is ``B M^-1``, with ``x = (z + A centre) text_basis`` and
    ``x . t = (z + A centre) . (t text_basis^T)``. Importance: the variance of ``y`` per axis, normalised as in
    :func:`principal_axes`.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.shape[0] > max_rows:
        x = x[np.random.default_rng(seed).choice(x.shape[0], max_rows, replace=False)]
    t = np.asarray(other, np.float64)
    second = t.T @ t / max(len(t), 1)
    lam, u = np.linalg.eigh(second)
    lam = np.maximum(lam, lam.max() * 1e-8 + 1e-30)  # directions the captions never use: tiny, still invertible
    metric, inverse = (u * np.sqrt(lam)) @ u.T, (u / np.sqrt(lam)) @ u.T
    centre = x.mean(axis=0)
    y = (x - centre) @ metric
    variance, vectors = np.linalg.eigh(np.cov(y.T))
    variance = np.maximum(variance, 0.0)
    importance = variance / max((x**2).sum(1).mean() * np.trace(second), 1e-30)
    order = np.argsort(importance)[::-1]
    b = vectors[:, order].T
    return Axes(b @ metric, centre, importance[order], x, np.ones(len(order)), b @ inverse)


SCALAR_STEPS = {0: 2, 2: 4, 4: 8}  # pca: bits per component, 0 to 8
VECTOR_STEPS = {0: 0.5, 0.5: 1, 1: 2, 2: 4, 4: 8}  # pq: bits per dimension (a byte covers 8 / rate dimensions)


def allocate_bits(
    importance: Sequence[np.ndarray], tokens: Sequence[float], budget: float, steps: dict = SCALAR_STEPS
) -> list[np.ndarray]:
    """Reverse water-filling over several levels: widths in {0, 2, 4, 8} per component (``steps``: the upgrades
    allowed; :data:`VECTOR_STEPS` also has 0.5 and 1 bit per dimension).

    ``importance[l]`` per component of level ``l`` (decreasing), ``tokens[l]`` tokens per item at that level,
    ``budget`` bits per item. A level's score is a mean over about ``tokens[l]`` independent token errors, so
    its squared error is the per-token error over ``tokens[l]``; each bit spent on a component costs
    ``tokens[l]`` bits per item. Greedy: buy the upgrade with the largest error drop per bit, with a
    component of importance v at b bits erring by ``v * 4**-b`` (``v`` at 0 bits).
    """
    nxt = steps
    widths = [np.zeros(len(v), np.float64) for v in importance]

    def gain(level: int, k: int) -> float:
        b = float(widths[level][k])
        drop = importance[level][k] * ((4.0**-b if b else 1.0) - 4.0 ** -nxt[b]) / tokens[level]
        return drop / ((nxt[b] - b) * tokens[level])

    heap = [(-gain(level, k), level, k) for level, v in enumerate(importance) for k in range(len(v))]
    heapq.heapify(heap)
    spent = 0.0
    while heap:
        _, level, k = heapq.heappop(heap)
        b = float(widths[level][k])
        cost = (nxt[b] - b) * tokens[level]
        if spent + cost > budget:
            continue
        spent += cost
        widths[level][k] = nxt[b]
        if nxt[b] < 8:
            heapq.heappush(heap, (-gain(level, k), level, k))
    # Packing wants widths non-increasing along the (importance-sorted) components; greedy already is.
    ints = steps is SCALAR_STEPS
    return [np.sort(w)[::-1].astype(np.int64 if ints else np.float64) for w in widths]


def train_codebooks(
    levels: Sequence[np.ndarray], others: Sequence[np.ndarray | None], tokens: Sequence[float], bits: float,
    kind: str = "pca",
) -> list[PCACodebook | PQCodebook]:
    """One codebook per level, ``bits`` per dimension on average over an item's tokens of all levels
    (``kind``: ``pca``, scalar codes per axis, or ``pq``, one byte per group of axes)."""
    axes = [principal_axes(x, o) for x, o in zip(levels, others, strict=True)]
    budget = bits * levels[0].shape[1] * sum(tokens)
    if kind == "pq":
        axes = [whitened_axes(x, o) if o is not None else a for x, o, a in zip(levels, others, axes, strict=True)]
        rates = byte_rates([a.importance for a in axes], tokens, budget)
        return [PQCodebook.quantize(a, r, seed=level) for level, (a, r) in enumerate(zip(axes, rates, strict=True))]
    widths = allocate_bits([a.importance for a in axes], tokens, budget)
    return [PCACodebook.quantize(a, w) for a, w in zip(axes, widths, strict=True)]


def _run_end(rates: np.ndarray, axis: int) -> int:
    """End (exclusive) of the run of axes from ``axis`` on that share its rate."""
    end = axis
    while end < len(rates) and rates[end] == rates[axis]:
        end += 1
    return end


def whole_bytes(rates: np.ndarray) -> np.ndarray:
    """``rates`` (non-increasing bits per dimension, :data:`VECTOR_STEPS`) with every byte full: a run of ``L``
    axes at ``r`` bits is coded ``8 / r`` axes a byte, so when ``L`` is no multiple of ``8 / r`` its last byte
    would cover fewer axes at the price of a whole byte. The axes that follow the run (the next in importance,
    at a lower rate) join it instead until that byte is full: the same bytes, more axes coded."""
    rates = np.array(rates, np.float64)
    d, axis = len(rates), 0
    while axis < d and rates[axis] > 0:
        end = _run_end(rates, axis)
        per = round(8 / rates[axis])
        if (end - axis) % per:
            end = min(d, end + per - (end - axis) % per)
            rates[axis:end] = rates[axis]
        axis = end
    return rates


def code_bytes(rates: np.ndarray) -> int:
    """Bytes a token's ``pq`` code takes with these ``rates`` (a byte per ``8 / r`` axes of each run)."""
    total, axis = 0, 0
    while axis < len(rates) and rates[axis] > 0:
        end = _run_end(rates, axis)
        total += -(-(end - axis) // round(8 / rates[axis]))
        axis = end
    return total


def byte_rates(importance: Sequence[np.ndarray], tokens: Sequence[float], budget: float) -> list[np.ndarray]:
    """``pq`` rates per level whose codes take at most ``budget / 8`` bytes an item, every byte full.

    :func:`allocate_bits` counts fractional bytes (a run of 9 axes at 1 bit as 9 bits, though its codes take
    2 bytes); at one bit per dimension that made the codes ~2% larger than asked at HAT-base sizes and ~6% at demo
    sizes. Here its allocation is filled to whole bytes (:func:`whole_bytes`) and the water level is searched
    (bisection) so that the bytes an item's codes really take stay within the budget."""
    target = budget / 8

    def fitted(bits: float) -> tuple[list[np.ndarray], float]:
        rates = [whole_bytes(r) for r in allocate_bits(importance, tokens, bits, VECTOR_STEPS)]
        return rates, sum(code_bytes(r) * t for r, t in zip(rates, tokens, strict=True))

    best, spent = fitted(0.0)
    low, high = 0.0, budget * 1.25
    for _ in range(30):
        middle = (low + high) / 2
        rates, size = fitted(middle)
        if size <= target:
            best, spent, low = rates, size, middle
        else:
            high = middle
        if target - spent < min(tokens):  # no byte of any level is left to buy
            break
    return best


def deal_axes(rates: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """An order of the axes for coding: within each run of equal rate, the axes (by decreasing ``variance``) are
    dealt to the run's bytes in serpentine order (0, 1, ..., n-1, n-1, ..., 0, 0, ...), so that every byte codes a
    similar spread of variances instead of the first byte the run's largest ones and the last its smallest
    (balanced subspaces, as optimised product quantisation's eigenvalue allocation does). A byte's 256 centroids
    then spread over its axes by their variance. Measured on the demo split: 4-6% lower score error at equal bytes
    (docs/benchmarks.md, "Whole bytes, dealt axes, one-byte norms")."""
    order, axis = [], 0
    while axis < len(rates):
        end = _run_end(rates, axis)
        if not 0 < rates[axis] < 8:  # uncoded axes, or one axis a byte: nothing to deal
            order += range(axis, end)
            axis = end
            continue
        per = round(8 / rates[axis])
        members = sorted(range(axis, end), key=lambda k: -variance[k])
        sizes = [per] * ((end - axis) // per) + ([(end - axis) % per] if (end - axis) % per else [])
        groups: list[list[int]] = [[] for _ in sizes]
        turn = 0
        while members:
            for g in range(len(sizes)) if turn % 2 == 0 else reversed(range(len(sizes))):
                if members and len(groups[g]) < sizes[g]:
                    groups[g].append(members.pop(0))
            turn += 1
        order += [k for g in groups for k in g]
        axis = end
    return np.asarray(order, np.int64)


@dataclass
class PQCodebook:
    """Product quantisation in the principal axes: the same rotation as :class:`PCACodebook`, then each byte
    codes a group of consecutive axes (``8 / rate`` of them: 1, 2, 4, 8 or 16) as one of 256 centroids.

    ``basis [D, D]`` and ``mean [D]`` as in :class:`PCACodebook`; ``rates [D]`` bits per dimension of each axis
    (8, 4, 2, 1, 0.5 or 0, non-increasing); per byte ``first [B]`` (its first axis), ``dims [B]`` (how many)
    and ``centroids [B, 256, 16]`` (centred coordinates, zero-padded past ``dims``). Centroids are fitted by
    k-means with each axis weighted by the other modality's energy along it (the score error a coordinate error
    makes), so a byte spends its 256 codes where the captions look. At one bit per dimension this keeps far
    more of the scores than scalar codes (docs/benchmarks.md, "A smaller store").
    """

    basis: np.ndarray
    mean: np.ndarray
    rates: np.ndarray
    first: np.ndarray
    dims: np.ndarray
    centroids: np.ndarray
    weight: np.ndarray  # [D] the k-means weights (assignment uses them too)
    text_basis: np.ndarray  # [D, D]: x = (coefficients + mean) @ text_basis (``basis`` itself when orthonormal)

    PARTS = ("basis", "mean", "rates", "first", "dims", "centroids", "weight", "text_basis")

    @classmethod
    def quantize(cls, axes: Axes, rates: np.ndarray, seed: int = 0) -> PQCodebook:
        order = deal_axes(np.asarray(rates), axes.importance)
        axes = Axes(
            axes.basis[order], axes.centre, axes.importance[order], axes.sample,
            None if axes.weight is None else axes.weight[order],
            None if axes.text_basis is None else axes.text_basis[order],
        )  # fmt: skip
        rates = np.asarray(rates)[order]
        z = (axes.sample - axes.centre) @ axes.basis.T  # centred coefficients [T, D]
        fit = z[:: max(1, len(z) // KMEANS_ROWS)].astype(np.float32)
        weight = (axes.weight if axes.weight is not None else np.ones(len(rates))).astype(np.float32)
        first, dims, cents = [], [], []
        rng = np.random.default_rng(seed)
        axis = 0
        while axis < len(rates) and rates[axis] > 0:
            per = round(8 / float(rates[axis]))
            count = min(per, _run_end(rates, axis) - axis)
            w = weight[axis : axis + count]
            if count == 1:  # one axis a byte: the 256-level Lloyd-Max quantiser (k-means in one dimension)
                centres = _scalar_quantizer(fit[:, axis].astype(np.float64), 8)[1][:, None].astype(np.float32)
            else:
                centres = _kmeans(fit[:, axis : axis + count] * w, 256, rng) / w
            padded = np.zeros((256, 16), np.float32)
            padded[:, :count] = centres
            first.append(axis)
            dims.append(count)
            cents.append(padded)
            axis += count
        f32 = np.float32
        return cls(
            axes.basis.astype(f32),
            (axes.basis @ axes.centre).astype(f32),
            np.asarray(rates, f32),
            np.asarray(first, np.int32),
            np.asarray(dims, np.int32),
            np.stack(cents) if cents else np.zeros((0, 256, 16), f32),
            weight,
            (axes.text_basis if axes.text_basis is not None else axes.basis).astype(f32),
        )

    def save(self, prefix: str) -> None:
        for name in self.PARTS:
            np.save(f"{prefix}.{name}.npy", getattr(self, name))

    @classmethod
    def load(cls, prefix: str) -> PQCodebook:
        try:
            return cls(*(np.load(f"{prefix}.{n}.npy") for n in cls.PARTS))
        except (OSError, ValueError) as exc:
            raise StoreError(f"{prefix}: cannot read the compression codebook ({exc})") from exc

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """The other side ``[..., D]`` into the coefficients' frame: dot products with decoded coefficients
        (plus mean) are the dot products with the features (Gram matrices are not kept: the axes are whitened)."""
        return x @ torch.from_numpy(self.text_basis).to(x.dtype).T

    def unrotate(self, decoded: torch.Tensor) -> torch.Tensor:
        """Decoded coefficients (plus mean) ``[..., D]`` -> the features themselves."""
        return decoded @ torch.from_numpy(self.text_basis).to(decoded.dtype)

    def packed_bytes(self) -> int:
        return len(self.first)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """``[T, D]`` -> codes ``[T, B]`` uint8: each byte the nearest centroid (weighted) of its axes.

        Each run of bytes with the same number of axes is one FAISS ``ProductQuantizer`` (its sub-quantisers are
        the bytes, in the weighted coordinates), whose ``compute_codes`` finds the nearest of 256 centroids per
        byte in C++ without materialising the ``[T, bytes, 256]`` distances (that took ~30 minutes for a
        10,000-image HAT-base gallery in torch, most of it memory traffic); a one-axis byte with sorted levels (the
        Lloyd-Max quantiser's) is a bisection of the midpoints between its levels.
        """
        import faiss

        z = np.asarray(x, dtype=np.float32) @ self.basis.T - self.mean
        out = np.zeros((len(z), len(self.first)), np.uint8)
        for b0, b1 in _runs(self.dims):  # bytes of one width side by side: one product quantiser
            count, start = int(self.dims[b0]), int(self.first[b0])
            width = count * (b1 - b0)
            levels = self.centroids[b0:b1, :, 0]
            if count == 1 and (np.diff(levels, axis=1) >= 0).all():  # one axis, sorted levels: the nearest by bisection
                edges = (levels[:, 1:] + levels[:, :-1]) / 2
                for j in range(b1 - b0):
                    out[:, b0 + j] = np.searchsorted(edges[j], z[:, start + j])
                continue
            w = self.weight[start : start + width]
            quantizer = faiss.ProductQuantizer(width, b1 - b0, 8)
            centroids = self.centroids[b0:b1, :, :count] * w.reshape(b1 - b0, 1, count)
            faiss.copy_array_to_vector(np.ascontiguousarray(centroids, np.float32).ravel(), quantizer.centroids)
            out[:, b0:b1] = quantizer.compute_codes(np.ascontiguousarray(z[:, start : start + width] * w))
        return out

    def decoder_groups(self) -> list[tuple[np.ndarray, int, int]]:
        """Per run of bytes of one width: (table ``[n_bytes * 256, per]``, n_bytes, components)."""
        groups = []
        for b0, b1 in _runs(self.dims):
            per = int(self.dims[b0])
            start = int(self.first[b0])
            table = self.centroids[b0:b1, :, :per] + self.mean[start : start + per * (b1 - b0)].reshape(
                b1 - b0, 1, per)  # fmt: skip
            groups.append((np.ascontiguousarray(table.reshape(-1, per), np.float32), b1 - b0, per * (b1 - b0)))
        return groups


def _runs(dims: np.ndarray) -> list[tuple[int, int]]:
    """``[b0, b1)`` runs of consecutive bytes with the same number of axes (each run's axes are contiguous)."""
    runs, b0 = [], 0
    for b in range(1, len(dims) + 1):
        if b == len(dims) or dims[b] != dims[b0]:
            runs.append((b0, b))
            b0 = b
    return runs


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 20) -> np.ndarray:
    """Lloyd's k-means of ``x [T, d]`` into ``k`` centres (k-means++ seeding on a sample); an empty cluster
    takes the point farthest from its centre. Fewer distinct points than ``k``: the points, repeated."""
    x = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    n = len(x)
    if n == 0:
        return np.zeros((k, x.shape[1]), np.float32)
    seed_pool = x[torch.from_numpy(rng.choice(n, min(n, 8 * k), replace=False))]
    centres = [seed_pool[int(rng.integers(len(seed_pool)))]]
    nearest = ((seed_pool - centres[0]) ** 2).sum(1)
    for _ in range(1, min(k, len(seed_pool))):
        prob = nearest.double().numpy()
        total = prob.sum()
        if total <= 0:
            break
        pick = int(rng.choice(len(seed_pool), p=prob / total))
        centres.append(seed_pool[pick])
        nearest = torch.minimum(nearest, ((seed_pool - seed_pool[pick]) ** 2).sum(1))
    c = torch.stack(centres)
    for _ in range(iterations):
        dist = (c * c).sum(1)[None] - 2 * x @ c.T
        assign = dist.argmin(1)
        counts = torch.bincount(assign, minlength=len(c)).float()
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        moved = sums / counts.clamp_min(1)[:, None]
        c = torch.where(counts[:, None] > 0, moved, c)
    if len(c) < k:
        c = c[torch.arange(k) % len(c)]
    return c.numpy()


def _scalar_quantizer(z: np.ndarray, width: int, iterations: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd-Max scalar quantiser of ``z`` with ``2**width`` levels -> (edges ``[255]``, levels ``[256]``).

    Starts from uniform buckets over ``[min, max]`` and alternates "level = mean of its bucket" and
    "edge = midpoint of neighbouring levels"; an empty bucket keeps its previous level.
    """
    n = 2**width
    lo, hi = float(z.min()), float(z.max())
    if hi <= lo:
        hi = lo + 1e-6
    levels = lo + (hi - lo) * (np.arange(n) + 0.5) / n
    inner = (levels[1:] + levels[:-1]) / 2
    for _ in range(iterations):
        codes = np.searchsorted(inner, z)
        counts = np.bincount(codes, minlength=n)
        sums = np.bincount(codes, weights=z, minlength=n)
        levels = np.where(counts > 0, sums / np.maximum(counts, 1), levels)
        inner = (levels[1:] + levels[:-1]) / 2
    edges = np.full(255, np.inf)
    edges[: n - 1] = inner
    out = np.zeros(256)
    out[:n] = levels
    return edges, out


def _pack(codes: np.ndarray, nbits: int) -> np.ndarray:
    """``[T, K]`` codes of ``nbits`` each -> ``[T, ceil(K * nbits / 8)]`` bytes, first value in the low bits."""
    per = 8 // nbits
    t, k = codes.shape
    padded = np.zeros((t, -(-k // per) * per), np.uint8)
    padded[:, :k] = codes
    grouped = padded.reshape(t, -1, per)
    out = np.zeros(grouped.shape[:2], np.uint8)
    for i in range(per):
        out |= grouped[:, :, i] << (i * nbits)
    return out


class _Scratch:
    """Scratch buffers of :meth:`PCADecoder.dots`, reused from call to call: a float32 lookup table and an int32
    lookup-index array whose bytes 1-3 already hold each byte's ``256 * j`` (:meth:`PCADecoder._indices`).

    A new multi-megabyte table per call paid its first-touch page faults every time (level 3 of the demo model:
    ~0.45 of ~0.6 ms). A call takes a pair and gives it back, so there are as many pairs as calls ever ran at
    once, not one per thread that ever called (the service's searches run on whichever of anyio's up to 40
    threads is free, so per-thread buffers would multiply by that count). ``list.append`` and ``list.pop`` are
    atomic, so concurrent calls never share a pair."""

    def __init__(self, byte_offsets: np.ndarray) -> None:
        self.byte_offsets = byte_offsets
        self._free: list[tuple[torch.Tensor, np.ndarray]] = []

    @contextmanager
    def take(self, table_size: int, tokens: int) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
        """A pair with at least ``table_size`` floats and ``tokens`` index rows (a free one grown as needed)."""
        try:
            table, indices = self._free.pop()
        except IndexError:
            table, indices = torch.empty(0), np.empty((0, len(self.byte_offsets)), np.int32)
        if table.numel() < table_size:
            table = torch.empty(table_size)
        if len(indices) < tokens:
            indices = np.empty((tokens, len(self.byte_offsets)), np.int32)
            indices[...] = self.byte_offsets
        try:
            yield table, indices
        finally:
            self._free.append((table, indices))


class PCADecoder:
    """Decodes packed codes with one table lookup per byte into rotated-frame features ``[..., D]``.

    Each group of components of one width has a flat table ``[n_bytes * 256, per]``: byte ``j`` of a token
    with value ``v`` decodes to row ``256 * j + v``. ``np.take`` with int32 indices measured ~5x faster than
    torch's advanced indexing for this gather (HAT-base sizes, 100 candidates).
    """

    def __init__(self, book: PCACodebook | PQCodebook) -> None:
        self.groups = []  # (flat table, byte offsets int32, first byte, n_bytes, first dim, components)
        start_byte = start_dim = 0
        for table, n_bytes, count in book.decoder_groups():
            offsets = (np.arange(n_bytes, dtype=np.int32) * 256)[None, :]
            self.groups.append((table, offsets, start_byte, n_bytes, start_dim, count))
            start_byte += n_bytes
            start_dim += count
        self.coded = start_dim
        self.rest = book.mean[start_dim:].astype(np.float32)  # uncoded components decode to their mean
        self.dim = len(book.mean)
        self.n_bytes = start_byte
        self.byte_offsets = np.arange(start_byte, dtype=np.int32) * 256  # byte j's rows of the lookup table
        self._scratch = _Scratch(self.byte_offsets)  # :meth:`dots`' lookup tables and lookup indices

    def lookup_table(self, narrowed: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``[B * 256, N]``: row ``256 * j + v`` holds the dot products of byte ``j``'s decoded value ``v`` (its
        components) with each of the ``N`` vectors ``narrowed [N, C + 1]`` (as :meth:`narrow` gives them);
        written into ``out`` (float32, at least ``B * 256 * N`` elements) when given.

        Each group of bytes writes its rows in place: a batched product per group, or for one-component bytes
        (most bytes of a level with few tokens) a broadcast multiplication, the same products without the
        per-byte matrix-product calls (measured 1.5-2.2x faster on the demo model's three tables, 2026-12-04)."""
        narrowed = narrowed.float()
        n = narrowed.shape[0]
        size = self.n_bytes * 256 * n
        out = torch.empty(size) if out is None else out.view(-1)[:size]
        out = out.view(self.n_bytes * 256, n)
        for table, _, first, n_bytes, dim0, count in self.groups:
            per = table.shape[1]
            values = torch.from_numpy(table).view(n_bytes, 256, per)
            cols = narrowed[:, dim0 : dim0 + count].T
            if count < n_bytes * per:  # a last byte with fewer components than its width: zero the rest
                cols = torch.cat([cols, cols.new_zeros(n_bytes * per - count, n)])
            rows = out[256 * first : 256 * (first + n_bytes)].view(n_bytes, 256, n)
            if per == 1:
                torch.mul(values, cols.reshape(n_bytes, 1, n), out=rows)
            else:
                torch.bmm(values, cols.reshape(n_bytes, per, n), out=rows)
        return out

    def dots(self, source: np.ndarray, index, narrowed: torch.Tensor) -> torch.Tensor:
        """Dot products of the decoded tokens of ``source[index]`` (packed codes ``[rows, ..., B]``, e.g. a
        memory-mapped table) with ``narrowed [N, C + 1]`` without decoding them: ``[len(index), ..., N]`` float32,
        equal to ``self(source[index], coded_only=True) @ narrowed.T`` up to rounding.

        Each byte adds its row of :meth:`lookup_table` (asymmetric distance computation, as product-quantisation
        search does), summed by ``torch.nn.functional.embedding_bag``: ``B`` lookups of ``N`` floats per token
        instead of writing ``C`` decoded floats and multiplying them by ``N`` vectors. The rows are read a tile
        at a time straight into the lookup indices (:meth:`_indices`), so memory stays bounded. The lookup table
        and the indices live in scratch buffers reused from call to call (:class:`_Scratch`).
        """
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        lead = source.shape[1:-1]
        per_row = int(np.prod(lead, dtype=np.int64))
        # every row is written below when there are bytes; zeros only when the constant part is all there is
        out = (torch.empty if self.n_bytes else torch.zeros)(len(index) * per_row, narrowed.shape[0])
        if self.n_bytes:
            rows_per_tile = max(1, INDEX_TILE // (per_row * self.n_bytes))
            tokens = min(len(index), rows_per_tile) * per_row
            with self._scratch.take(self.n_bytes * 256 * narrowed.shape[0], tokens) as (scratch_table, indices):
                table = self.lookup_table(narrowed, scratch_table)
                for start in range(0, len(index), rows_per_tile):
                    rows = index[start : start + rows_per_tile]
                    codes = np.asarray(source[rows]).reshape(len(rows) * per_row, self.n_bytes)
                    first = start * per_row
                    out[first : first + len(codes)] = F.embedding_bag(self._indices(codes, indices), table, mode="sum")
        return out.add_(narrowed[:, self.coded].float()).view(len(index), *lead, narrowed.shape[0])

    def _indices(self, codes: np.ndarray, buffer: np.ndarray) -> torch.Tensor:
        """``codes [T, B]`` uint8 -> int32 ``codes + 256 * j`` (byte ``j``'s rows of the lookup table), written into
        ``buffer`` (a :class:`_Scratch` index buffer of at least ``T`` rows). On a little-endian machine the
        buffer's bytes 1-3 already hold ``256 * j``, so only each index's low byte is written (a strided byte copy:
        measured 2-3x faster than an int32 add)."""
        view = buffer[: len(codes)]
        if LITTLE_ENDIAN:
            view.view(np.uint8).reshape(len(codes), self.n_bytes, 4)[:, :, 0] = codes
        else:
            np.add(codes, self.byte_offsets, out=view)
        return torch.from_numpy(view)

    def __call__(
        self, packed: torch.Tensor | np.ndarray, dtype: torch.dtype = torch.float32, coded_only: bool = False
    ) -> torch.Tensor:
        """``packed [..., B]`` uint8 -> ``[..., D]`` in the codebook's rotated frame.

        ``coded_only``: ``[..., C + 1]`` instead, the ``C`` coded components and a column of ones. Its dot product
        with :meth:`narrow` of a rotated vector equals the full decode's (the uncoded components are the same
        constant for every token), at ``C + 1`` columns instead of ``D``: less to decode and to multiply.
        """
        codes = np.asarray(packed)
        lead = codes.shape[:-1]
        codes = codes.reshape(-1, codes.shape[-1])
        width = self.coded + 1 if coded_only else self.dim
        out = np.empty((len(codes), width), np.float32)
        for table, offsets, first, n_bytes, dim0, count in self.groups:
            index = codes[:, first : first + n_bytes].astype(np.int32) + offsets
            values = np.take(table, index.ravel(), axis=0).reshape(len(codes), -1)
            out[:, dim0 : dim0 + count] = values[:, :count]
        out[:, self.coded :] = 1.0 if coded_only else self.rest
        return torch.from_numpy(out.reshape(*lead, width)).to(dtype)

    def narrow(self, rotated: torch.Tensor) -> torch.Tensor:
        """Rotated features ``[..., D]`` -> ``[..., C + 1]``: the coded components, then the dot product of the
        uncoded ones with their decoded value (the pairing of :meth:`__call__` with ``coded_only``)."""
        rest = torch.from_numpy(self.rest).to(rotated.dtype)
        return torch.cat([rotated[..., : self.coded], (rotated[..., self.coded :] @ rest)[..., None]], dim=-1)


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[T, D]`` -> (int8 codes ``[T, D]``, float16 scales ``[T]``) with ``x ~= codes * scale``."""
    amax = np.abs(x).max(axis=1)
    scale = (np.maximum(amax, 1e-12) / 127.0).astype(np.float16).astype(np.float32)
    scale = np.where(scale == 0, np.float32(1e-7), scale)
    codes = np.clip(np.rint(x / scale[:, None]), -127, 127).astype(np.int8)
    return codes, scale.astype(np.float16)


# --------------------------------------------------------------------------------------------- tables


def _path(directory: Path, name: str, part: str) -> Path:
    return directory / f"{name}.{part}.npy"


def write_table(
    directory: Path, name: str, parts: Sequence[np.ndarray], tail: tuple[int, ...], spec: StoreSpec,
    book: PCACodebook | PQCodebook | None,
) -> None:
    """Write table ``name`` from ``parts`` (each ``[n_i, *tail]``, e.g. ``[n, R, D]`` or ``[T, D]``), streaming.

    Parts are encoded about ``CHUNK_TOKENS`` token rows at a time into pre-allocated ``.npy`` files.
    """
    if spec.coded and book is None:
        raise StoreError(f"table {name}: a {spec.kind} store needs a trained codebook")
    rows = sum(len(p) for p in parts)
    lead = (rows, *tail[:-1])
    d = tail[-1]
    # Coded stores keep each norm in one byte (encode_norms); the float16 and int8 stores keep float32 norms.
    out = {"norms": _open(directory, name, "norms", np.uint8 if spec.coded else np.float32, lead)}
    if spec.coded:
        out["normrange"] = _open(directory, name, "normrange", np.float32, (rows, 2))
    if spec.kind == "float16":
        out["f16"] = _open(directory, name, "f16", np.float16, (*lead, d))
    elif spec.kind == "int8":
        out["i8"] = _open(directory, name, "i8", np.int8, (*lead, d))
        out["scale"] = _open(directory, name, "scale", np.float16, lead)
    else:
        out[spec.kind] = _open(directory, name, spec.kind, np.uint8, (*lead, book.packed_bytes()))
    start = 0
    step = max(1, CHUNK_TOKENS // int(np.prod(tail[:-1], dtype=np.int64)))  # items per chunk
    for part in (p[i : i + step] for p in parts for i in range(0, len(p), step)):
        n = len(part)
        flat = np.ascontiguousarray(np.asarray(part, dtype=np.float32).reshape(-1, d))
        inner = part.shape[1:-1]
        norms = np.linalg.norm(flat, axis=1).reshape(n, -1)
        if not np.isfinite(norms).all():
            raise StoreError(f"table {name}: a token's features are not finite (infinite or NaN norm)")
        if spec.coded:
            codes, out["normrange"][start : start + n] = encode_norms(norms)
            out["norms"][start : start + n] = codes.reshape(n, *inner)
        else:
            out["norms"][start : start + n] = norms.reshape(n, *inner)
        if spec.kind == "float16":
            out["f16"][start : start + n] = flat.astype(np.float16).reshape(n, *inner, d)
        elif spec.kind == "int8":
            codes, scale = quantize_int8(flat)
            out["i8"][start : start + n] = codes.reshape(n, *inner, d)
            out["scale"][start : start + n] = scale.reshape(n, *inner)
        else:
            out[spec.kind][start : start + n] = book.encode(flat).reshape(n, *inner, -1)
        start += n
    for array in out.values():
        array.flush()


NORM_STEPS = 254  # log-spaced steps between an item's smallest and largest non-zero token norm (codes 1..255)


def encode_norms(norms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Token norms ``[n, R]`` (each item's ``R`` tokens of one level) -> one byte each and ``[n, 2]`` float32 ranges.

    Per item the range is the log of its smallest and largest non-zero norm; a norm is coded as one of
    ``NORM_STEPS + 1`` log-spaced values over it (code 0: exactly zero). The norms of an item's tokens vary little
    (coefficient of variation 5-12% per level on the demo model), so the relative error is about 0.1% (at most half
    a step: ``exp(log(max / min) / 508) - 1``), and it enters the i2t score averaged over the item's tokens: far under
    the codes' own error, for 1 byte a token instead of 4 (3 kB of a HAT-base image's 100). Any item's range fits:
    nothing is clamped."""
    norms = np.asarray(norms, np.float64)
    with np.errstate(divide="ignore"):
        logs = np.log(norms)
    positive = norms > 0
    low = np.where(positive, logs, np.inf).min(axis=1)
    high = np.where(positive, logs, -np.inf).max(axis=1)
    low, high = np.where(np.isfinite(low), low, 0.0), np.where(np.isfinite(high), high, 0.0)
    span = np.maximum(high - low, 1e-30)[:, None]
    steps = np.rint((np.where(positive, logs, low[:, None]) - low[:, None]) / span * NORM_STEPS)
    codes = np.where(positive, 1 + np.clip(steps, 0, NORM_STEPS), 0).astype(np.uint8)
    return codes, np.stack([low, high], axis=1).astype(np.float32)


def decode_norms(codes: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """:func:`encode_norms`'s bytes ``[k, ...]`` and ranges ``[k, 2]`` -> float32 norms ``[k, ...]``."""
    codes = np.asarray(codes)
    ranges = np.asarray(ranges, np.float32)
    shape = ranges.shape[:-1] + (1,) * (codes.ndim - ranges.ndim + 1)
    low, high = ranges[..., 0].reshape(shape), ranges[..., 1].reshape(shape)
    values = np.exp(low + (codes.astype(np.float32) - 1) * ((high - low) / NORM_STEPS))
    return np.where(codes > 0, values, 0).astype(np.float32)


def _open(directory: Path, name: str, part: str, dtype, shape: tuple[int, ...]) -> np.ndarray:
    return np.lib.format.open_memmap(_path(directory, name, part), mode="w+", dtype=dtype, shape=shape)


def table_parts(kind: str) -> tuple[str, ...]:
    return {"float16": ("f16", "norms"), "int8": ("i8", "scale", "norms"), "pca": ("pca", "norms"),
            "pq": ("pq", "norms")}[kind]  # fmt: skip


def load_codebook(prefix: str, kind: str) -> PCACodebook | PQCodebook:
    """The codebook saved at ``prefix`` by a ``kind`` store (``pca`` or ``pq``)."""
    return PQCodebook.load(prefix) if kind == "pq" else PCACodebook.load(prefix)


class Table:
    """A memory-mapped feature table; ``rows(index)`` gathers and decodes ``x[index]`` as a float tensor.

    A ``pca`` table decodes into its codebook's rotated frame: rotate the other side of the score with
    ``table.rotate`` (an orthonormal rotation leaves every SCAN score unchanged). Other kinds rotate by identity
    (a ``pq`` table maps its decoded rows back to the features' frame). For i2t scores, ``coded_rows`` and
    ``narrow`` give the same dot products from the coded axes only (with the captions' Gram matrices given
    to the scorer separately).
    """

    def __init__(self, directory: Path, name: str, kind: str, book: PCACodebook | PQCodebook | None = None) -> None:
        self.name, self.kind, self.book = name, kind, book
        self.parts = {}
        for part in table_parts(kind):
            path = _path(directory, name, part)
            try:
                self.parts[part] = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise StoreError(f"{path}: cannot map feature table ({exc})") from exc
        if kind in CODED_KINDS and book is None:
            raise StoreError(f"table {name}: {kind} store without its codebook")
        self.decoder = PCADecoder(book) if kind in CODED_KINDS else None
        ranges = _path(directory, name, "normrange")
        if self.parts["norms"].dtype == np.uint8:  # one-byte norms (coded stores since 2026-12-04) and their ranges
            try:
                self.parts["normrange"] = np.load(ranges, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise StoreError(f"{ranges}: cannot map the norms' ranges ({exc})") from exc
            if self.parts["normrange"].shape != (len(self.parts["norms"]), 2):
                raise StoreError(f"table {name}: norm ranges {self.parts['normrange'].shape} for "
                                 f"{len(self.parts['norms'])} rows")  # fmt: skip
        rows = {p: a.shape[: self.parts["norms"].ndim] for p, a in self.parts.items() if p != "normrange"}
        if len(set(rows.values())) != 1:
            raise StoreError(f"table {name}: parts disagree on the number of rows: {rows}")

    def __len__(self) -> int:
        return self.parts["norms"].shape[0]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.parts.values())

    def norms(self, index) -> torch.Tensor:
        """The tokens' L2 norms ``[k, ...]`` (float32) of ``x[index]``."""
        if "normrange" in self.parts:
            return torch.from_numpy(decode_norms(self.parts["norms"][index], self.parts["normrange"][index]))
        return torch.from_numpy(np.array(self.parts["norms"][index], dtype=np.float32))

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """The other side of the score into the frame :meth:`rows` decodes to: a pca table's rotated axes; the
        features' own frame for the other kinds (a pq table maps its decoded rows back)."""
        return self.book.rotate(x) if self.kind == "pca" else x

    @property
    def narrows(self) -> bool:
        """Whether :meth:`coded_rows` is narrower than the features (a pca table with uncoded components)."""
        return self.decoder is not None and self.decoder.coded + 1 < self.decoder.dim

    def coded_rows(self, index, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``x[index]`` as :meth:`PCADecoder.__call__` with ``coded_only`` gives it: score it against
        :meth:`narrow` of the rotated other side (dot products as the full features', not their Gram matrix)."""
        return self.decoder(np.asarray(self.parts[self.kind][index]), dtype, coded_only=True)

    @property
    def coded(self) -> bool:
        """Whether the table holds codes (pca, pq): :meth:`dots` then scores without decoding."""
        return self.decoder is not None

    def dots(self, index, rotated: torch.Tensor) -> torch.Tensor:
        """Dot products ``[k, ..., N]`` of the tokens of ``x[index]`` (``[k, ...]``) with ``rotated [N, D]`` (the other
        side as :meth:`rotate` gives it), read from the codes without decoding them (:meth:`PCADecoder.dots`)."""
        return self.decoder.dots(self.parts[self.kind], index, self.narrow(rotated))

    def narrow(self, rotated: torch.Tensor) -> torch.Tensor:
        """The other side (as :meth:`rotate` gives it) narrowed to pair with :meth:`coded_rows`."""
        if self.kind == "pq":  # into the whitened axes the codes live in
            rotated = self.book.rotate(rotated)
        return self.decoder.narrow(rotated)

    def rows(self, index, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Gather ``x[index]`` (numpy-style index on the first axis) and decode it to ``dtype``."""
        if self.kind == "float16":
            return torch.from_numpy(np.array(self.parts["f16"][index])).to(dtype)
        if self.kind == "int8":
            codes = torch.from_numpy(np.array(self.parts["i8"][index]))
            scale = torch.from_numpy(np.array(self.parts["scale"][index], dtype=np.float32))
            return (codes.float() * scale[..., None]).to(dtype)
        decoded = self.decoder(np.asarray(self.parts[self.kind][index]), torch.float32)
        if self.kind == "pq":  # whitened axes are not orthonormal: back to the features themselves
            decoded = self.book.unrotate(decoded)
        return decoded.to(dtype)
