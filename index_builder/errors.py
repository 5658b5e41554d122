"""Errors of the index builder (``BuildError`` and ``IndexFormatError`` come from the index format)."""

from __future__ import annotations

from index_format import BuildError, IndexFormatError
from model.errors import HATError

__all__ = ["BuildError", "GalleryError", "IndexFormatError"]


class GalleryError(HATError, ValueError):
    """The gallery argument itself is unusable (not a folder or a readable manifest)."""
