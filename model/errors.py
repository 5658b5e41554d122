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
    """Bytes or a file that cannot be decoded as an image, or an image that is too large to decode.

    ``kind`` says why, for callers that answer differently (the service's status codes):
    ``not_image`` (no image format recognised), ``unsupported`` (a recognised format or variant the decoders
    cannot read), ``corrupt`` (recognised but broken or truncated), ``too_large`` (above the pixel limit),
    ``not_found`` (no such file).
    """

    KINDS = ("not_image", "unsupported", "corrupt", "too_large", "not_found")

    def __init__(self, message: str, kind: str = "corrupt") -> None:
        if kind not in self.KINDS:
            raise ValueError(f"ImageDecodeError kind must be one of {self.KINDS}, got {kind!r}")
        super().__init__(message)
        self.kind = kind


class TokenizerError(HATError, ValueError):
    """Text that cannot be tokenised for this model."""
