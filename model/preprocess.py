"""Image decoding and the HAT authors' evaluation transform.

``preprocess_image`` reproduces the authors' eval transform: RGB, Resize(round(S / 0.875)) on the shorter
side (bilinear, PIL), CenterCrop(S), ToTensor, Normalize(ImageNet mean/std); S = 224 gives Resize(256).

Decisions beyond the authors' pipeline (which only calls ``convert("RGB")``), applied by :func:`to_rgb`:

* EXIF orientation is applied (the image is rotated as a viewer shows it), because a user searching a
  photo expects what they see. ``exif_transpose=False`` gives the authors' raw behaviour. A malformed EXIF
  block (Pillow's strict parser raises on some that viewers show) means the image is used as stored: never
  a refusal.
* Transparency (RGBA, LA, palette with transparency) is composited over white, as viewers display it,
  rather than exposing whatever colour the transparent pixels happen to hold.
* 16-bit and 32-bit integer greyscale (``I;16*``, ``I``) are scaled to 8 bits (``convert("RGB")`` would clip
  everything above 255 to white); float images (``F``) are clipped to [0, 255].
* CMYK and every other mode go through Pillow's ``convert("RGB")``.

:func:`load_pixels` is the one decoding boundary of the project: from bytes or a path to the model's pixel
tensor, every exception of the decoding libraries becomes an :class:`ImageDecodeError` with a ``kind``. A file
is an image when Pillow identifies it by its content, whatever its name; multi-frame files (GIF, APNG, TIFF
pages, MPO, PSD layers, SPIDER stacks) use the image Pillow opens them at: the first frame, or for PSD the
merged picture.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageDecodeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Pillow's own decompression-bomb threshold is 89.5 MP (warning) / 179 MP (error); we refuse above this.
DEFAULT_MAX_PIXELS = 89_478_485
logger = logging.getLogger(__name__)


def resize_size(image_size: int) -> int:
    """Shorter-side resize before the centre crop: 256 for 224 (the authors' 0.875 crop ratio)."""
    return round(image_size / 0.875)


def _oriented(image: Image.Image) -> Image.Image:
    """The image rotated as its EXIF orientation says; as stored when the EXIF block cannot be parsed."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # Pillow's EXIF parser raises many kinds on malformed blocks
        logger.debug("EXIF orientation not applied (malformed EXIF: %s: %s)", type(exc).__name__, exc)
        return image


def to_rgb(image: Image.Image, exif_transpose: bool = True) -> Image.Image:
    """Any Pillow image -> an 8-bit RGB image (see the module docstring for the rules)."""
    if exif_transpose:
        image = _oriented(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(image, dtype=np.float64)
        # 16-bit data: 65535 -> 255; 32-bit "I" images that already hold 8-bit values are kept.
        scaled = arr if mode == "I" and arr.max(initial=0) <= 255 else arr / 257.0
        return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")


def load_image(
    source: str | Path | bytes | BinaryIO,
    *,
    exif_transpose: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    resize_for: int | None = None,
    name: str | None = None,
) -> Image.Image:
    """Decode a file path, bytes or file object into an RGB image.

    ``name``: how error messages name the source (default: the path, or "uploaded data").
    ``resize_for``: the model input size the image is decoded for; then an image whose shorter-side resize
    (``resize_size(resize_for)``) would exceed ``max_pixels`` is refused too (a 1 x 4,000,000 strip is within
    any pixel limit, but resized to 256 px high it would take gigabytes).

    Raises:
        ImageDecodeError: unreadable, truncated or non-image data, or more than ``max_pixels`` pixels
            (checked from the header, before the pixels are decoded); ``kind`` says which.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    name = name or (str(source) if isinstance(source, (str, Path)) else "uploaded data")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below replaces Pillow's warning; its hard error (2x) still applies.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:  # the first frame (PSD: the merged picture)
                width, height = image.size
                if width * height > max_pixels:
                    raise _too_large(name, f"{width}x{height} = {width * height} pixels", max_pixels)
                if resize_for and (resized := _resized_pixels(width, height, resize_size(resize_for))) > max_pixels:
                    shape = f"{width}x{height}, {resized} pixels once resized for the model"
                    raise _too_large(name, shape, max_pixels)
                image.load()
                return to_rgb(image, exif_transpose=exif_transpose)
    except ImageDecodeError:
        raise
    except FileNotFoundError as exc:
        raise ImageDecodeError(f"{name}: file not found", "not_found") from exc
    except Image.DecompressionBombError as exc:  # above twice Pillow's own limit: its message has the size
        size = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{size.group(1)} pixels" if size else "more than twice Pillow's own limit"
        raise _too_large(name, pixels, max_pixels) from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(f"{name}: not an image (no image format recognised)", "not_image") from exc
    except NotImplementedError as exc:
        raise ImageDecodeError(f"{name}: unsupported image variant ({exc})", "unsupported") from exc
    except Exception as exc:  # decoders signal broken data with many exception types
        raise ImageDecodeError(f"{name}: cannot decode image ({type(exc).__name__}: {exc})", "corrupt") from exc


def _resized_pixels(width: int, height: int, shorter: int) -> int:
    """Pixels of the image once its shorter side is resized to ``shorter`` (the eval transform's first step)."""
    scale = shorter / max(1, min(width, height))
    return max(1, round(width * scale)) * max(1, round(height * scale))


def _too_large(name: str, size: str, max_pixels: int) -> ImageDecodeError:
    return ImageDecodeError(
        f"{name}: refused as a decompression bomb: {size}, above the limit of {max_pixels} pixels", "too_large"
    )


def load_pixels(
    source: str | Path | bytes | BinaryIO,
    image_size: int = 224,
    *,
    exif_transpose: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> torch.Tensor:
    """Bytes or a path -> the eval transform's ``[3, image_size, image_size]`` float32 tensor: the project's
    one decoding boundary (decode, pixel limit, first frame, EXIF once, RGB, resize, crop, normalise).

    Raises:
        ImageDecodeError: for any failure of the decoding libraries, with its ``kind``.
    """
    from torchvision.transforms import functional as TF

    name = name or (str(source) if isinstance(source, (str, Path)) else "uploaded data")
    image = load_image(source, exif_transpose=exif_transpose, max_pixels=max_pixels, resize_for=image_size, name=name)
    try:
        return normalize(TF.to_tensor(resized_crop(image, image_size)))
    except Exception as exc:  # a decoded image the transform cannot take is a bad image too
        raise ImageDecodeError(f"{name}: cannot transform image ({type(exc).__name__}: {exc})", "corrupt") from exc


def resized_crop(rgb_image: Image.Image, image_size: int) -> Image.Image:
    """The geometric half of the eval transform: shorter side to ``resize_size`` (bilinear), centre crop."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    image = TF.resize(rgb_image, resize_size(image_size), interpolation=InterpolationMode.BILINEAR)
    return TF.center_crop(image, image_size)


def normalize(tensor: torch.Tensor) -> torch.Tensor:
    """``[..., 3, H, W]`` floats in [0, 1] -> ImageNet-normalised (the eval transform's last step)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=tensor.dtype)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=tensor.dtype)[:, None, None]
    return (tensor - mean) / std


def preprocess_image(pil_image: Image.Image, image_size: int = 224, *, exif_transpose: bool = True) -> torch.Tensor:
    """The authors' eval transform: PIL image -> normalised ``[3, image_size, image_size]`` float32 tensor."""
    from torchvision.transforms import functional as TF

    if not isinstance(pil_image, Image.Image):
        raise ImageDecodeError(f"expected a PIL image, got {type(pil_image).__name__}")
    image = resized_crop(to_rgb(pil_image, exif_transpose=exif_transpose), image_size)
    return normalize(TF.to_tensor(image))
