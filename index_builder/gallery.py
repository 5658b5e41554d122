"""Reading a gallery: a folder of images (recursive) or a JSONL manifest, plus an optional text corpus.

Nothing here decodes images: unreadable files are found (and recorded as skipped) by the encoder.

What counts as an image in a folder is decided by content, not by name: a file whose suffix is one Pillow
reads (``.jpg``, ``.png``, ``.psd``, ``.tga``, ``.dds``, ...) is listed, and its decoding decides (a broken
one is skipped with the decoder's reason); any other file is listed when Pillow recognises an image format
in its header (a cheap check: no pixels are decoded), and otherwise skipped quietly as
:data:`NOT_AN_IMAGE` (counted in the report, not logged one by one: a photo folder holds notes, sidecars and
thumbnail databases). Manifest entries name their files, so every one is tried whatever its suffix.
"""

from __future__ import annotations

import json
import logging
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from .errors import GalleryError

logger = logging.getLogger(__name__)
CAPTION_SUFFIX = ".txt"  # folder mode: "cat.jpg" takes its captions from "cat.txt", one per line
NOT_AN_IMAGE = "not an image (no image format recognised in its content)"
# Object stores a manifest's ``image`` may name by URI, read through pyarrow's file systems (the I/O layer
# Ray Data uses): ``s3://bucket/key`` (``?endpoint_override=host:port&scheme=http`` for S3-compatible servers),
# ``gs://``, ``hdfs://``, ``abfs://``. ``file://`` URIs are local paths and follow the local paths' rules.
OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def uri_scheme(path: str) -> str | None:
    """The lower-cased scheme of ``scheme://...``, else None (a plain path)."""
    match = _URI.match(path)
    return match.group(1).lower() if match else None


def read_object(uri: str) -> bytes:
    """The bytes of an object-store URI (one of ``OBJECT_STORE_SCHEMES``); OSError when it cannot be read."""
    from pyarrow import ArrowException, fs

    try:
        filesystem, path = fs.FileSystem.from_uri(uri)
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except ArrowException as exc:  # ArrowInvalid (a bad URI), ArrowIOError subclasses OSError already
        raise OSError(str(exc)) from exc


def _image_suffixes() -> frozenset[str]:
    """The suffixes of the formats Pillow can open (``.jpg``, ``.png``, ``.psd``, ``.tga``, ...)."""
    from PIL import Image

    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


IMAGE_SUFFIXES = _image_suffixes()


def looks_like_image(path: Path) -> bool:
    """Whether Pillow recognises an image format in the file's header (no pixels are decoded). Any other
    failure (unreadable file, a bomb's header) counts as an image: the decoder then reports it by name."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path):
                return True
    except UnidentifiedImageError:
        return False
    except Exception:
        return True


@dataclass
class Item:
    """One gallery image: a unique id, its file, captions (the text gallery) and free-form metadata."""

    id: str
    path: str
    captions: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)


@dataclass
class Text:
    """One entry of a text-only corpus (searchable by image, belongs to no gallery image)."""

    id: str
    text: str
    metadata: dict = field(default_factory=dict)


@dataclass
class Skipped:
    """An input that was not indexed, and why."""

    source: str
    reason: str
    id: str | None = None

    def to_dict(self) -> dict:
        return {"source": self.source, "id": self.id, "reason": self.reason}


def read_gallery(source: str | Path, allow_outside_root: bool = False) -> tuple[list[Item], list[Skipped]]:
    """A folder (recursive) or a ``.jsonl`` manifest -> (items in a stable order, skipped inputs).

    Every image (and caption side-car) must lie inside the gallery root after symbolic links are followed:
    the folder itself, or the manifest's own folder. Inputs leading elsewhere (``..``, absolute paths,
    links) are skipped with a reason, unless ``allow_outside_root`` (CLI ``--allow-outside-root``) says the
    operator trusts the gallery to point elsewhere. Ids are opaque strings, never joined to a path.
    """
    path = Path(source)
    if path.is_dir():
        return scan_folder(path, allow_outside_root)
    if path.is_file():
        return read_manifest(path, allow_outside_root)
    raise GalleryError(f"gallery {source}: not a folder or a manifest file")


OUTSIDE_FOLDER = "symbolic link leads outside the gallery folder"
LINK_LOOP = "path cannot be resolved (symbolic link loop)"
FOLDER_LINK = "symbolic link to a folder is not followed"
NOT_A_FILE = "not a regular file (a pipe, socket or device)"


def _resolve(path: Path) -> Path | None:
    """``path`` with every symbolic link followed (as far as it exists), or None for a link loop."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # Python 3.11 raises RuntimeError for a loop
        return None


