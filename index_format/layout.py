"""The index root on disk: immutable segments, versions that list them, and the ``current`` pointer.

```
ROOT/
  current -> versions/<version>      symlink, replaced atomically (rename of a new link over the old)
  versions/<version>/                one published index: manifest.json, FAISS files, metadata.sqlite
  segments/<segment>/                encoded items (features, global vectors, items), shared by versions
  staging/<build>/                   an unfinished build's completed shards (resume reads them)
  .lock                              held (flock) by the one builder allowed to write at a time
```

A version is written under ``versions/.tmp-*``, flushed (files and directories fsynced), renamed into
place, and only then does ``current`` move. A reader resolving ``current`` therefore sees either the old
complete version or the new complete one. Old versions are pruned (``keep`` newest kept) along with the
segments no kept version lists.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import uuid
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path

from .errors import BuildError

logger = logging.getLogger(__name__)
INDEX_FORMAT = "hat-search-index"
SEGMENT_FORMAT = "hat-search-segment"
# 2 (2026-12-04): coded stores keep token norms in one byte with per-item ranges (``<table>.normrange.npy``).
# Readers read versions 1 and 2; a reader of version 1 alone refuses a version 2 index instead of taking the
# one-byte codes for norms.
FORMAT_VERSION = 2
READ_FORMAT_VERSIONS = (1, 2)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` and the directories themselves to disk."""
    for dirpath, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(dirpath))


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temporary file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def new_name(prefix: str = "") -> str:
    """Sortable unique name: UTC time to the microsecond plus a random suffix."""
    return f"{prefix}{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:6]}"


class IndexRoot:
    """Paths and pointer operations of one index root (see the module docstring for the layout)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.versions = self.root / "versions"
        self.segments = self.root / "segments"
        self.staging = self.root / "staging"
        self.current = self.root / "current"

    def create(self) -> None:
        try:
            for d in (self.versions, self.segments, self.staging):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BuildError(f"cannot create the index root {self.root}: {exc}") from exc

    def current_version(self) -> str | None:
        """Name of the version ``current`` points at, or None when nothing is published."""
        try:
            return Path(os.readlink(self.current)).name
        except (FileNotFoundError, OSError):
            return None

    def current_dir(self) -> Path | None:
        name = self.current_version()
        return self.versions / name if name else None

    def list_versions(self) -> list[str]:
        if not self.versions.is_dir():
            return []
        return sorted(p.name for p in self.versions.iterdir() if p.is_dir() and not p.name.startswith("."))

    @contextmanager
    def lock(self):
        """Exclusive writer lock; a second concurrent builder fails at once with a clear message."""
        self.create()
        fh = open(self.root / ".lock", "a+")  # noqa: SIM115 - held for the duration of the context
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise BuildError(f"another build is writing {self.root} (lock {self.root / '.lock'} is held)") from exc
            _HELD_LOCKS.add(fh.fileno())
            yield
        finally:
            _HELD_LOCKS.discard(fh.fileno())
            fh.close()


    def publish(self, tmp_dir: Path, version: str, keep: int) -> Path:
        """Flush ``tmp_dir``, rename it to ``versions/<version>``, point ``current`` at it, prune old versions."""
        fsync_tree(tmp_dir)
        final = self.versions / version
        os.rename(tmp_dir, final)
        fsync_dir(self.versions)
        link = self.root / f".current-{uuid.uuid4().hex[:8]}"
        os.symlink(os.path.join("versions", version), link)
        os.replace(link, self.current)
        fsync_dir(self.root)
        logger.info("published %s", final)
        self.prune(keep)
        return final

    def prune(self, keep: int) -> None:
        """Keep the newest ``keep`` versions (and always the current one); drop unreferenced segments."""
        versions = self.list_versions()
        current = self.current_version()
        drop = [v for v in versions[: max(0, len(versions) - max(1, keep))] if v != current]
        for name in drop:
            shutil.rmtree(self.versions / name, ignore_errors=True)
        for tmp in self.versions.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
        used = set()
        for name in self.list_versions():
            try:
                used.update(json.loads((self.versions / name / "manifest.json").read_text())["segments"])
            except (OSError, ValueError, KeyError):
                return  # never delete segments while a version cannot be read
        for seg in self.segments.iterdir() if self.segments.is_dir() else []:
            if seg.name not in used and not seg.name.startswith("building-"):
                shutil.rmtree(seg, ignore_errors=True)


# File descriptors of the writer locks this process holds. A flock belongs to the open file, which forked
# children (the encoder's decoding workers) share: a child closes its copies at start (close_inherited_locks), so
# the lock goes with the builder itself when it dies, not seconds later with its orphaned workers.
_HELD_LOCKS: set[int] = set()


def close_inherited_locks(_worker_id: int = 0) -> None:
    """In a forked child: close the inherited writer-lock descriptors (usable as a DataLoader worker_init_fn)."""
    for fd in list(_HELD_LOCKS):
        with suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()
