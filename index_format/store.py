"""Token feature stores: how the re-ranker's per-level features are kept on disk.

A store holds token rows ``[T, D]`` of one level (an image's ``R_l`` regions or a caption's words, items laid
end to end) in one of three encodings, chosen at build time:

* ``float16``: the features as they are, 2 bytes per value.
* ``int8``: symmetric 8-bit codes with one float16 scale per token (about 2x smaller).
* ``pca[:BITS]``: transform coding. Tokens are rotated into the principal axes of the gallery's features and
  each axis gets 0, 2, 4 or 8 bits (Lloyd-Max buckets) by reverse water-filling, ``BITS`` per dimension on
  average over an item's tokens of all levels. Bits go where a score error would be largest: axes with
  variance along which the other modality's features also have energy, and levels with few tokens (a level
  score averages fewer token errors). The re-ranker rotates the query into the same axes instead of
  decoding back, so decoding is one table lookup per byte. ``pca:2`` is about 7.5x smaller than float16.

Every store also keeps each token's exact L2 norm (float32, computed before compression): the i2t scorer
takes it as ``image_norms`` instead of recomputing it. Stores are plain ``.npy`` files, memory-mapped when read.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

STORE_KINDS = ("float16", "int8", "pca")
CHUNK_TOKENS = 65_536  # token rows converted to float32 at a time when writing a table (bounds memory)


class StoreError(ValueError):
    """A feature store is missing, truncated or inconsistent with its description."""


@dataclass(frozen=True)
class StoreSpec:
    """What ``--store`` asked for: ``float16``, ``int8`` or ``pca[:BITS]`` (average bits per dimension)."""

    kind: str = "float16"
    bits: float = 2.0

    @classmethod
    def parse(cls, text: str) -> StoreSpec:
        kind, _, arg = text.partition(":")
        if kind not in STORE_KINDS:
            raise ValueError(f"unknown feature store {text!r}; choose one of float16, int8, pca[:BITS]")
        if kind != "pca":
            if arg:
                raise ValueError(f"store {kind!r} takes no argument, got {text!r}")
            return cls(kind)
        try:
            bits = float(arg) if arg else 2.0
        except ValueError:
            bits = -1.0
        if not 0.25 <= bits <= 8:
            raise ValueError(f"pca store needs 0.25..8 average bits per dimension, got {text!r}")
        return cls(kind, bits)

    def label(self) -> str:
        return f"pca:{self.bits:g}" if self.kind == "pca" else self.kind


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
    return Axes(vectors[:, order].T.copy(), centre, importance[order], x)


def allocate_bits(importance: Sequence[np.ndarray], tokens: Sequence[float], budget: float) -> list[np.ndarray]:
    """Reverse water-filling over several levels: widths in {0, 2, 4, 8} per component.

    ``importance[l]`` per component of level ``l`` (decreasing), ``tokens[l]`` tokens per item at that level,
    ``budget`` bits per item. A level's score is a mean over about ``tokens[l]`` independent token errors, so
    its squared error is the per-token error over ``tokens[l]``; each bit spent on a component costs
    ``tokens[l]`` bits per item. Greedy: buy the upgrade with the largest error drop per bit, with a
    component of importance v at b bits erring by ``v * 4**-b`` (``v`` at 0 bits).
    """
    nxt = {0: 2, 2: 4, 4: 8}
    widths = [np.zeros(len(v), np.int64) for v in importance]

    def gain(level: int, k: int) -> float:
        b = int(widths[level][k])
        drop = importance[level][k] * ((4.0**-b if b else 1.0) - 4.0 ** -nxt[b]) / tokens[level]
        return drop / ((nxt[b] - b) * tokens[level])

    heap = [(-gain(level, k), level, k) for level, v in enumerate(importance) for k in range(len(v))]
    heapq.heapify(heap)
    spent = 0.0
    while heap:
        _, level, k = heapq.heappop(heap)
        b = int(widths[level][k])
        cost = (nxt[b] - b) * tokens[level]
        if spent + cost > budget:
            continue
        spent += cost
        widths[level][k] = nxt[b]
        if nxt[b] < 8:
            heapq.heappush(heap, (-gain(level, k), level, k))
    # Packing wants widths non-increasing along the (importance-sorted) components; greedy already is.
    return [np.sort(w)[::-1].copy() for w in widths]


def train_codebooks(
    levels: Sequence[np.ndarray], others: Sequence[np.ndarray | None], tokens: Sequence[float], bits: float
) -> list[PCACodebook]:
    """One codebook per level, ``bits`` per dimension on average over an item's tokens of all levels."""
    axes = [principal_axes(x, o) for x, o in zip(levels, others, strict=True)]
    budget = bits * levels[0].shape[1] * sum(tokens)
    widths = allocate_bits([a.importance for a in axes], tokens, budget)
    return [PCACodebook.quantize(a, w) for a, w in zip(axes, widths, strict=True)]


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


