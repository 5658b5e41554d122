"""Metadata filters: which gallery rows a filter ``{"key": value | [values]}`` allows.

A filter keeps an item when, for every key, the item's metadata value under that key equals the given value
(a scalar) or one of the given values (a list). An item whose metadata value is a list matches when any of
its elements does (``"tags": ["a", "b"]`` matches ``{"tags": "a"}``). Values compare as JSON values: numbers
by value (``1`` equals ``1.0``), never equal to strings or booleans; ``null`` matches an explicit null only.
Object values and lists nested in lists are never matched (their keys are still known).

:class:`MetadataIndex` builds, the first time a filter names a key, that key's inverted map from the index's
``metadata.sqlite`` (SQLite's JSON functions read the column): every distinct value's rows in one sorted array
(CSR layout), so the rows of a filter then cost the size of the answer, not of the gallery. Captions of gallery
images are filtered by their image's metadata; captions of a text-only corpus (no image) by their own.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

Scalar = str | int | float | bool | None
_ABSENT = object()


class FilterError(ValueError):
    """A filter this index cannot apply: a key that no item has (the message lists the known keys), or a value
    of the wrong shape. ``code`` is the service's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _key(value: Any) -> Any:
    """A metadata or filter value as a hashable key with JSON's equality (``_ABSENT`` for one never matched)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        return _ABSENT if isinstance(value, float) and math.isnan(value) else ("num", value)
    return _ABSENT


def check_filter(raw: Any) -> dict[str, tuple[Scalar, ...]]:
    """``{"key": value | [values]}`` -> ``{key: (values...)}``; raises :class:`FilterError`
    (``invalid_filter``) for anything else: not an object, an empty list, an object or a nested list as a
    value, a value that is not finite."""
    if not isinstance(raw, Mapping):
        raise FilterError("invalid_filter", 'filter must be a JSON object {"key": value or [values]}')
    out = {}
    for key, value in raw.items():
        values = value if isinstance(value, list) else [value]
        if not values:
            raise FilterError("invalid_filter", f"filter.{key}: an empty list matches nothing; give at least one value")
        for item in values:
            if isinstance(item, dict | list):
                kind = "an object" if isinstance(item, dict) else "a nested list"
                raise FilterError(
                    "invalid_filter", f"filter.{key}: values are strings, numbers, booleans or null, not {kind}"
                )
            if _key(item) is _ABSENT:
                raise FilterError("invalid_filter", f"filter.{key}: {item!r} is not a JSON value")
        out[str(key)] = tuple(values)
    return out


class _Postings:
    """One key's values and their rows: ``rows[offsets[c]:offsets[c + 1]]`` (sorted) hold value code ``c``."""

    def __init__(self, pairs: Iterable[tuple[int, Any]]) -> None:
        codes: dict[Any, int] = {}
        code_of, row_of = [], []
        for row, value in pairs:
            if value is not _ABSENT:
                code_of.append(codes.setdefault(value, len(codes)))
                row_of.append(row)
        code = np.asarray(code_of, dtype=np.int64)
        row = np.asarray(row_of, dtype=np.int64)
        order = np.lexsort((row, code))
        self.codes = codes
        self.rows = row[order]
        self.offsets = np.searchsorted(code[order], np.arange(len(codes) + 1))

    def lookup(self, values: Iterable[Scalar]) -> np.ndarray:
        parts = []
        for value in values:
            c = self.codes.get(_key(value))
            if c is not None:
                parts.append(self.rows[self.offsets[c] : self.offsets[c + 1]])
        if len(parts) <= 1:
            return parts[0] if parts else np.zeros(0, np.int64)
        return _unique(np.concatenate(parts))  # a list-valued entry may match two of the values


# SQLite's json_each types -> the value's key (true/false come as 1/0, told apart by the type)
_SQL_TYPES = {
    "text": lambda v: v,
    "integer": lambda v: ("num", v),
    "real": lambda v: _key(float(v)),
    "true": lambda v: ("bool", True),
    "false": lambda v: ("bool", False),
    "null": lambda v: None,
}


