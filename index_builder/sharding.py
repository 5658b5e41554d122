"""``build``, ``add`` and ``remove`` on a sharded root (layout: ``index_format.sharded``).

The gallery is read and the model loaded once; each shard gets the images (with their captions), text-only
captions and skipped inputs whose ids ``shard_of`` assigns to it, and is built, added to or pruned exactly as
an ordinary root is (its own staging, resume, lock and atomic publish). Shards publish one after another: while
a build runs, the service may serve some shards' new versions beside others' old ones. An id always lives in
the same shard, so every answer is still consistent per image; a build that dies half way leaves every shard
serving a complete version, and the same command run again resumes each shard.
"""

from __future__ import annotations

import time
from pathlib import Path

from index_format import SHARDS_FILE, IndexRoot, describe, read_shards, shard_dir, shard_of, shard_version, write_json

from .build import BuildOptions, BuildResult, add_items, build_items, remove_ids
from .errors import BuildError
from .gallery import Item, Skipped, Text


def root_shards(out: str | Path, asked: int | None, operation: str) -> int | None:
    """The shard count to write ``out`` with: None for an ordinary root, else S (``shards.json`` written).

    ``asked`` (``--shards``) must agree with a sharded root's own count; an ordinary root that holds an index
    cannot become sharded in place (build a new root), and ``add``/``remove`` use the root as it is.
    """
    if asked is not None and asked < 1:
        raise BuildError(f"--shards must be at least 1, got {asked}")
    have = read_shards(out)
    if have is not None:
        if asked is not None and asked != have:
            raise BuildError(f"{out} is sharded into {have}; it cannot be {operation} with --shards {asked} "
                             "(build the new layout into a new root)")
        return have
    if asked is None or asked == 1:
        return None
    if operation != "build":
        raise BuildError(f"{out} is not sharded: '{operation}' cannot shard it (build a new root with --shards)")
    plain = IndexRoot(out)
    if plain.current_version() is not None or plain.list_versions():
        raise BuildError(f"{out} holds an unsharded index; build --shards {asked} into a new root")
    Path(out).mkdir(parents=True, exist_ok=True)
    write_json(Path(out) / SHARDS_FILE, describe(asked))
    return asked


def _split(items: list[Item], skipped: list[Skipped], texts: list[Text], shards: int):
    """Per shard: (items, skipped, texts) by ``shard_of`` of each id (a skipped input without one by its source)."""
    parts = [([], [], []) for _ in range(shards)]
    for it in items:
        parts[shard_of(it.id, shards)][0].append(it)
    for sk in skipped:
        parts[shard_of(sk.id or str(sk.source), shards)][1].append(sk)
    for t in texts:
        parts[shard_of(t.id, shards)][2].append(t)
    return parts


def _combine(results: list[BuildResult | None], started: float) -> BuildResult:
    done = [r for r in results if r is not None]
    versions = [r.version for r in done]
    return BuildResult(
        version=shard_version(versions) if any(versions) else None,
        indexed=sum(r.indexed for r in done),
        captions=sum(r.captions for r in done),
        skipped=[s for r in done for s in r.skipped],
        resumed_shards=sum(r.resumed_shards for r in done),
        encoded_shards=sum(r.encoded_shards for r in done),
        seconds=round(time.perf_counter() - started, 3),
        removed=sorted(i for r in done for i in r.removed),
    )


def _on_ray(opts: BuildOptions):
    """Connect to Ray once for all shards (each shard's encoding then uses the same cluster)."""
    if not opts.ray:
        return None
    from .distributed import connect

    return connect(opts.ray)


def _finish_ray(started_ray) -> None:
    if started_ray:
        import ray

        ray.shutdown()


def build_shards(items, skipped, texts, model, model_path: str, out, opts: BuildOptions, shards: int,
                 started: float) -> BuildResult:
    """``build`` into every shard of ``out``. A shard that no id maps to is refused before anything is encoded."""
    parts = _split(items, skipped, texts, shards)
    empty = [i for i, (its, _, txt) in enumerate(parts) if not its and not txt]
    if empty and items:
        raise BuildError(f"{len(items)} images spread over {shards} shards leave shard(s) "
                         f"{', '.join(f'{i:02d}' for i in empty)} empty; use fewer shards")
    started_ray = _on_ray(opts)
    try:
        results = [
            build_items(its, sk, txt, model, model_path, IndexRoot(shard_dir(out, i)), opts, time.perf_counter())
            for i, (its, sk, txt) in enumerate(parts)
        ]
    finally:
        _finish_ray(started_ray)
    return _combine(results, started)


def add_shards(items, skipped, texts, model, model_path: str, out, opts: BuildOptions, shards: int,
               started: float) -> BuildResult:
    """``add`` into each shard that new ids map to (other shards keep their version)."""
    parts = _split(items, skipped, texts, shards)
    started_ray = _on_ray(opts)
    try:
        results = [
            add_items(its, sk, txt, model, model_path, IndexRoot(shard_dir(out, i)), opts, time.perf_counter())
            if its or txt else None
            for i, (its, sk, txt) in enumerate(parts)
        ]
    finally:
        _finish_ray(started_ray)
    results[0] = results[0] or BuildResult(None, 0, 0, [], 0, 0, 0.0)
    results[0].skipped += [s.to_dict() for i, (its, sk, txt) in enumerate(parts) if not its and not txt for s in sk]
    return _combine(results, started)


def remove_shards(ids: list[str], out, keep: int, shards: int) -> BuildResult:
    """``remove`` from each shard that holds some of ``ids``; ids held nowhere are reported as skipped."""
    started = time.perf_counter()
    by_shard: list[list[str]] = [[] for _ in range(shards)]
    for i in ids:
        by_shard[shard_of(i, shards)].append(i)
    results = [remove_ids(group, IndexRoot(shard_dir(out, s)), keep) if group else None
               for s, group in enumerate(by_shard)]  # fmt: skip
    return _combine(results, started)
