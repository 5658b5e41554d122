"""Which torch device to run on: one resolver for the builder, the service and training."""

from __future__ import annotations

import torch

from .errors import HATError


class DeviceError(HATError, ValueError):
    """The requested device is not available on this machine (or is not a device name)."""


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when CUDA is present, else ``cpu``; ``cpu``, ``cuda`` and ``cuda:N`` are returned as
    given. Raises :class:`DeviceError` for a CUDA device on a machine without CUDA, or another name."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not (device == "cuda" or device.startswith("cuda:")):
        raise DeviceError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r}: CUDA is not available on this machine (use cpu or auto)")
    return device