class PCADecoder:
    """Decodes packed codes with one table lookup per byte into rotated-frame features ``[..., D]``.

    Each group of components of one width has a flat table ``[n_bytes * 256, per]``: byte ``j`` of a token
    with value ``v`` decodes to row ``256 * j + v``. ``np.take`` with int32 indices measured ~5x faster than
    torch's advanced indexing for this gather (HAT-base sizes, 100 candidates).
    """

    def __init__(self, book: PCACodebook) -> None:
        self.groups = []  # (flat table, byte offsets int32, first byte, n_bytes, first dim, components)
        byte = np.arange(256)
        start_byte = start_dim = 0
        for width in WIDTHS:
            comps = np.flatnonzero(book.widths == width)
            if not comps.size:
                continue
            per = 8 // width
            n_bytes = -(-comps.size // per)
            fields = (byte[:, None] >> (np.arange(per)[None, :] * width)) & (2**width - 1)  # [256, per]
            padded = np.zeros((n_bytes * per, 256), np.float32)
            padded[: comps.size] = book.levels[comps] + book.mean[comps, None]
            per_byte = padded.reshape(n_bytes, per, 256)
            table = np.stack([per_byte[:, i, :][:, fields[:, i]] for i in range(per)], axis=2)  # [n_bytes,256,per]
            offsets = (np.arange(n_bytes, dtype=np.int32) * 256)[None, :]
            self.groups.append(
                (np.ascontiguousarray(table.reshape(n_bytes * 256, per)), offsets, start_byte, n_bytes, start_dim,
                 comps.size)
            )
            start_byte += n_bytes
            start_dim += comps.size
        self.coded = start_dim
        self.rest = book.mean[start_dim:].astype(np.float32)  # uncoded components decode to their mean
        self.dim = len(book.widths)

    def __call__(self, packed: torch.Tensor | np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``packed [..., B]`` uint8 -> ``[..., D]`` in the codebook's rotated frame."""
        codes = np.asarray(packed)
        lead = codes.shape[:-1]
        codes = codes.reshape(-1, codes.shape[-1])
        out = np.empty((len(codes), self.dim), np.float32)
        for table, offsets, first, n_bytes, dim0, count in self.groups:
            index = codes[:, first : first + n_bytes].astype(np.int32) + offsets
            values = np.take(table, index.ravel(), axis=0).reshape(len(codes), -1)
            out[:, dim0 : dim0 + count] = values[:, :count]
        out[:, self.coded :] = self.rest
        return torch.from_numpy(out.reshape(*lead, self.dim)).to(dtype)


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
    book: PCACodebook | None,
) -> None:
    """Write table ``name`` from ``parts`` (each ``[n_i, *tail]``, e.g. ``[n, R, D]`` or ``[T, D]``), streaming.

    Parts are encoded about ``CHUNK_TOKENS`` token rows at a time into pre-allocated ``.npy`` files.
    """
    if spec.kind == "pca" and book is None:
        raise StoreError(f"table {name}: a pca store needs a trained codebook")
    rows = sum(len(p) for p in parts)
    lead = (rows, *tail[:-1])
    d = tail[-1]
    out = {"norms": _open(directory, name, "norms", np.float32, lead)}
    if spec.kind == "float16":
        out["f16"] = _open(directory, name, "f16", np.float16, (*lead, d))
    elif spec.kind == "int8":
        out["i8"] = _open(directory, name, "i8", np.int8, (*lead, d))
        out["scale"] = _open(directory, name, "scale", np.float16, lead)
    else:
        out["pca"] = _open(directory, name, "pca", np.uint8, (*lead, book.packed_bytes()))
    start = 0
    step = max(1, CHUNK_TOKENS // int(np.prod(tail[:-1], dtype=np.int64)))  # items per chunk
    for part in (p[i : i + step] for p in parts for i in range(0, len(p), step)):
        n = len(part)
        flat = np.ascontiguousarray(np.asarray(part, dtype=np.float32).reshape(-1, d))
        inner = part.shape[1:-1]
        out["norms"][start : start + n] = np.linalg.norm(flat, axis=1).reshape(n, *inner)
        if spec.kind == "float16":
            out["f16"][start : start + n] = flat.astype(np.float16).reshape(n, *inner, d)
        elif spec.kind == "int8":
            codes, scale = quantize_int8(flat)
            out["i8"][start : start + n] = codes.reshape(n, *inner, d)
            out["scale"][start : start + n] = scale.reshape(n, *inner)
        else:
            out["pca"][start : start + n] = book.encode(flat).reshape(n, *inner, -1)
        start += n
    for array in out.values():
        array.flush()


def _open(directory: Path, name: str, part: str, dtype, shape: tuple[int, ...]) -> np.ndarray:
    return np.lib.format.open_memmap(_path(directory, name, part), mode="w+", dtype=dtype, shape=shape)


def table_parts(kind: str) -> tuple[str, ...]:
    return {"float16": ("f16", "norms"), "int8": ("i8", "scale", "norms"), "pca": ("pca", "norms")}[kind]


class Table:
    """A memory-mapped feature table; ``rows(index)`` gathers and decodes ``x[index]`` as a float tensor.

    A ``pca`` table decodes into its codebook's rotated frame: rotate the other side of the score with
    ``table.rotate`` (an orthonormal rotation leaves every SCAN score unchanged). Other kinds rotate by identity.
    """

    def __init__(self, directory: Path, name: str, kind: str, book: PCACodebook | None = None) -> None:
        self.name, self.kind, self.book = name, kind, book
        self.parts = {}
        for part in table_parts(kind):
            path = _path(directory, name, part)
            try:
                self.parts[part] = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise StoreError(f"{path}: cannot map feature table ({exc})") from exc
        if kind == "pca" and book is None:
            raise StoreError(f"table {name}: pca store without its codebook")
        self.decoder = PCADecoder(book) if kind == "pca" else None
        rows = {p: a.shape[: self.parts["norms"].ndim] for p, a in self.parts.items()}
        if len(set(rows.values())) != 1:
            raise StoreError(f"table {name}: parts disagree on the number of rows: {rows}")

    def __len__(self) -> int:
        return self.parts["norms"].shape[0]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.parts.values())

    def norms(self, index) -> torch.Tensor:
        return torch.from_numpy(np.array(self.parts["norms"][index], dtype=np.float32))

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return self.book.rotate(x) if self.book is not None else x

    def rows(self, index, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Gather ``x[index]`` (numpy-style index on the first axis) and decode it to ``dtype``."""
        if self.kind == "float16":
            return torch.from_numpy(np.array(self.parts["f16"][index])).to(dtype)
        if self.kind == "int8":
            codes = torch.from_numpy(np.array(self.parts["i8"][index]))
            scale = torch.from_numpy(np.array(self.parts["scale"][index], dtype=np.float32))
            return (codes.float() * scale[..., None]).to(dtype)
        return self.decoder(np.asarray(self.parts["pca"][index]), dtype)
