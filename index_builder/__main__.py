"""Command line: ``python -m index_builder {build,add,remove}`` (the rebuild-index job).

Indexes a gallery (a folder of images, or a JSONL manifest) with a HAT model into ``--out``: FAISS indices of the
global vectors, the per-level token features for re-ranking, metadata and a manifest, published atomically as
a new version (``OUT/current``). Bad inputs are skipped with their reasons; a killed build resumes. Prints one
JSON summary line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from index_format import DEFAULT_STORE, StoreSpec
from model import CommandParser

from .build import BuildOptions, add, build, remove
from .errors import BuildError, GalleryError
from .gallery import NOT_AN_IMAGE
from .version import COMPRESS_LIMIT, EXACT_LIMIT


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gallery", required=True, help="folder of images (recursive) or a JSONL manifest")
    p.add_argument("--model", required=True, help="an authors' .ckpt or a project model directory")
    p.add_argument("--out", required=True, help="index root (versions, segments, 'current')")
    p.add_argument("--texts", help="optional text-only corpus: JSONL {id, text, metadata} or one text per line")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=32, help="images encoded per forward pass")
    p.add_argument("--workers", type=int, default=2, help="decoding worker processes (0: in the main process)")
    p.add_argument("--shard-size", type=int, default=1024, help="items per resumable shard")
    p.add_argument("--store", default=DEFAULT_STORE,
                   help="re-rank feature store: float16, int8, pca[:BITS] (pca:3) or pq[:BITS] (pq:1)")
    p.add_argument("--keep", type=int, default=3, help="published versions to keep")
    p.add_argument("--max-pixels", type=int, default=89_478_485, help="decompression-bomb limit per image")
    p.add_argument("--exact-limit", type=int, default=EXACT_LIMIT, help="flat FAISS index up to this many vectors")
    p.add_argument(
        "--compress-limit", type=int, default=COMPRESS_LIMIT,
        help="compressed FAISS index (IVF-PQ, re-scored exactly; memory-mapped by the service) above this many "
        "vectors, IVF-Flat between --exact-limit and this",
    )
    p.add_argument(
        "--allow-outside-root", action="store_true",
        help="accept image paths (and side-car caption files) that resolve, after symbolic links, outside the "
        "gallery root: the folder, or the manifest's own folder. Off by default: such inputs are skipped with a "
        "reason. Use it only for a trusted manifest that deliberately points elsewhere.",
    )
    ray = p.add_argument_group("distributed encoding on Ray (pip install 'hat-search[ray]')")
    ray.add_argument(
        "--ray", metavar="ADDRESS",
        help="encode on a Ray cluster: 'local' starts one inside this command, 'auto' joins the running one "
        "(RAY_ADDRESS or the local node's), 'ray://HOST:PORT' or 'HOST:PORT' a given one. Same shards, same "
        "index, same resume as without it; every node must see --gallery, --model and --out at the same paths. "
        "Default: encode in this process",
    )
    ray.add_argument("--ray-actors", type=int, help="encoder actors (default: one per GPU; CPU-only: one per CPU)")
    ray.add_argument("--ray-actor-cpus", type=float, help="CPUs each encoder actor reserves (default: 1 with GPUs; "
                     "CPU-only 0.5, leaving half the CPUs to decoding; given: one CPU is kept for decoding)")
    ray.add_argument("--ray-threads", type=int, help="torch threads of each CPU encoder actor (default: its "
                     "reserved CPUs, at least 1)")
    p.add_argument(
        "--shards", type=int,
        help="split the index into this many shards by a stable hash of each id (ROOT/shards/NN/, each an "
        "ordinary index; served together by 'python -m service' or 'python -m service.cluster'). Default: the "
        "root's own count (a new root: 1, unsharded)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("--report", help="write the full result, every skipped input included, as JSON here (default: none)")


def _options(args) -> BuildOptions:
    StoreSpec.parse(args.store)
    for name in ("batch_size", "shard_size", "keep", "max_pixels"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    return BuildOptions(
        device=args.device, batch_size=args.batch_size, workers=max(0, args.workers), shard_size=args.shard_size,
        store=args.store, keep=args.keep, max_pixels=args.max_pixels, exact_limit=args.exact_limit,
        compress_limit=args.compress_limit,
        texts=args.texts, progress=not args.no_progress, allow_outside_root=args.allow_outside_root,
        ray=args.ray, ray_actors=args.ray_actors, ray_actor_cpus=args.ray_actor_cpus, ray_threads=args.ray_threads,
        shards=args.shards,
    )


EXAMPLES = {
    "build": (
        "python -m index_builder build --gallery data/demo-gallery/manifest.jsonl --model models/demo \\\n"
        "    --out indexes/demo",
        "python -m index_builder build --gallery ~/photos --model models/demo --out indexes/photos --store pca:3",
    ),
    "add": ("python -m index_builder add --gallery ~/new-photos --model models/demo --out indexes/photos",),
    "remove": (
        "python -m index_builder remove --out indexes/photos 2024/IMG_0001.jpg 2024/IMG_0002.jpg",
        "python -m index_builder remove --out indexes/photos --ids-file unwanted.txt",
    ),
}
DESCRIPTIONS = {
    "build": "Indexes a whole gallery into a new version of --out (resuming a killed build with the same arguments).",
    "add": "Indexes only the items whose ids the current version lacks, as a new segment, and publishes a new version.",
    "remove": "Publishes a version of --out without the given image or text ids (segments stay, unlisted).",
}


def build_parser() -> CommandParser:
    """The command line: ``build``, ``add`` (the same options) and ``remove``."""
    examples = [EXAMPLES["build"][0], EXAMPLES["add"][0], EXAMPLES["remove"][0]]
    parser = CommandParser(prog="python -m index_builder", description=__doc__, examples=examples)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, summary in (("build", "index a whole gallery into a new version"), ("add", "index only new ids")):
        _common(sub.add_parser(name, help=summary, description=DESCRIPTIONS[name], examples=EXAMPLES[name]))
    rm = sub.add_parser("remove", help="publish a version without the given ids", description=DESCRIPTIONS["remove"],
                        examples=EXAMPLES["remove"])  # fmt: skip
    rm.add_argument("--out", required=True, help="index root (versions, segments, 'current')")
    rm.add_argument("ids", nargs="*", help="image or text ids")
    rm.add_argument("--ids-file", help="file with one id per line, added to the ids given (default: none)")
    rm.add_argument("--keep", type=int, default=3, help="published versions to keep")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "remove":
            ids = list(args.ids)
            if args.ids_file:
                with open(args.ids_file) as fh:
                    ids += [line.strip() for line in fh if line.strip()]
            result = remove(ids, args.out, args.keep)
        else:
            fn = build if args.command == "build" else add
            result = fn(args.gallery, args.model, args.out, _options(args))
    except (BuildError, GalleryError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {
        "version": result.version,
        "indexed": result.indexed,
        "captions": result.captions,
        "skipped": len(result.skipped),
        "not_images": sum(s["reason"] == NOT_AN_IMAGE for s in result.skipped),
        "resumed_shards": result.resumed_shards,
        "encoded_shards": result.encoded_shards,
        "seconds": result.seconds,
    }
    if args.command == "remove":
        summary["removed"] = len(result.removed)
    print(json.dumps(summary))
    if getattr(args, "report", None):
        from pathlib import Path

        from .build import write_report

        write_report(result, Path(args.report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
