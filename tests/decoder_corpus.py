"""A corpus of image files for fuzzing the decoders, made at test time from a seed (never committed).

``make_corpus(folder, n, seed)`` writes ``n`` files: images in every format Pillow can write here, in several
modes and sizes, with EXIF, ICC and XMP blocks, animated and multi-page; then a share of them mutated the ways
real files break (truncated, header bytes flipped, dimensions overwritten, EXIF/ICC payloads corrupted,
garbage appended, emptied), plus non-image files, under right, wrong or no suffixes. Returns what it wrote:
``{relative name: how it was made}``.
"""

from __future__ import annotations

import io
import random
import struct
from pathlib import Path

from PIL import Image

# (format, suffix, modes it writes, save options): the formats Pillow 13 writes without extra libraries.
FORMATS = [
    ("PNG", ".png", ("RGB", "RGBA", "L", "P", "I;16", "1"), {}),
    ("JPEG", ".jpg", ("RGB", "L", "CMYK"), {"quality": 85}),
    ("GIF", ".gif", ("P", "L", "RGB"), {}),
    ("BMP", ".bmp", ("RGB", "L", "P", "1"), {}),
    ("TIFF", ".tif", ("RGB", "RGBA", "L", "CMYK", "I;16", "F", "1"), {}),
    ("WEBP", ".webp", ("RGB", "RGBA"), {"quality": 80}),
    ("TGA", ".tga", ("RGB", "RGBA", "L", "P"), {}),
    ("ICO", ".ico", ("RGBA", "RGB"), {}),
    ("SPIDER", ".spi", ("F", "L"), {}),
    ("PPM", ".ppm", ("RGB", "L", "1"), {}),
    ("PCX", ".pcx", ("RGB", "L", "P", "1"), {}),
    ("SGI", ".sgi", ("RGB", "RGBA", "L"), {}),
    ("DDS", ".dds", ("RGB", "RGBA"), {}),
    ("QOI", ".qoi", ("RGB", "RGBA"), {}),
    ("XBM", ".xbm", ("1",), {}),
    ("MSP", ".msp", ("1",), {}),
    ("JPEG2000", ".jp2", ("RGB", "L"), {}),
    ("PDF", ".pdf", ("RGB",), {}),  # Pillow writes PDF but does not read it: not an image to the decoder
    ("EPS", ".eps", ("RGB",), {}),  # needs Ghostscript to write: skipped where it is missing
]
MULTI_FRAME = [("GIF", ".gif"), ("PNG", ".png"), ("TIFF", ".tif"), ("WEBP", ".webp"), ("MPO", ".mpo")]
MUTATIONS = ("truncate", "flip_header", "absurd_size", "bad_exif", "bad_icc", "append_garbage", "empty", "zero_tail")


def _picture(rng: random.Random) -> Image.Image:
    width, height = rng.choice([(1, 1), (3, 17), (40, 30), (97, 64), (160, 120)])
    image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(4):  # a few rectangles, so that formats have something to compress
        x0, y0 = rng.randrange(width), rng.randrange(height)
        box = (x0, y0, rng.randrange(x0, width + 1), rng.randrange(y0, height + 1))
        image.paste(tuple(rng.randrange(256) for _ in range(3)), box)
    return image


def _encode(image: Image.Image, fmt: str, mode: str, options: dict, rng: random.Random) -> bytes | None:
    """The image in ``fmt``/``mode``, with metadata blocks where the format takes them; None if not writable."""
    options = dict(options)
    if fmt in ("JPEG", "WEBP", "PNG", "TIFF") and rng.random() < 0.5:
        exif = Image.Exif()
        exif[0x0112] = rng.choice([1, 3, 6, 8])  # orientation
        exif[0x010F] = "fuzz camera"
        options["exif"] = exif.tobytes()
    if fmt in ("JPEG", "PNG", "WEBP", "TIFF") and rng.random() < 0.3:
        options["icc_profile"] = b"\x00\x00\x02\x0cfake icc profile" + bytes(rng.randrange(256) for _ in range(64))
    if fmt == "JPEG" and rng.random() < 0.2:
        options["xmp"] = b"<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF/></x:xmpmeta>"
    converted = image.convert(mode) if mode not in ("I;16", "F") else image.convert("L").convert(mode)
    buf = io.BytesIO()
    try:
        converted.save(buf, fmt, **options)
    except (OSError, ValueError, KeyError, TypeError):  # a mode or option this format does not write
        return None
    return buf.getvalue()