def _walk(folder: Path) -> list[Path]:
    """Every entry under ``folder`` except hidden ones, without descending into linked folders."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [here / d for d in dirnames if (here / d).is_symlink()]
        found += [here / f for f in filenames if not f.startswith(".")]
    return sorted(found)


def scan_folder(folder: Path, allow_outside_root: bool = False) -> tuple[list[Item], list[Skipped]]:
    """Every image file under ``folder``, id = its path relative to the folder (POSIX separators).

    Other files are skipped quietly as :data:`NOT_AN_IMAGE` unless their header is an image's (see the module
    docstring); caption side-car ``.txt`` files are read with their image. Symbolic
    links are followed for files only: a link that leads outside the folder is refused (unless
    ``allow_outside_root``), and a linked folder is never descended into (no loops, no second copy of a
    folder under other ids); both are recorded as skipped.
    """
    root = folder.resolve()
    items, skipped = [], []
    for path in _walk(folder):
        rel = path.relative_to(folder).as_posix()
        suffix = path.suffix.lower()
        link = path.is_symlink()
        real = _resolve(path)
        if real is None:
            skipped.append(Skipped(rel, LINK_LOOP, rel))
            continue
        outside = link and not allow_outside_root and not real.is_relative_to(root)
        if link and real.is_dir():
            skipped.append(Skipped(rel, OUTSIDE_FOLDER if outside else FOLDER_LINK, rel))
            continue
        if suffix == CAPTION_SUFFIX and _has_sibling_image(path):
            continue
        if not allow_outside_root and not real.is_relative_to(root):  # checked before anything reads the file
            skipped.append(Skipped(rel, OUTSIDE_FOLDER, rel))
            continue
        if real.exists() and not real.is_file():  # a FIFO or a device would block or never end
            skipped.append(Skipped(rel, NOT_A_FILE, rel))
            continue
        if suffix not in IMAGE_SUFFIXES and real.exists() and not looks_like_image(real):
            skipped.append(Skipped(rel, NOT_AN_IMAGE, rel))
            continue
        captions = _sidecar_captions(path, None if allow_outside_root else root, skipped, folder)
        items.append(Item(rel, str(real), captions))
    return items, skipped


def _has_sibling_image(caption_file: Path) -> bool:
    """Whether another file has the caption file's stem (``cat.txt`` beside ``cat.jpg``): then it is captions."""
    stem = caption_file.stem
    return any(p.stem == stem and p != caption_file for p in caption_file.parent.iterdir())


def _sidecar_captions(image: Path, root: Path | None, skipped: list[Skipped], folder: Path) -> list[str]:
    """Captions of ``image`` from its side-car file; one leading outside ``root`` (when given) is refused."""
    sidecar = image.with_suffix(CAPTION_SUFFIX)
    if not sidecar.is_file():
        return []
    rel = sidecar.relative_to(folder).as_posix()
    real = _resolve(sidecar)
    if real is None or (root is not None and not real.is_relative_to(root)):
        skipped.append(Skipped(rel, f"caption file: {LINK_LOOP if real is None else OUTSIDE_FOLDER}"))
        return []
    try:
        return [line.strip() for line in real.read_text(errors="replace").splitlines() if line.strip()]
    except OSError as exc:
        logger.warning("%s: cannot read captions (%s)", sidecar, exc)
        return []


