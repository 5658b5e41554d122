"""The search index on disk, read side: its layout, the feature store's codecs, the reader, its errors.

The builder (``index_builder``, the writer) and the service both use it through this front:

* :func:`open_index` -> :class:`GalleryIndex` (FAISS search, re-rank, metadata), or on a sharded root a
  :class:`ShardedIndex` whose ``parts`` are the shards' indexes (``shard_of`` assigns ids to shards).
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

import logging

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
from .sharded import (
    SHARDS_FILE,
    ShardedIndex,
    current_versions,
    describe,
    read_shards,
    shard_dir,
    shard_of,
    shard_version,
)
from .store import (
    DEFAULT_STORE,
    STORE_KINDS,
    PCACodebook,
    PQCodebook,
    StoreError,
    StoreSpec,
    Table,
    load_codebook,
    train_codebooks,
    write_table,
)
from .strength import StrengthScale, add_strength

# FAISS logs its instruction-set probing at INFO when first imported ("Loading faiss with AVX512 support",
# "Could not load library with AVX512 support due to: ..."): noise in the builder's and the service's logs.
# Both reach faiss through this package, whose modules import it inside functions only, after this line.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

__all__ = [
    "DEFAULT_STORE",
    "FORMAT_VERSION",
    "INDEX_FORMAT",
    "SEGMENT_FORMAT",
    "SHARDS_FILE",
    "STORE_KINDS",
    "BuildError",
    "FilterError",
    "GalleryIndex",
    "IndexFormatError",
    "IndexRoot",
    "PCACodebook",
    "PQCodebook",
    "ScoringSpec",
    "ShardedIndex",
    "StoreError",
    "StoreSpec",
    "StrengthScale",
    "Table",
    "add_strength",
    "check_filter",
    "close_inherited_locks",
    "compare",
    "current_versions",
    "describe",
    "fingerprint",
    "fsync_tree",
    "load_codebook",
    "new_name",
    "open_index",
    "read_shards",
    "require_known",
    "shard_dir",
    "shard_of",
    "shard_version",
    "train_codebooks",
    "write_json",
    "write_table",
]