def psd_bytes(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A minimal Photoshop file: RGB, 8 bits, no layers, raw merged image data (Pillow reads PSD, never writes)."""
    header = b"8BPS" + struct.pack(">H", 1) + bytes(6) + struct.pack(">HIIHH", 3, height, width, 8, 3)
    sections = struct.pack(">III", 0, 0, 0) + struct.pack(">H", 0)  # colour data, resources, layers; raw data
    return header + sections + b"".join(bytes([v]) * (width * height) for v in rgb)


def _multi_frame(image: Image.Image, fmt: str) -> bytes | None:
    frames = [image.rotate(90 * i) for i in range(1, 3)]
    buf = io.BytesIO()
    try:
        image.save(buf, fmt, save_all=True, append_images=frames)
    except (OSError, ValueError, KeyError):
        return None
    return buf.getvalue()


def _mutate(data: bytes, how: str, rng: random.Random) -> bytes:
    if how == "truncate":
        return data[: rng.randrange(0, max(1, len(data)))]
    if how == "flip_header":
        out = bytearray(data)
        for _ in range(rng.randrange(1, 6)):
            if out:
                out[rng.randrange(min(64, len(out)))] ^= 1 << rng.randrange(8)
        return bytes(out)
    if how == "absurd_size":  # overwrite the likely width/height words with large values
        out = bytearray(data)
        at = rng.randrange(min(32, max(1, len(out) - 4)))
        out[at : at + 4] = struct.pack(">I", rng.choice([0, 1, 65535, 46341, 2**31 - 1, 2**32 - 1]))
        return bytes(out)
    if how == "bad_exif":  # an APP1 EXIF segment with a broken TIFF header, right after a JPEG's SOI
        payload = b"Exif\x00\x00" + rng.choice([b"ZZ\x00*", b"II*\x00\xff\xff\xff\x7f", b"MM\x00*\x00\x00\x00\x08"])
        payload += bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
        segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
        return data[:2] + segment + data[2:] if data[:2] == b"\xff\xd8" else data + segment
    if how == "bad_icc":  # an APP2 ICC segment of garbage
        payload = b"ICC_PROFILE\x00\x01\x01" + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        segment = b"\xff\xe2" + struct.pack(">H", len(payload) + 2) + payload
        return data[:2] + segment + data[2:] if data[:2] == b"\xff\xd8" else segment + data
    if how == "append_garbage":
        return data + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 2000)))
    if how == "empty":
        return b""
    if how == "zero_tail":  # the second half zeroed: a header that promises pixels that are not there
        half = len(data) // 2
        return data[:half] + bytes(len(data) - half)
    raise ValueError(how)


def _non_image(rng: random.Random) -> tuple[bytes, str]:
    kind = rng.choice(["text", "json", "random", "zip", "html"])
    if kind == "text":
        return b"notes about the holiday photos\n" * rng.randrange(1, 5), ".txt_notes"
    if kind == "json":
        return b'{"album": "summer", "count": 12}', ".json"
    if kind == "zip":
        return b"PK\x03\x04" + bytes(rng.randrange(256) for _ in range(100)), ".zip"
    if kind == "html":
        return b"<html><body><img src='a.jpg'></body></html>", ".html"
    return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000))), ".bin"


def make_corpus(folder: Path, n: int, seed: int = 0) -> dict[str, str]:
    """Write ``n`` files under ``folder``; returns ``{relative name: description}``."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, str] = {}
    while len(made) < n:
        i = len(made)
        roll = rng.random()
        if roll < 0.08:
            data, suffix = _non_image(rng)
            how = "non-image file"
        else:
            image = _picture(rng)
            if roll < 0.12:
                rgb = tuple(rng.randrange(256) for _ in range(3))
                data, how, suffix = psd_bytes(*image.size, rgb), "PSD RGB", ".psd"
            elif roll < 0.2:
                fmt, suffix = rng.choice(MULTI_FRAME)
                data, how = _multi_frame(image, fmt), f"{fmt} multi-frame"
            else:
                fmt, suffix, modes, options = rng.choice(FORMATS)
                mode = rng.choice(modes)
                data, how = _encode(image, fmt, mode, options, rng), f"{fmt} {mode}"
            if data is None:
                continue
            if rng.random() < 0.45:
                mutation = rng.choice(MUTATIONS)
                data, how = _mutate(data, mutation, rng), f"{how}, {mutation}"
        name_roll = rng.random()
        if name_roll < 0.1:
            suffix = rng.choice([".jpg", ".png", ".gif"])  # a wrong image suffix
            how += ", wrong suffix"
        elif name_roll < 0.2:
            suffix = ""
            how += ", no suffix"
        name = f"f{i:05d}{suffix}"
        (folder / name).write_bytes(data)
        made[name] = how
    return made