def read_manifest(manifest: Path, allow_outside_root: bool = False) -> tuple[list[Item], list[Skipped]]:
    """JSONL lines ``{"id", "image", "captions"?, "metadata"?}``; relative image paths are relative to the file.

    An image path must resolve (symbolic links followed) inside the manifest's own folder, the gallery
    root, unless ``allow_outside_root``; the string is a plain path, never URL-decoded (``%2F`` is three
    characters of a file name). A ``file://`` URI is a local path (URL-decoded, as URIs are) under the same
    rule; an object-store URI (``s3://``, ``gs://``, ... see ``OBJECT_STORE_SCHEMES``) is read when encoding.
    """
    base = manifest.parent
    root = base.resolve()
    items, skipped, seen = [], [], {}
    try:
        lines = manifest.read_text(errors="replace").splitlines()
    except OSError as exc:
        raise GalleryError(f"manifest {manifest}: cannot read ({exc})") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{manifest.name}:{number}"
        try:
            item, image = _manifest_item(json.loads(line), base)
        except (ValueError, TypeError) as exc:
            skipped.append(Skipped(where, f"bad manifest line: {exc}"))
            continue
        if item.id in seen:
            skipped.append(Skipped(where, f"duplicate id {item.id!r} (first at line {seen[item.id]})", item.id))
            continue
        scheme = uri_scheme(image)
        if scheme in OBJECT_STORE_SCHEMES:  # read at encoding time through pyarrow; no local file is touched
            seen[item.id] = number
            items.append(Item(item.id, image, item.captions, item.metadata))
            continue
        if scheme == "file":
            item.path = urllib.parse.unquote(urllib.parse.urlsplit(image).path)
        elif scheme is not None:
            skipped.append(Skipped(where, f"image {image!r}: unsupported URI scheme {scheme!r} (local paths, "
                                          f"file://, {', '.join(s + '://' for s in OBJECT_STORE_SCHEMES)})", item.id))
            continue
        real = _resolve(Path(item.path))
        if real is None:
            skipped.append(Skipped(where, f"image {image!r}: {LINK_LOOP}", item.id))
            continue
        if not allow_outside_root and not real.is_relative_to(root):
            skipped.append(Skipped(where, f"image {image!r} leads outside the gallery root (the manifest's folder "
                                          f"{root}); --allow-outside-root accepts a trusted manifest's paths",
                                   item.id))
            continue
        seen[item.id] = number
        items.append(Item(item.id, str(real), item.captions, item.metadata))
    return items, skipped


def _manifest_item(obj, base: Path) -> tuple[Item, str]:
    """One manifest line -> (item with its image path joined to ``base`` but not resolved, the raw path)."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    item_id, image = obj.get("id"), obj.get("image")
    if not isinstance(item_id, (str, int)) or isinstance(item_id, bool) or str(item_id).strip() == "":
        raise ValueError("'id' must be a non-empty string or integer")
    if not isinstance(image, str) or not image:
        raise ValueError("'image' must be a non-empty path string")
    if "\0" in image:
        raise ValueError("'image' must not contain a NUL character")
    captions = obj.get("captions", [])
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise ValueError("'captions' must be a list of strings")
    metadata = obj.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ValueError("'metadata' must be a JSON object")
    path = base / image  # an absolute ``image`` replaces ``base``
    return Item(str(item_id), str(path), [c.strip() for c in captions if c.strip()], metadata), image


def read_texts(source: str | Path) -> tuple[list[Text], list[Skipped]]:
    """A text-only corpus: JSONL ``{"id", "text", "metadata"?}`` lines, or plain text (one entry per line)."""
    path = Path(source)
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        raise GalleryError(f"text corpus {source}: cannot read ({exc})") from exc
    texts, skipped, seen = [], [], set()
    jsonl = path.suffix.lower() == ".jsonl"
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path.name}:{number}"
        if not jsonl:
            texts.append(Text(f"text:{number}", line.strip()))
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
                raise ValueError("expected an object with a non-empty 'text'")
            text = Text(str(obj.get("id", f"text:{number}")), obj["text"].strip(), obj.get("metadata") or {})
        except ValueError as exc:
            skipped.append(Skipped(where, f"bad text line: {exc}"))
            continue
        if text.id in seen:
            skipped.append(Skipped(where, f"duplicate text id {text.id!r}", text.id))
            continue
        seen.add(text.id)
        texts.append(text)
    return texts, skipped
