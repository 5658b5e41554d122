"""Errors of the index format: reading an index, and writing to its root."""

from __future__ import annotations

from model.errors import HATError


class IndexFormatError(HATError, ValueError):
    """An index directory is missing, incomplete, of another format version, or inconsistent."""


class BuildError(HATError, RuntimeError):
    """A build cannot go on: nothing to index, the output cannot be written, or another build holds the lock."""