class MetadataIndex:
    """Inverted maps of the metadata of one table's rows (``images``, or the text-only ``captions``), built per
    key the first time a filter names it (SQLite's JSON functions read the column; cached for the index's
    life). ``lock`` guards the connection, which other maps may share."""

    def __init__(self, db: sqlite3.Connection, table: str, where: str = "1", lock: threading.RLock | None = None):
        self.db, self.table, self.where = db, table, where
        self.postings: dict[str, _Postings] = {}
        self._keys: list[str] | None = None
        self._lock = lock or threading.RLock()

    @property
    def keys(self) -> list[str]:
        """Every top-level metadata key of the table's rows (one pass over the table, then cached)."""
        with self._lock:
            if self._keys is None:
                self._keys = sorted(
                    k for (k,) in self.db.execute(
                        f"SELECT DISTINCT j.key FROM {self.table} t, json_each(t.metadata) j "
                        f"WHERE {self.where} AND json_valid(t.metadata) AND json_type(t.metadata) = 'object'"
                    )
                )  # fmt: skip
            return self._keys

    def knows(self, key: str) -> bool:
        """Whether some row has ``key`` (stops at the first; cached when the keys were listed)."""
        if self._keys is not None or '"' in key:
            return key in self.keys
        path = _path(key)
        sql = (
            f"SELECT 1 FROM {self.table} t WHERE {self.where} AND json_valid(t.metadata) "
            "AND json_type(t.metadata, ?) IS NOT NULL LIMIT 1"
        )
        with self._lock:
            return self.db.execute(sql, (path,)).fetchone() is not None

    def _postings(self, key: str) -> _Postings:
        with self._lock:
            if key not in self.postings:
                self.postings[key] = _Postings(self._pairs(key))
            return self.postings[key]

    def _pairs(self, key: str):
        """``(row, value key)`` for every scalar under ``key`` (each element of a list)."""
        if '"' in key:  # not expressible as a SQLite JSON path: parse the rows here
            for row, text in self.db.execute(f"SELECT row, metadata FROM {self.table} t WHERE {self.where}"):
                value = json.loads(text).get(key, _ABSENT) if text else _ABSENT
                for item in value if isinstance(value, list) else (value,):
                    yield row, _key(item) if item is not _ABSENT else _ABSENT
            return
        path = _path(key)
        sql = (
            f"SELECT t.row, j.type, j.value FROM {self.table} t, json_each(t.metadata, ?) j WHERE {self.where} "
            "AND json_valid(t.metadata) AND json_type(t.metadata, ?) != 'object' "
            "AND j.type NOT IN ('array', 'object')"
        )
        for row, kind, value in self.db.execute(sql, (path, path)):
            yield row, _SQL_TYPES[kind](value)

    def rows(self, flt: Mapping[str, tuple[Scalar, ...]]) -> np.ndarray:
        """Sorted rows matching every key of ``flt`` (keys no row has match nothing)."""
        out = None
        for key, values in flt.items():
            found = self._postings(key).lookup(values)
            out = found if out is None else _intersect(out, found)
            if not len(out):
                break
        return out if out is not None else np.zeros(0, np.int64)


class GalleryFilters:
    """The filters of one index version: image rows by their metadata, caption rows by their image's metadata
    (a text-only caption by its own). Reads ``metadata.sqlite`` on a read-only connection of its own."""

    def __init__(self, path: Path, num_images: int, num_captions: int) -> None:
        self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        self._lock = threading.RLock()  # one query at a time on the connection
        self.images = MetadataIndex(self.db, "images", lock=self._lock)
        self.texts = MetadataIndex(self.db, "captions", "t.image_id IS NULL", lock=self._lock)
        self.num_images, self.num_captions = num_images, num_captions
        self._owner: np.ndarray | None = None

    @property
    def caption_image(self) -> np.ndarray:
        """``[M]``: each caption row's image row (-1: a text-only caption); read once, on first use."""
        with self._lock:
            if self._owner is None:
                owner = np.full(self.num_captions, -1, np.int64)
                sql = "SELECT c.row, i.row FROM captions c JOIN images i ON i.id = c.image_id"
                linked = np.asarray(self.db.execute(sql).fetchall(), dtype=np.int64).reshape(-1, 2)
                owner[linked[:, 0]] = linked[:, 1]
                self._caption_order = np.argsort(owner, kind="stable")  # caption rows grouped by image row
                self._caption_start = np.searchsorted(owner[self._caption_order], np.arange(self.num_images + 1))
                self._owner = owner
            return self._owner

    def keys(self, kind: str) -> list[str]:
        """The metadata keys a filter of ``kind`` ("images" or "captions") may name (one pass over the rows)."""
        return self.images.keys if kind == "images" else sorted(set(self.images.keys) | set(self.texts.keys))

    def unknown(self, kind: str, flt: Mapping[str, Any]) -> list[str]:
        """The keys of ``flt`` that no row of ``kind`` has."""
        tables = (self.images,) if kind == "images" else (self.images, self.texts)
        return [key for key in flt if not any(table.knows(key) for table in tables)]

    def rows(self, kind: str, flt: Mapping[str, tuple[Scalar, ...]]) -> np.ndarray:
        """Sorted rows of ``kind`` kept by a checked filter (:func:`check_filter`; keys unknown here match
        nothing: check them index-wide with :func:`require_known`)."""
        images = self.images.rows(flt)
        if kind == "images":
            return images
        self.caption_image  # noqa: B018 - reads the caption -> image table on first use
        captions = self._caption_order[_ranges(self._caption_start[images], self._caption_start[images + 1])]
        texts = self.texts.rows(flt) if self.texts.keys else np.zeros(0, np.int64)
        return np.sort(np.concatenate([captions, texts]))  # disjoint: text-only captions have no image

    def close(self) -> None:
        self.db.close()


def _path(key: str) -> str:
    """The SQLite JSON path of a top-level ``key`` (without a double quote)."""
    return f'$."{key}"'


def _unique(x: np.ndarray) -> np.ndarray:
    x = np.sort(x)
    return x[np.concatenate([[True], x[1:] != x[:-1]])] if len(x) else x


def _intersect(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sorted unique ``a`` and ``b`` -> their common elements."""
    if not len(a) or not len(b):
        return np.zeros(0, np.int64)
    at = np.minimum(np.searchsorted(b, a), len(b) - 1)
    return a[b[at] == a]


def require_known(flt: Mapping[str, Any], known: Iterable[str]) -> None:
    """Raises :class:`FilterError` (``unknown_filter_key``) for the first key of ``flt`` not in ``known``, naming
    it and listing the known keys."""
    known = sorted(set(known))
    for key in flt:
        if key not in known:
            raise FilterError(
                "unknown_filter_key",
                f"filter key {key!r} is not a metadata key of this index; known keys: {json.dumps(known)}",
            )


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The positions ``starts[i]:ends[i]`` for every ``i``, concatenated (no Python loop)."""
    lengths = ends - starts
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    shift = starts - np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.repeat(shift, lengths) + np.arange(total)
