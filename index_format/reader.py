"""Reading a published index: FAISS candidates, feature gathering and the full HAT re-rank.

``open_index(path)`` accepts an index root (follows ``current``) or one version directory, checks that
everything the service will touch is there and consistent, and raises ``IndexFormatError`` naming the first
problem otherwise. Nothing is loaded into memory but the FAISS indices and the id tables: token features stay
memory-mapped and only the candidates' rows are read.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.alignment import LevelAttention, level_attention, level_similarities, sum_levels

from .errors import IndexFormatError
from .filters import GalleryFilters
from .layout import INDEX_FORMAT, READ_FORMAT_VERSIONS, SEGMENT_FORMAT, IndexRoot
from .selection import search_allowed
from .sharded import ShardedIndex, read_shards, shard_dir
from .store import CODED_KINDS, StoreError, Table, load_codebook
from .strength import StrengthScale


@dataclass
class ScoringSpec:
    """What the re-rank needs from the model: its levels' scoring rule."""

    lambda_softmax: float
    direction: str


class Segment:
    """One segment's memory-mapped tables (``image.l*``, ``caption.l*``) and global vectors."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        try:
            self.info = json.loads((directory / "segment.json").read_text())
        except (OSError, ValueError) as exc:
            raise IndexFormatError(f"segment {directory.name}: cannot read segment.json ({exc})") from exc
        if self.info.get("format") != SEGMENT_FORMAT or self.info.get("format_version") not in READ_FORMAT_VERSIONS:
            raise IndexFormatError(
                f"segment {directory.name}: format {self.info.get('format')!r} version "
                f"{self.info.get('format_version')!r}, this reader needs {SEGMENT_FORMAT!r} "
                f"{' or '.join(map(str, READ_FORMAT_VERSIONS))}"
            )
        kinds, levels = self.info["store_kinds"], self.info["levels"]
        try:
            self.image = [self._table(f"image.l{i + 1}", kinds["image"]) for i in range(levels)]
            self.caption = [self._table(f"caption.l{i + 1}", kinds["caption"]) for i in range(levels)]
            self.offsets = np.load(directory / "caption.offsets.npy")
            self.image_global = np.load(directory / "image.global.npy", mmap_mode="r")
            self.caption_global = np.load(directory / "caption.global.npy", mmap_mode="r")
        except (OSError, ValueError, StoreError) as exc:
            raise IndexFormatError(f"segment {directory.name}: {exc}") from exc
        n, m = self.info["images"], self.info["captions"]
        checks = {
            "image rows": (len(self.image[0]), n),
            "image vectors": (len(self.image_global), n),
            "caption offsets": (len(self.offsets), m + 1),
            "caption vectors": (len(self.caption_global), m),
            "caption tokens": (len(self.caption[0]), int(self.offsets[-1]) if len(self.offsets) else 0),
        }
        for what, (got, want) in checks.items():
            if got != want:
                raise IndexFormatError(f"segment {directory.name}: {what}: found {got}, segment.json says {want}")

    def _table(self, name: str, kind: str) -> Table:
        book = load_codebook(str(self.dir / f"codebook.{name}"), kind) if kind in CODED_KINDS else None
        return Table(self.dir, name, kind, book)


class GalleryIndex:
    """One published version: search by global vector, gather features, re-rank, look up metadata."""

    def __init__(self, directory: Path, gpu: bool = False) -> None:
        import faiss

        self.dir = directory
        manifest = _read_manifest(directory)
        self.manifest = manifest
        self.version = manifest["version"]
        self.model_identity = manifest["model"]["identity"]
        self.scoring = ScoringSpec(manifest["model"]["lambda_softmax"], manifest["model"]["direction"])
        segments_dir = directory.parent.parent / "segments"
        self.segments = [Segment(segments_dir / sid) for sid in manifest["segments"]]
        try:
            self.image_rows = np.load(directory / "image_rows.npy")  # [N, 2]: segment, local row
            self.caption_rows = np.load(directory / "caption_rows.npy")  # [M, 2]
        except (OSError, ValueError) as exc:
            raise IndexFormatError(f"index {directory}: cannot read the row tables ({exc})") from exc
        self.num_images, self.num_captions = len(self.image_rows), len(self.caption_rows)
        counts = manifest["counts"]
        if (self.num_images, self.num_captions) != (counts["images"], counts["captions"]):
            raise IndexFormatError(
                f"index {directory}: row tables hold {self.num_images} images / {self.num_captions} captions, "
                f"manifest says {counts['images']} / {counts['captions']}"
            )
        self.faiss, self.refine = {}, {}
        for kind, count in (("images", self.num_images), ("captions", self.num_captions)):
            path = directory / f"{kind}.faiss"
            if count == 0:
                continue
            info = manifest["faiss"].get(kind) or {}
            try:
                # IVF inverted lists stay on disk, memory-mapped (the page cache holds what searches touch)
                index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
            except RuntimeError as exc:
                reason = str(exc).splitlines()[0]
                raise IndexFormatError(f"index {directory}: cannot read {path.name}: {reason}") from exc
            if index.ntotal != count:
                raise IndexFormatError(f"index {directory}: {path.name} holds {index.ntotal} vectors, expected {count}")
            ivf = faiss.try_extract_index_ivf(index)
            if ivf is not None:
                ivf.nprobe = int(info.get("nprobe", manifest["faiss"]["nprobe"]))
            if info.get("refine"):
                self.refine[kind] = max(1, int(info["refine"]["k_factor"]))
            if gpu and getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
                index = faiss.index_cpu_to_all_gpus(index)  # same results; the file stays a CPU index
            self.faiss[kind] = index
        try:
            uri = f"file:{directory / 'metadata.sqlite'}?mode=ro"
            self.db = sqlite3.connect(uri, uri=True, check_same_thread=False)
            self.db.execute("SELECT count(*) FROM images").fetchone()
            self.filters = GalleryFilters(directory / "metadata.sqlite", self.num_images, self.num_captions)
        except (sqlite3.Error, ValueError) as exc:
            raise IndexFormatError(f"index {directory}: cannot read metadata.sqlite ({exc})") from exc
        self.strength = StrengthScale(manifest.get("strength"), self.num_images, self.num_captions)

    # ------------------------------------------------------------------------------------- first stage

    def search(
        self, kind: str, vectors: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """FAISS inner-product search over ``kind`` ("images" or "captions") -> (scores, rows) ``[B, k]``.

        ``k`` is capped at the gallery size. An approximate (IVF) index can find fewer than ``k``: FAISS pads
        with row -1, which a single query's result drops and a batch keeps (callers filter ``rows >= 0``).
        A compressed index (the manifest's ``refine``) returns ``k_factor · k`` candidates by their PQ scores;
        these are re-scored with the float32 vectors the segments store, and the best ``k`` returned.
        ``allowed`` (sorted rows, e.g. ``filters.rows``) restricts the search to those rows
        (``selection.search_allowed``): the best ``min(k, len(allowed))`` of them.
        """
        index = self.faiss.get(kind)
        q = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if index is None or k <= 0 or (allowed is not None and len(allowed) == 0):
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        k = min(k, index.ntotal if allowed is None else len(allowed))
        factor = self.refine.get(kind)
        if allowed is None:
            scores, rows = index.search(q, min(k * factor, index.ntotal) if factor else k)
        else:
            scores, rows = search_allowed(index, q, k, factor, allowed, lambda r: self.global_vectors(kind, r))
        if factor:
            scores, rows = self._rescore(kind, q, rows, k)
        if len(q) == 1:
            keep = rows[0] >= 0
            return scores[:, keep], rows[:, keep]
        return scores, rows

    def _rescore(self, kind: str, q: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``rescore`` of the candidates ``rows [B, K']`` with their float32 vectors read from the segments."""
        flat = rows.reshape(-1)
        picked = np.flatnonzero(flat >= 0)
        vectors = np.zeros((len(flat), q.shape[1]), np.float32)
        vectors[picked] = self.global_vectors(kind, flat[picked])
        return rescore(q, rows, vectors.reshape(*rows.shape, -1), k)

    def global_vectors(self, kind: str, rows: np.ndarray) -> np.ndarray:
        """The first-stage vectors ``[len(rows), G]`` (float32, as the segments store them) of ``kind`` rows."""
        table = self.image_rows if kind == "images" else self.caption_rows
        out = np.zeros((len(rows), self.faiss[kind].d), np.float32)
        for seg_index, positions, local in self._by_segment(table, rows):
            seg = self.segments[seg_index]
            out[positions.numpy()] = (seg.image_global if kind == "images" else seg.caption_global)[local]
        return out

    # ----------------------------------------------------------------------------------------- re-rank

    def rerank_images(
        self,
        text_levels: list[torch.Tensor],
        length: int,
        rows: np.ndarray,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        per_level: bool = False,
    ) -> torch.Tensor:
        """HAT scores ``[K]`` (CPU float32) of one caption (per level ``[1, L, D]``) against images ``rows [K]``;
        ``per_level=True``: the level scores ``[K, levels]`` that sum (in level order) to those scores.

        The candidates' features are read on the CPU (memory-mapped) and scored on ``device``.
        """
        out = self.image_level_scores(text_levels, torch.tensor([length]), rows, dtype, device)[:, 0]
        return out if per_level else sum_levels(out.unbind(dim=1))

    def image_level_scores(
        self,
        text_levels: list[torch.Tensor],
        lengths: torch.Tensor,
        rows: np.ndarray,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Level scores ``[K, M, levels]`` (CPU float32) of captions (per level ``[M, L, D]``, ``lengths [M]``)
        against images ``rows [K]``."""
        out = torch.empty(len(rows), len(lengths), len(text_levels), dtype=torch.float32)
        width = int(lengths.max())
        lengths = lengths.to(device)
        narrow = self.scoring.direction == "i2t"
        features = self._image_features(text_levels, width, rows, dtype, device, narrow=narrow)
        for positions, images, norms, texts, grams in features:
            dots = [x if t is None else None for x, t in zip(images, texts, strict=True)]
            scores = level_similarities(
                images, texts, lengths, self.scoring.lambda_softmax, self.scoring.direction, image_norms=norms,
                text_grams=grams, image_dots=dots,
            )
            out[positions] = torch.stack([s.cpu() for s in scores], dim=2)
        return out

    def rerank_captions(
        self,
        image_levels: list[torch.Tensor],
        rows: np.ndarray,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        per_level: bool = False,
    ) -> torch.Tensor:
        """HAT scores ``[K]`` (CPU float32) of one image (per level ``[1, R_l, D]``) against captions ``rows [K]``;
        ``per_level=True``: the level scores ``[K, levels]``."""
        out = torch.empty(len(rows), len(image_levels), dtype=torch.float32)
        for positions, images, texts, lengths in self._caption_features(image_levels, rows, dtype, device):
            scores = level_similarities(images, texts, lengths, self.scoring.lambda_softmax, self.scoring.direction)
            out[positions] = torch.stack([s[0].cpu() for s in scores], dim=1)
        return out if per_level else sum_levels(out.unbind(dim=1))

    def explain_images(
        self, text_levels: list[torch.Tensor], length: int, rows: np.ndarray, dtype: torch.dtype = torch.float32
    ) -> list[list[LevelAttention]]:
        """HAT's cross attention (per level) between one caption and each image of ``rows``, from the features
        :meth:`rerank_images` scores with ``dtype`` (read and rotated the same way), on the CPU in float32."""
        out: list = [None] * len(rows)
        for positions, images, norms, texts, _ in self._image_features(text_levels, length, rows, dtype, "cpu"):
            for j, position in enumerate(positions.tolist()):
                out[position] = [
                    self._attention(x[j], t[0, :length], r[j]) for x, t, r in zip(images, texts, norms, strict=True)
                ]
        return out

    def explain_captions(
        self, image_levels: list[torch.Tensor], rows: np.ndarray, dtype: torch.dtype = torch.float32
    ) -> list[list[LevelAttention]]:
        """HAT's cross attention (per level) between one image and each caption of ``rows``, from the features
        :meth:`rerank_captions` scores with ``dtype``."""
        out: list = [None] * len(rows)
        for positions, images, texts, lengths in self._caption_features(image_levels, rows, dtype, "cpu"):
            for j, position in enumerate(positions.tolist()):
                n = int(lengths[j])
                out[position] = [self._attention(x[0], t[j, :n]) for x, t in zip(images, texts, strict=True)]
        return out

    def caption_tokens(self, row: int) -> tuple[list[torch.Tensor], int]:
        """The stored token features of caption ``row``: per level ``[1, n, D]`` float32, and ``n``."""
        ((seg_index, _, local),) = self._by_segment(self.caption_rows, np.array([row]))
        seg = self.segments[seg_index]
        start, end = int(seg.offsets[local[0]]), int(seg.offsets[local[0] + 1])
        return [t.rows(np.arange(start, end))[None] for t in seg.caption], end - start

    def _attention(self, image: torch.Tensor, text: torch.Tensor, norms: torch.Tensor | None = None) -> LevelAttention:
        return level_attention(image, text, self.scoring.lambda_softmax, self.scoring.direction, norms)

    def _image_features(
        self, text_levels, length: int, rows: np.ndarray, dtype: torch.dtype, device, narrow: bool = False
    ):
        """Per segment of the image ``rows``: (their positions in ``rows``, per level image features ``[k, R, D]``
        and norms ``[k, R]`` as stored, the captions' features ``[M, length, D]`` in the store's frame, and per
        level ``None`` or the captions' Gram matrices).

        ``narrow`` (i2t scores only): a level stored as codes (pca, pq) gives, in place of the image features, the
        dot products ``[k, R, M, length]`` of their tokens with the captions' words read from the codes without
        decoding (``Table.dots``), ``None`` for the captions, and the captions' Gram matrices from their full
        features: the same scores (:func:`model.alignment.scan_i2t_dots`) without decoding a single token.
        """
        for seg_index, positions, local in self._by_segment(self.image_rows, rows):
            seg = self.segments[seg_index]
            norms = [t.norms(local).to(device) for t in seg.image]
            images, texts, grams = [], [], []
            for t, x in zip(seg.image, text_levels, strict=True):
                rotated = t.rotate(x[:, :length].float().cpu())
                if narrow and t.coded:
                    words = rotated.shape[0] * rotated.shape[1]
                    dots = t.dots(local, rotated.reshape(words, -1))
                    images.append(dots.view(*dots.shape[:-1], *rotated.shape[:2]).to(device))
                    texts.append(None)
                    grams.append((rotated @ rotated.transpose(1, 2)).to(device))
                else:
                    images.append(t.rows(local, dtype).to(device))
                    texts.append(rotated.to(device=device, dtype=dtype))
                    grams.append(None)
            yield positions, images, norms, texts, grams

    def _caption_features(self, image_levels, rows: np.ndarray, dtype: torch.dtype, device):
        """Per segment of the caption ``rows``: (their positions in ``rows``, the image's features ``[1, R, D]``
        in the store's frame, per level caption features ``[k, L, D]`` as stored, lengths ``[k]``)."""
        for seg_index, positions, local in self._by_segment(self.caption_rows, rows):
            seg = self.segments[seg_index]
            starts, ends = seg.offsets[local], seg.offsets[local + 1]
            lengths = torch.from_numpy(ends - starts)
            width = int(lengths.max())
            # Token rows of each caption, padded by repeating its last token (masked by the lengths).
            take = np.minimum(starts[:, None] + np.arange(width)[None, :], (ends - 1)[:, None])
            texts = [t.rows(take.reshape(-1), dtype).reshape(len(local), width, -1).to(device) for t in seg.caption]
            images = [
                t.rotate(x.float().cpu()).to(device=device, dtype=dtype)
                for t, x in zip(seg.caption, image_levels, strict=True)
            ]
            yield positions, images, texts, lengths.to(device)

    @staticmethod
    def _by_segment(table: np.ndarray, rows: np.ndarray):
        rows = np.asarray(rows, dtype=np.int64)
        where = table[rows]
        for seg_index in np.unique(where[:, 0]):
            positions = np.flatnonzero(where[:, 0] == seg_index)
            yield int(seg_index), torch.from_numpy(positions), where[positions, 1]

    # ---------------------------------------------------------------------------------------- metadata

    def images(self, rows) -> list[dict]:
        """``[{"row", "id", "path", "metadata"}]`` for image rows, in the order given."""
        return self._lookup("SELECT row, id, path, metadata FROM images WHERE row IN ({})", rows, _image_dict)

    def captions(self, rows) -> list[dict]:
        """``[{"row", "id", "image_id", "text", "metadata"}]`` for caption rows, in the order given."""
        return self._lookup(
            "SELECT row, id, image_id, text, metadata FROM captions WHERE row IN ({})", rows, _caption_dict
        )

    def image_by_id(self, image_id: str) -> dict | None:
        row = self.db.execute("SELECT row, id, path, metadata FROM images WHERE id = ?", (image_id,)).fetchone()
        return _image_dict(row) if row else None

    def _lookup(self, sql: str, rows, convert) -> list[dict]:
        rows = [int(r) for r in rows]
        if not rows:
            return []
        found = {r[0]: convert(r) for r in self.db.execute(sql.format(",".join("?" * len(rows))), rows)}
        return [found[r] for r in rows]

    def close(self) -> None:
        self.db.close()
        self.filters.close()


def rescore(q: np.ndarray, rows: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of candidates ``rows [B, K']`` (-1: none) by exact inner product of their ``vectors
    [B, K', G]`` with the queries ``q [B, G]`` -> (scores, rows) ``[B, k]``, best first; ties keep the
    candidates' order; a missing candidate stays row -1 with score -FLT_MAX (as FAISS pads)."""
    exact = np.einsum("bkd,bd->bk", vectors, q).astype(np.float32)
    exact[rows < 0] = np.finfo(np.float32).min
    order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(exact, order, axis=1), np.take_along_axis(rows, order, axis=1)


def _image_dict(r) -> dict:
    return {"row": r[0], "id": r[1], "path": r[2], "metadata": json.loads(r[3]) if r[3] else {}}


def _caption_dict(r) -> dict:
    return {"row": r[0], "id": r[1], "image_id": r[2], "text": r[3], "metadata": json.loads(r[4]) if r[4] else {}}


def _read_manifest(directory: Path) -> dict:
    path = directory / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise IndexFormatError(f"{directory}: no manifest.json (not an index version)") from exc
    except (OSError, ValueError) as exc:
        raise IndexFormatError(f"{path}: unreadable manifest ({exc})") from exc
    if manifest.get("format") != INDEX_FORMAT:
        raise IndexFormatError(f"{path}: format {manifest.get('format')!r} is not {INDEX_FORMAT!r}")
    if manifest.get("format_version") not in READ_FORMAT_VERSIONS:
        raise IndexFormatError(
            f"{path}: format version {manifest.get('format_version')!r}; this build reads versions "
            f"{', '.join(map(str, READ_FORMAT_VERSIONS))}"
        )
    for key in ("version", "model", "counts", "segments", "faiss"):
        if key not in manifest:
            raise IndexFormatError(f"{path}: manifest lacks {key!r}")
    return manifest


def open_index(
    path: str | Path, expect_identity: str | None = None, gpu: bool = False
) -> GalleryIndex | ShardedIndex:
    """Open an index root (its ``current`` version), a version directory, or a sharded root (every shard's
    ``current``, as one :class:`ShardedIndex` whose ``parts`` are the shards' indexes).

    ``gpu=True`` moves the FAISS indices to the GPUs when FAISS was built with GPU support (faiss-gpu).

    Raises:
        IndexFormatError: nothing published, missing/truncated/inconsistent files, another format version,
            or (with ``expect_identity``) an index built by a different model.
    """
    path = Path(path)
    shards = read_shards(path)
    if shards is not None:
        return _open_sharded(path, shards, expect_identity, gpu)
    root = IndexRoot(path)
    if (path / "versions").is_dir() or root.current.is_symlink():
        current = root.current_dir()
        if current is None:
            raise IndexFormatError(f"{path}: no index published yet (no 'current' pointer)")
        path = current
    if not path.is_dir():
        raise IndexFormatError(f"{path}: no such index directory")
    index = GalleryIndex(path, gpu=gpu)
    if expect_identity is not None and index.model_identity != expect_identity:
        index.close()
        raise IndexFormatError(
            f"{path}: built by model {index.model_identity[:12]}…, but the loaded model is {expect_identity[:12]}…; "
            "rebuild the index with this model or load the model it was built with"
        )
    return index


def _open_sharded(root: Path, shards: int, expect_identity: str | None, gpu: bool) -> ShardedIndex:
    parts: list[GalleryIndex] = []
    try:
        for i in range(shards):
            directory = shard_dir(root, i)
            try:
                parts.append(open_index(directory, expect_identity, gpu))  # type: ignore[arg-type]
            except IndexFormatError as exc:
                raise IndexFormatError(f"shard {i:02d} of {root}: {exc}") from exc
        return ShardedIndex(root, parts)
    except BaseException:
        for part in parts:
            part.close()
        raise
