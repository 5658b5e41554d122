"""Exceptions raised by the ``model`` package.

Every error names the offending value so that callers (the CLI, the index builder, the service) can show it
to a user as is.
"""

from __future__ import annotations


class HATError(Exception):
    """Base class of all errors raised by the ``model`` package."""


class CheckpointError(HATError):
    """A checkpoint or saved model cannot be read or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint needs full unpickling (arbitrary code execution) and the caller did not opt in."""


class ImageDecodeError(HATError, ValueError):
    """Bytes or a file that cannot be decoded as an image, or an image that is too large to decode."""


class TokenizerError(HATError, ValueError):
    """Text that cannot be tokenised for this model."""
