"""Field-by-field comparison of two published indexes (``python -m index_format compare A B``).

Two builds of the same gallery with the same model and options should hold the same bits whichever engine
encoded them (one process, or Ray). This says which fields differ, comparing what a search reads: token
features and their norms (every level, images and captions), global vectors, caption offsets, ids, paths,
captions and metadata, in row order, and the FAISS indices' stored vectors. Names of versions and
segments, timings and the engine that ran are expected to differ and are not compared.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import sys
from pathlib import Path

import numpy as np

from model import CommandParser

from .layout import IndexRoot

_MANIFEST_KEYS = ("model", "store", "dims", "levels", "counts", "skipped", "options", "operation")


def _published(root: str | Path) -> Path:
    current = IndexRoot(root).current_dir()
    if current is None:
        raise FileNotFoundError(f"{root}: no published index")
    return current


def _array_digest(arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def fingerprint(root: str | Path) -> dict[str, str]:
    """Field name -> digest of the published version's content, in the version's row order."""
    version = _published(root)
    manifest = json.loads((version / "manifest.json").read_text())
    segments = [version.parents[1] / "segments" / s for s in manifest["segments"]]
    out = {"manifest": json.dumps({k: manifest.get(k) for k in _MANIFEST_KEYS}, sort_keys=True)}
    for kind, rows_file in (("image", "image_rows.npy"), ("caption", "caption_rows.npy")):
        rows = np.load(version / rows_file)
        out[f"{kind}.rows"] = _array_digest([rows[:, 1]]) if len(segments) == 1 else _array_digest([rows])
    names = sorted({p.name for seg in segments for p in seg.glob("*.npy")})
    for name in names:  # whole segments: with one segment per build the rows above select from them in order
        parts = [np.load(seg / name) for seg in segments if (seg / name).exists()]
        out[name.removesuffix(".npy")] = _array_digest(parts)
    for name in ("items.jsonl", "captions.jsonl"):
        out[name] = hashlib.sha256(b"".join((seg / name).read_bytes() for seg in segments)).hexdigest()
    db = sqlite3.connect(f"file:{version / 'metadata.sqlite'}?mode=ro", uri=True)
    try:
        for table in ("images", "captions"):
            rows = db.execute(f"SELECT * FROM {table} ORDER BY row").fetchall()
            out[f"metadata.{table}"] = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    finally:
        db.close()
    import faiss

    for name in ("images.faiss", "captions.faiss"):
        if (version / name).exists():
            index = faiss.read_index(str(version / name))
            out[name] = hashlib.sha256(faiss.serialize_index(index).tobytes()).hexdigest()
    return out


def compare(a: str | Path, b: str | Path) -> list[str]:
    """Names of the fields that differ between the published versions of index roots ``a`` and ``b``."""
    fa, fb = fingerprint(a), fingerprint(b)
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def build_parser() -> CommandParser:
    """The command line of ``python -m index_format``."""
    example = "python -m index_format compare runs/index-one-process runs/index-ray"
    parser = CommandParser(prog="python -m index_format", description=__doc__, examples=[example])
    sub = parser.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser(
        "compare", help="list the fields in which two published indexes differ", examples=[example],
        description="Compares the published versions of two index roots field by field (manifest, row tables,\n"
        "segments' arrays, metadata, FAISS indices). Prints one JSON line {fields, identical, differ}; exits\n"
        "with 0 when they are identical, 1 when a field differs, 2 when an index cannot be read.",
    )  # fmt: skip
    cmp.add_argument("a", help="an index root (its published version is read)")
    cmp.add_argument("b", help="another index root")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        fa, fb = fingerprint(args.a), fingerprint(args.b)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    differ = sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))
    print(json.dumps({"fields": len(fa), "identical": not differ, "differ": differ}))
    return 1 if differ else 0
