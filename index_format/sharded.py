"""A sharded index root: S ordinary index roots under ``ROOT/shards/NN/`` and a small description.

```
ROOT/
  shards.json            {"format": "hat-search-shards", "format_version": 1, "shards": S, "assignment": ...}
  shards/00/             an ordinary index root (current, versions, segments): servable on its own
  shards/01/ ...
```

Every image (with its captions) and every text-only caption belongs to the shard ``shard_of(id, S)``: a
stable hash of the id, the same on every machine and in every Python process, so ``add`` and ``remove`` find
the shard that holds an id without reading the others. Search engines scale the same way: each shard runs
both stages on its slice, and a front merges by score (``service.search``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import IndexFormatError
from .layout import IndexRoot

SHARDS_FILE = "shards.json"
SHARDS_FORMAT = "hat-search-shards"
SHARDS_FORMAT_VERSION = 1
ASSIGNMENT = "sha256(utf-8 id)[:8] big-endian mod shards"


def shard_of(item_id: str, shards: int) -> int:
    """The shard of ``item_id`` among ``shards`` (see ``ASSIGNMENT``)."""
    digest = hashlib.sha256(item_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % shards


def shard_dir(root: str | Path, shard: int) -> Path:
    return Path(root) / "shards" / f"{shard:02d}"


def describe(shards: int) -> dict:
    """The body of ``shards.json`` for ``shards`` shards."""
    return {
        "format": SHARDS_FORMAT,
        "format_version": SHARDS_FORMAT_VERSION,
        "shards": shards,
        "assignment": ASSIGNMENT,
        "dirs": [f"shards/{i:02d}" for i in range(shards)],
    }


def read_shards(root: str | Path) -> int | None:
    """The shard count of a sharded root; None when ``root`` is not sharded (no ``shards.json``).

    Raises:
        IndexFormatError: an unreadable or foreign ``shards.json``.
    """
    path = Path(root) / SHARDS_FILE
    if not path.is_file():
        return None
    try:
        desc = json.loads(path.read_text())
        count = int(desc["shards"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IndexFormatError(f"{path}: unreadable shard description ({exc})") from exc
    if desc.get("format") != SHARDS_FORMAT or desc.get("format_version") != SHARDS_FORMAT_VERSION:
        raise IndexFormatError(
            f"{path}: format {desc.get('format')!r} version {desc.get('format_version')!r} is not "
            f"{SHARDS_FORMAT!r} version {SHARDS_FORMAT_VERSION}"
        )
    if desc.get("assignment") != ASSIGNMENT or count < 1:
        raise IndexFormatError(f"{path}: unknown assignment {desc.get('assignment')!r} or shard count {count}")
    return count


def current_versions(root: str | Path) -> list[str | None]:
    """Each shard's published version name (None: nothing published there yet)."""
    count = read_shards(root)
    if count is None:
        raise IndexFormatError(f"{root}: not a sharded index (no {SHARDS_FILE})")
    return [IndexRoot(shard_dir(root, i)).current_version() for i in range(count)]


class ShardedIndex:
    """The shards of a sharded root, open together on this machine: what ``service.search`` needs to search
    each part and merge (``parts``), and the index-wide facts (counts, model, a version naming every shard's).
    """

    def __init__(self, root: Path, parts: list) -> None:
        self.dir = root
        self.parts = parts
        identities = {p.model_identity for p in parts}
        if len(identities) != 1:
            names = ", ".join(f"{i:02d}: {p.model_identity[:12]}" for i, p in enumerate(parts))
            raise IndexFormatError(f"{root}: the shards were built by different models ({names})")
        self.model_identity = parts[0].model_identity
        self.version = shard_version(p.version for p in parts)
        self.num_images = sum(p.num_images for p in parts)
        self.num_captions = sum(p.num_captions for p in parts)
        first = parts[0].manifest
        self.manifest = {
            "sharded": describe(len(parts)),
            "version": self.version,
            "model": first["model"],
            "store": first.get("store"),
            "counts": {"images": self.num_images, "captions": self.num_captions},
            "shards": [
                {"shard": i, "version": p.version, "counts": p.manifest["counts"], "faiss": p.manifest["faiss"]}
                for i, p in enumerate(parts)
            ],
        }

    def image_by_id(self, image_id: str) -> dict | None:
        """The image ``image_id`` from the shard that owns it."""
        return self.parts[shard_of(image_id, len(self.parts))].image_by_id(image_id)

    def close(self) -> None:
        for part in self.parts:
            part.close()


def shard_version(versions) -> str:
    """One name for a set of shard versions: ``00=<v>,01=<v>,...``."""
    return ",".join(f"{i:02d}={v}" for i, v in enumerate(versions))
