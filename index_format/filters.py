"""Metadata filters: which gallery rows a filter ``{"key": value | [values]}`` allows, from inverted maps built
when an index is opened.

A filter keeps an item when, for every key, the item's metadata value under that key equals the given value
(a scalar) or one of the given values (a list). An item whose metadata value is a list matches when any of
its elements does (``"tags": ["a", "b"]`` matches ``{"tags": "a"}``). Values compare as JSON values: numbers
by value (``1`` equals ``1.0``), never equal to strings or booleans; ``null`` matches an explicit null only.
Object values and lists nested in lists are never matched (their keys are still known).

:class:`MetadataIndex` holds, for each key, every distinct value's rows in one sorted array (CSR layout), so
the rows of a filter cost the size of the answer, not of the gallery. Captions of gallery images are
filtered by their image's metadata; captions of a text-only corpus (no image) by their own.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterable, Mapping
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

    def __init__(self, codes: dict[Any, int], pairs_code: list[int], pairs_row: list[int]) -> None:
        code = np.asarray(pairs_code, dtype=np.int64)
        row = np.asarray(pairs_row, dtype=np.int64)
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
        if not parts:
            return np.zeros(0, np.int64)
        return parts[0] if len(parts) == 1 else np.unique(np.concatenate(parts))


class MetadataIndex:
    """Inverted maps of one kind of rows: for every metadata key, every value's rows."""

    def __init__(self, entries: Iterable[tuple[int, str | None]]) -> None:
        """``entries``: ``(row, metadata JSON text)`` pairs."""
        codes: dict[str, dict[Any, int]] = {}
        pairs: dict[str, tuple[list[int], list[int]]] = {}
        for row, text in entries:
            if not text or text == "{}":
                continue
            metadata = json.loads(text)
            if not isinstance(metadata, dict):
                continue
            for key, value in metadata.items():
                key_codes = codes.setdefault(key, {})
                key_rows, key_pairs = pairs.setdefault(key, ([], []))
                for item in value if isinstance(value, list) else (value,):
                    k = _key(item)
                    if k is _ABSENT:
                        continue
                    key_rows.append(key_codes.setdefault(k, len(key_codes)))
                    key_pairs.append(row)
        self.postings = {key: _Postings(codes[key], *pairs[key]) for key in codes}

    @property
    def keys(self) -> list[str]:
        return sorted(self.postings)

    def rows(self, flt: Mapping[str, tuple[Scalar, ...]]) -> np.ndarray:
        """Sorted rows matching every key of ``flt`` (keys this map lacks match nothing)."""
        out = None
        for key, values in flt.items():
            postings = self.postings.get(key)
            found = postings.lookup(values) if postings is not None else np.zeros(0, np.int64)
            out = found if out is None else np.intersect1d(out, found, assume_unique=True)
            if not len(out):
                break
        return out if out is not None else np.zeros(0, np.int64)


class GalleryFilters:
    """The filters of one index version: image rows by their metadata, caption rows by their image's metadata
    (a text-only caption by its own)."""

    def __init__(self, db: sqlite3.Connection, num_images: int, num_captions: int) -> None:
        self.images = MetadataIndex(db.execute("SELECT row, metadata FROM images"))
        self.texts = MetadataIndex(db.execute("SELECT row, metadata FROM captions WHERE image_id IS NULL"))
        owner = np.full(num_captions, -1, np.int64)  # caption row -> its image's row (-1: a text-only caption)
        linked = db.execute("SELECT c.row, i.row FROM captions c JOIN images i ON i.id = c.image_id").fetchall()
        if linked:
            pairs = np.asarray(linked, dtype=np.int64)
            owner[pairs[:, 0]] = pairs[:, 1]
        self.caption_image = owner
        self._caption_order = np.argsort(owner, kind="stable")  # caption rows grouped by image row
        self._caption_start = np.searchsorted(owner[self._caption_order], np.arange(num_images + 1))
        self.num_images, self.num_captions = num_images, num_captions

    def keys(self, kind: str) -> list[str]:
        """The metadata keys a filter of ``kind`` ("images" or "captions") may name."""
        return self.images.keys if kind == "images" else sorted(set(self.images.keys) | set(self.texts.keys))

    def rows(self, kind: str, flt: Mapping[str, tuple[Scalar, ...]]) -> np.ndarray:
        """Sorted rows of ``kind`` kept by a checked filter (:func:`check_filter`; keys unknown here match
        nothing: check them index-wide with :func:`require_known`)."""
        images = self.images.rows(flt)
        if kind == "images":
            return images
        captions = self._caption_order[_ranges(self._caption_start[images], self._caption_start[images + 1])]
        return np.union1d(captions, self.texts.rows(flt))


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
