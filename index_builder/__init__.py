"""Offline index builder: gallery -> FAISS indices of global vectors + cached per-level token features.

Public API (the CLI ``python -m index_builder build|add|remove`` is a thin layer over it):

* :func:`build`, :func:`add`, :func:`remove` with :class:`BuildOptions` -> :class:`BuildResult`.
* :func:`open_index` -> :class:`GalleryIndex` (FAISS search, re-rank, metadata) for readers such as the service.
* :class:`IndexRoot`: the on-disk layout and the atomic ``current`` pointer.
"""

from .build import BuildOptions, BuildResult, add, build, remove
from .errors import BuildError, GalleryError, IndexFormatError
from .layout import IndexRoot
from .reader import GalleryIndex, open_index
from .store import StoreSpec

__all__ = [
    "BuildError",
    "BuildOptions",
    "BuildResult",
    "GalleryError",
    "GalleryIndex",
    "IndexFormatError",
    "IndexRoot",
    "StoreSpec",
    "add",
    "build",
    "open_index",
    "remove",
]
