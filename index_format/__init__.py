"""The search index on disk, read side: its layout, the feature store's codecs, the reader, its errors.

The builder (``index_builder``, the writer) and the service both use it through this front:

* :func:`open_index` -> :class:`GalleryIndex` (FAISS search, re-rank, metadata).
* :class:`IndexRoot`: the on-disk layout of versions and segments, the build lock and the atomic ``current``.
* :class:`StoreSpec`, :class:`Table`, :class:`PCACodebook`: how token features are stored and decoded
  (``write_table`` and ``train_codebooks`` write them: encoder and decoder of one format live together).
* :func:`compare` / :func:`fingerprint`: which fields of two published indexes differ (``python -m
  index_format compare A B``).
* Metadata filters (:func:`check_filter`, :func:`require_known`, :class:`FilterError`; an index's
  ``filters.rows``) and match strength (:class:`StrengthScale`, an index's ``strength``; :func:`add_strength`
  calibrates a version being written).
* :class:`IndexFormatError` (a bad index), :class:`BuildError` (a write to the root cannot be done).
"""

from .compare import compare, fingerprint
from .errors import BuildError, IndexFormatError
from .filters import FilterError, check_filter, require_known
from .layout import (
    FORMAT_VERSION,
    INDEX_FORMAT,
    SEGMENT_FORMAT,
    IndexRoot,
    close_inherited_locks,
    fsync_tree,
    new_name,
    write_json,
)
from .reader import GalleryIndex, ScoringSpec, open_index
from .store import STORE_KINDS, PCACodebook, StoreError, StoreSpec, Table, train_codebooks, write_table
from .strength import StrengthScale, add_strength

__all__ = [
    "FORMAT_VERSION",
    "INDEX_FORMAT",
    "SEGMENT_FORMAT",
    "STORE_KINDS",
    "BuildError",
    "FilterError",
    "GalleryIndex",
    "IndexFormatError",
    "IndexRoot",
    "PCACodebook",
    "ScoringSpec",
    "StoreError",
    "StoreSpec",
    "StrengthScale",
    "Table",
    "add_strength",
    "check_filter",
    "close_inherited_locks",
    "compare",
    "fingerprint",
    "fsync_tree",
    "new_name",
    "open_index",
    "require_known",
    "train_codebooks",
    "write_json",
    "write_table",
]
