"""Reading a gallery: a folder of images (recursive) or a JSONL manifest, plus an optional text corpus.

Nothing here decodes images: unreadable files are found (and recorded as skipped) by the encoder.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from .errors import GalleryError

logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
CAPTION_SUFFIX = ".txt"  # folder mode: "cat.jpg" takes its captions from "cat.txt", one per line


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


def read_gallery(source: str | Path) -> tuple[list[Item], list[Skipped]]:
    """A folder (recursive) or a ``.jsonl`` manifest -> (items in a stable order, skipped inputs)."""
    path = Path(source)
    if path.is_dir():
        return scan_folder(path)
    if path.is_file():
        return read_manifest(path)
    raise GalleryError(f"gallery {source}: not a folder or a manifest file")


def scan_folder(folder: Path) -> tuple[list[Item], list[Skipped]]:
    """Every image file under ``folder``, id = its path relative to the folder (POSIX separators).

    Files with other suffixes are recorded as skipped (caption side-car ``.txt`` files excepted); symbolic
    links that lead outside the folder are refused.
    """
    root = folder.resolve()
    items, skipped = [], []
    for path in sorted(p for p in folder.rglob("*") if not p.is_dir()):
        rel = path.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in Path(rel).parts):
            continue
        suffix = path.suffix.lower()
        if suffix == CAPTION_SUFFIX and any(path.with_suffix(s).exists() for s in _suffix_variants()):
            continue
        if suffix not in IMAGE_SUFFIXES:
            skipped.append(Skipped(rel, f"not an image file type ({suffix or 'no suffix'})", rel))
            continue
        real = path.resolve()
        if not real.is_relative_to(root):
            skipped.append(Skipped(rel, "symbolic link leads outside the gallery folder", rel))
            continue
        items.append(Item(rel, str(real), _sidecar_captions(path)))
    return items, skipped


def _suffix_variants() -> list[str]:
    return sorted(IMAGE_SUFFIXES | {s.upper() for s in IMAGE_SUFFIXES})


def _sidecar_captions(image: Path) -> list[str]:
    sidecar = image.with_suffix(CAPTION_SUFFIX)
    if not sidecar.is_file():
        return []
    try:
        return [line.strip() for line in sidecar.read_text(errors="replace").splitlines() if line.strip()]
    except OSError as exc:
        logger.warning("%s: cannot read captions (%s)", sidecar, exc)
        return []


def read_manifest(manifest: Path) -> tuple[list[Item], list[Skipped]]:
    """JSONL lines ``{"id", "image", "captions"?, "metadata"?}``; relative image paths are relative to the file."""
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
            item = _manifest_item(json.loads(line), manifest.parent)
        except (ValueError, TypeError) as exc:
            skipped.append(Skipped(where, f"bad manifest line: {exc}"))
            continue
        if item.id in seen:
            skipped.append(Skipped(where, f"duplicate id {item.id!r} (first at line {seen[item.id]})", item.id))
            continue
        seen[item.id] = number
        items.append(item)
    return items, skipped


def _manifest_item(obj, base: Path) -> Item:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    item_id, image = obj.get("id"), obj.get("image")
    if not isinstance(item_id, (str, int)) or isinstance(item_id, bool) or str(item_id).strip() == "":
        raise ValueError("'id' must be a non-empty string or integer")
    if not isinstance(image, str) or not image:
        raise ValueError("'image' must be a non-empty path string")
    captions = obj.get("captions", [])
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise ValueError("'captions' must be a list of strings")
    metadata = obj.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ValueError("'metadata' must be a JSON object")
    path = Path(image) if Path(image).is_absolute() else base / image
    return Item(str(item_id), str(path.resolve()), [c.strip() for c in captions if c.strip()], metadata)


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
