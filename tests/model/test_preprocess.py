"""Image decoding and preprocessing: every image mode, EXIF rotation, and bad data."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import torch
from decoder_corpus import psd_bytes
from PIL import Image

from model import ImageDecodeError, load_image, load_pixels, preprocess_image
from model.preprocess import to_rgb


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def gradient(width=300, height=200) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def test_output_shape_and_normalisation():
    tensor = preprocess_image(Image.new("RGB", (500, 300), (124, 116, 104)), 224)
    assert tensor.shape == (3, 224, 224) and tensor.dtype == torch.float32
    # ImageNet mean colour maps to ~0 in every channel.
    assert tensor.abs().max() < 0.01
    assert preprocess_image(gradient(), 112).shape == (3, 112, 112)


def test_rgba_is_composited_over_white():
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent red
    assert to_rgb(rgba).getpixel((10, 10)) == (255, 255, 255)
    half = Image.new("RGBA", (64, 64), (0, 0, 0, 128))
    assert to_rgb(half).getpixel((10, 10)) == (127, 127, 127)
    assert to_rgb(Image.new("LA", (8, 8), (0, 0))).getpixel((1, 1)) == (255, 255, 255)


def test_palette_with_transparency():
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((1, 1), 1)
    pal.info["transparency"] = 0
    decoded = load_image(encode(pal))
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.getpixel((1, 1)) == (255, 0, 0)


def test_grayscale_and_cmyk():
    gray = load_image(encode(Image.new("L", (20, 10), 77)))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (77, 77, 77)
    cmyk = load_image(encode(Image.new("CMYK", (20, 10), (0, 255, 255, 0)), "JPEG", quality=100))
    r, g, b = cmyk.getpixel((5, 5))
    assert r > 240 and g < 15 and b < 15  # pure red


def test_sixteen_bit_is_scaled_not_clipped():
    arr = np.full((10, 10), 32896, dtype=np.uint16)  # mid-grey in 16 bits
    image = Image.fromarray(arr)
    assert image.mode.startswith("I;16")
    decoded = load_image(encode(image))
    assert decoded.getpixel((0, 0)) == (128, 128, 128)


def test_exif_rotation_is_applied():
    base = gradient(60, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    tagged = load_image(encode(base, "JPEG", quality=95, exif=exif))
    assert tagged.size == (40, 60)
    plain = load_image(encode(base, "JPEG", quality=95))
    expected = plain.transpose(Image.Transpose.ROTATE_270)
    diff = np.abs(np.asarray(tagged, dtype=int) - np.asarray(expected, dtype=int))
    assert diff.mean() < 2
    raw = load_image(encode(base, "JPEG", quality=95, exif=exif), exif_transpose=False)
    assert raw.size == (60, 40)


def test_gif_first_frame():
    frames = [Image.new("P", (8, 8), i) for i in (1, 2)]
    for f in frames:
        f.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert load_image(buf.getvalue()).getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize(
    ("data", "message", "kind"),
    [
        (b"", "not an image", "not_image"),
        (b"this is text, not pixels", "not an image", "not_image"),
        (encode(gradient())[:200], "cannot decode", "corrupt"),
    ],
)
def test_bad_bytes(data, message, kind):
    with pytest.raises(ImageDecodeError, match=message) as caught:
        load_image(data)
    assert caught.value.kind == kind


@pytest.mark.parametrize(
    ("fmt", "mode", "options"),
    [
        ("TGA", "RGB", {}),
        ("ICO", "RGBA", {}),
        ("SPIDER", "F", {}),  # single-image SPIDER: Pillow refuses seek(0) on it, which load_image used to call
        ("DDS", "RGB", {}),
        ("QOI", "RGB", {}),
        ("SGI", "RGB", {}),
        ("PCX", "RGB", {}),
        ("TIFF", "RGB", {"save_all": True, "append_images": [Image.new("RGB", (60, 40), (0, 0, 255))]}),
        ("MPO", "RGB", {"save_all": True, "append_images": [Image.new("RGB", (60, 40), (0, 0, 255))]}),
        ("PNG", "RGB", {"save_all": True, "append_images": [Image.new("RGB", (60, 40), (0, 0, 255))]}),  # APNG
    ],
)
def test_formats_beyond_the_common_ones_decode_to_their_first_frame(fmt, mode, options):
    base = gradient(60, 40).convert(mode)
    pixels = load_pixels(encode(base, fmt, **options), 32)
    expected = preprocess_image(base, 32)  # the same pixels, never encoded
    assert pixels.shape == (3, 32, 32)
    tolerance = 0.15 if fmt in ("MPO",) else 0.02  # MPO frames are JPEG: lossy
    assert (pixels - expected).abs().mean() < tolerance, fmt


@pytest.mark.parametrize("failure", [SyntaxError("not a TIFF file"), struct.error("unpack requires a buffer")])
def test_a_malformed_exif_block_means_the_image_as_stored(monkeypatch, failure):
    """Pillow's EXIF parser raises on some blocks that viewers show (seen on real photos: a bad TIFF header
    inside EXIF, a truncated DPI entry). Pillow 13 tolerates the blocks we could build, so the parser's
    failure is injected: the image is used as stored, never refused, and EXIF is read once."""
    calls = []

    def broken(image):
        calls.append(image.size)
        raise failure

    monkeypatch.setattr("model.preprocess.ImageOps.exif_transpose", broken)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(gradient(60, 40), "JPEG", quality=95, exif=exif)
    assert load_image(data).size == (60, 40)  # not rotated: the orientation could not be read
    assert load_pixels(data, 32).shape == (3, 32, 32)
    assert len(calls) == 2  # once per decode above: never a second parse inside the transform


def test_unsupported_variant_is_its_own_kind(monkeypatch):
    """A recognised format whose decoder is missing (Pillow raises NotImplementedError, e.g. DDS pixel
    formats it does not implement) is "unsupported", which the service answers with 415."""

    def not_implemented(self):
        raise NotImplementedError("DDS pixel format 0x1234 is not supported")

    data = encode(gradient())
    monkeypatch.setattr(Image.Image, "load", not_implemented)
    with pytest.raises(ImageDecodeError, match="unsupported image variant") as caught:
        load_image(data)
    assert caught.value.kind == "unsupported"


def test_missing_file(tmp_path):
    with pytest.raises(ImageDecodeError, match="file not found"):
        load_image(tmp_path / "nope.png")


def test_decompression_bomb_refused_before_decoding():
    # A 1-bit PNG of 20000 x 20000 pixels compresses to a few KB.
    bomb = encode(Image.new("1", (20000, 20000)))
    assert len(bomb) < 200_000
    message = "decompression bomb: 400000000 pixels, above the limit of 89478485"
    with pytest.raises(ImageDecodeError, match=message) as c:
        load_image(bomb)  # above Pillow's own hard limit: the message names only the configured one
    assert c.value.kind == "too_large" and "178956970" not in str(c.value)
    # 12000 x 12000 is below Pillow's hard limit (179 MP) but above ours.
    with pytest.raises(ImageDecodeError, match="decompression bomb: 12000x12000"):
        load_image(encode(Image.new("1", (12000, 12000))))
    with pytest.raises(ImageDecodeError, match="above the limit of 5000"):
        load_image(encode(gradient(100, 100)), max_pixels=5000)


def test_not_a_pil_image():
    with pytest.raises(ImageDecodeError, match="expected a PIL image"):
        preprocess_image(np.zeros((3, 4, 4)))


def test_psd_uses_its_merged_image():
    """PSD frames are its layers and start at 1: seeking to frame 0 refused every PSD before."""
    data = psd_bytes(6, 4, (200, 10, 30))
    with Image.open(io.BytesIO(data)) as image, pytest.raises(EOFError):
        image.seek(0)  # what load_image used to do
    assert load_image(data).getpixel((0, 0)) == (200, 10, 30)
    assert load_pixels(data, 16).shape == (3, 16, 16)


def test_an_extreme_strip_is_refused_before_its_resize_takes_gigabytes():
    """1 x 40,000 is 40,000 pixels, but the eval transform would resize it to 73 x 2,920,000 for 64-px inputs:
    refused from the header (too_large) when that is over the limit; a normal aspect ratio is not."""
    strip = encode(Image.new("L", (1, 40_000), 128))
    with pytest.raises(ImageDecodeError, match="once resized for the model") as caught:
        load_pixels(strip, 64, max_pixels=1_000_000)
    assert caught.value.kind == "too_large"
    assert load_image(strip, max_pixels=1_000_000).size == (1, 40_000)  # no model size given: decoded
    assert load_pixels(encode(gradient(4000, 30)), 64, max_pixels=1_000_000).shape == (3, 64, 64)
