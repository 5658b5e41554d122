"""Helpers shared by the index builder tests (imported by name: tests/ directories are not packages)."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO / "models" / "demo"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` and which holds no pixel data (a bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


# Every kind of bad or unusual input the builder must survive: name -> expected reason fragment (None = indexed).
BAD_FILES = {
    "bad/corrupt.jpg": "not an image",  # random bytes with an image suffix: reported by name
    "bad/truncated.png": "cannot decode",
    "bad/empty.png": "not an image",
    "bad/notes.jpg": "not an image",  # text with an image suffix
    "bad/bomb.png": "decompression bomb",
    "bad/readme.md": "not an image (no image format recognised",
    "odd/no_suffix_png": None,  # an image by content, whatever its name
    "odd/targa.tga": None,  # formats beyond the common ones, by suffix
    "odd/spider.spi": None,  # a single-image SPIDER file (Pillow refuses seek(0) on it)
    "odd/multipage.tiff": None,
    "odd/cmyk.jpg": None,
    "odd/gray16.png": None,
    "odd/palette_alpha.png": None,
    "odd/rgba.webp": None,
    "odd/exif_rotated.jpg": None,
    "odd/animated.gif": None,
    "odd/plain.bmp": None,
    "odd/plain.tiff": None,
}


def write_bad_files(folder: Path, source_png: Path) -> None:
    rng = np.random.default_rng(0)
    for name in BAD_FILES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
    good = Image.open(source_png).convert("RGB")
    (folder / "bad/corrupt.jpg").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    buf = io.BytesIO()
    good.save(buf, "PNG")
    (folder / "bad/truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "bad/empty.png").write_bytes(b"")
    (folder / "bad/notes.jpg").write_text("this is not a picture\n")
    (folder / "bad/bomb.png").write_bytes(png_header_only(30000, 30000))
    (folder / "bad/readme.md").write_text("# gallery notes\n")
    good.convert("CMYK").save(folder / "odd/cmyk.jpg")
    gray = (np.asarray(good.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(gray).save(folder / "odd/gray16.png")
    pal = good.convert("P", palette=Image.Palette.ADAPTIVE)
    pal.info["transparency"] = 0
    pal.save(folder / "odd/palette_alpha.png", transparency=0)
    rgba = good.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "odd/rgba.webp")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    good.save(folder / "odd/exif_rotated.jpg", exif=exif)
    good.save(folder / "odd/animated.gif", save_all=True, append_images=[good.rotate(90)])
    good.save(folder / "odd/plain.bmp")
    good.save(folder / "odd/plain.tiff")
    good.save(folder / "odd/no_suffix_png", "PNG")
    good.save(folder / "odd/targa.tga")
    good.convert("F").save(folder / "odd/spider.spi", "SPIDER")
    good.save(folder / "odd/multipage.tiff", save_all=True, append_images=[good.rotate(90)])


def run_cli(*args: str, check: bool = True):
    proc = subprocess.run(
        [sys.executable, "-m", "index_builder", *args, "--no-progress"] if args[0] != "remove" else
        [sys.executable, "-m", "index_builder", *args],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"index_builder {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


# ------------------------------------------------------------------ comparing two indexes (crash/resume tests)


def features_by_id(index) -> dict[str, list[np.ndarray]]:
    """Every image's stored per-level token features (decoded to float32), by image id."""
    ids = [m["id"] for m in index.images(range(index.num_images))]
    out = {}
    for row, item_id in enumerate(ids):
        seg, local = index.image_rows[row]
        out[item_id] = [t.rows(np.array([local]))[0].numpy() for t in index.segments[seg].image]
    return out


def search_text(index, model, caption: str, candidates: int = 10) -> list[str]:
    """Text -> image ids, best first: FAISS candidates re-ranked by the full HAT score (as the service does)."""
    import torch

    with torch.inference_mode():
        levels, lengths = model.encode_text_strings([caption])
        _, rows = index.search("images", model.global_texts(levels, lengths).numpy(), candidates)
        scores = index.rerank_images(levels, int(lengths[0]), rows[0])
    order = rows[0][torch.argsort(scores, descending=True).numpy()]
    return [m["id"] for m in index.images(order)]


def assert_same_index(got, want, model, queries: list[str], atol: float = 1e-3) -> None:
    """``got`` holds the same images (ids, metadata), captions, features (within ``atol``) and answers the
    same ``queries`` with the same ranked ids as ``want``."""
    a = {m["id"]: m for m in got.images(range(got.num_images))}
    b = {m["id"]: m for m in want.images(range(want.num_images))}
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())[:10]
    assert all(a[k]["metadata"] == b[k]["metadata"] for k in a)
    ca = {c["id"]: c["text"] for c in got.captions(range(got.num_captions))}
    cb = {c["id"]: c["text"] for c in want.captions(range(want.num_captions))}
    assert ca == cb
    fa, fb = features_by_id(got), features_by_id(want)
    for k in fa:
        for x, y in zip(fa[k], fb[k], strict=True):
            np.testing.assert_allclose(x, y, atol=atol, err_msg=f"features of {k}")
    for query in queries:
        assert search_text(got, model, query) == search_text(want, model, query), query


# ------------------------------------------------------------ a live service searched during a build


class Prober:
    """Searches the service every ``interval`` seconds in the background; records every answer."""

    def __init__(self, url: str, query: str, interval: float = 0.3) -> None:
        self.url, self.query, self.interval = url, query, interval
        self.answers: list[tuple[int, int, str | None]] = []  # (status, results, index version)
        self.failures: list[str] = []
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def probe(self) -> dict:
        r = httpx.post(f"{self.url}/search/text", json={"query": self.query, "k": 5}, timeout=30)
        body = r.json()
        self.answers.append((r.status_code, len(body.get("results", [])), body.get("index_version")))
        if r.status_code != 200 or not body.get("results"):
            self.failures.append(f"{r.status_code}: {r.text[:300]}")
        return body

    def _run(self) -> None:
        while not self.stop_event.wait(self.interval):
            try:
                self.probe()
            except Exception as exc:  # a refused or broken connection is exactly what this test looks for
                self.failures.append(repr(exc))

    def __enter__(self) -> Prober:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.thread.join(timeout=60)


def session_alive(sid: int) -> list[int]:
    """Processes of session ``sid`` still alive (a killed builder's orphaned workers)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive
