"""Offline index builder: gallery -> FAISS indices of global vectors + cached per-level token features.

Public API (the CLI ``python -m index_builder build|add|remove`` is a thin layer over it):

* :func:`build`, :func:`add`, :func:`remove` with :class:`BuildOptions` -> :class:`BuildResult`.
* :func:`model_info`, :func:`gallery_rows`, :func:`write_manifest`, :func:`write_segment`,
  :func:`write_version`, :func:`train_store`: the steps of a build, for tools that write an index from
  features they made themselves (benchmarks/service_load.py ``prepare-base``).

Reading an index (``open_index``, ``IndexRoot``, ``StoreSpec``, ``compare``) is the index format's job: package
:mod:`index_format`, re-exported here for the builder's users.
"""

from index_format import GalleryIndex, IndexFormatError, IndexRoot, StoreSpec, compare, open_index

from .build import BuildOptions, BuildResult, add, build, gallery_rows, model_info, remove, write_manifest
from .errors import BuildError, GalleryError
from .version import train_store, write_segment, write_version

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
    "compare",
    "gallery_rows",
    "model_info",
    "open_index",
    "remove",
    "train_store",
    "write_manifest",
    "write_segment",
    "write_version",
]
