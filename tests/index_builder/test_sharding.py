"""``--shards``: ids go to shards by a stable hash, each shard is an ordinary index, add/remove route by id."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from builder_helpers import DEMO_MODEL, REPO, run_cli

from index_builder import BuildOptions, IndexRoot, add, build, open_index, remove
from index_builder.errors import BuildError
from index_format import current_versions, read_shards, shard_dir, shard_of


def _opts(**kw) -> BuildOptions:
    return BuildOptions(progress=False, **{"workers": 0, **kw})


def _ids(index) -> set[str]:
    parts = getattr(index, "parts", [index])
    return {m["id"] for part in parts for m in part.images(range(part.num_images))}


def test_assignment_is_stable_across_processes():
    """The same shard for an id in any process (no per-process hash seed) and on any machine: pinned values."""
    ids = ["a", "test_00001", "set a/ünï cödé?#%.png", ""]
    code = "import json,sys; from index_format import shard_of as s; print(json.dumps([s(i, 7) for i in sys.argv[1:]]))"
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code, *ids], cwd=REPO, env=env, capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
        assert json.loads(out) == [shard_of(i, 7) for i in ids]
    assert [shard_of(i, 7) for i in ids] == [4, 2, 1, 1]  # sha256 prefixes: a change here re-shards every index
    counts = [0] * 4
    for n in range(4000):
        counts[shard_of(f"img-{n}", 4)] += 1
    assert min(counts) > 900  # spread evenly


@pytest.fixture(scope="module")
def sharded(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "root"
    manifest = world / "manifest.jsonl"
    first = world / "first.jsonl"
    first.write_text("".join(manifest.read_text().splitlines(keepends=True)[:20]))
    result = build(first, str(DEMO_MODEL), out, _opts(shards=3))
    return out, result


def test_build_writes_ordinary_shards(sharded, world):
    out, result = sharded
    assert read_shards(out) == 3 and result.indexed == 20 and result.captions == 100
    held = []
    for s in range(3):
        part = open_index(shard_dir(out, s))  # each shard is an ordinary, servable index
        try:
            held.append(_ids(part))
            assert all(shard_of(i, 3) == s for i in held[-1])
            assert part.num_captions == 5 * part.num_images
        finally:
            part.close()
    assert sum(map(len, held)) == 20 and set().union(*held) == {f"test_{n:05d}" for n in range(20)}
    assert result.version == ",".join(f"{s:02d}={v}" for s, v in enumerate(current_versions(out)))


def test_add_and_remove_route_by_id(sharded, world):
    out, _ = sharded
    before = current_versions(out)
    result = add(world / "manifest.jsonl", str(DEMO_MODEL), out, _opts())
    assert result.indexed == 4  # test_00020..23 are new; the 20 others are reported as already indexed
    after = current_versions(out)
    touched = {shard_of(f"test_{n:05d}", 3) for n in range(20, 24)}
    assert [b != a for b, a in zip(before, after, strict=True)] == [s in touched for s in range(3)]
    gone = "test_00003"
    result = remove([gone, "no-such-id"], out)
    assert result.removed == [gone]
    assert [s["id"] for s in result.skipped] == ["no-such-id"]
    final = current_versions(out)
    assert [a != f for a, f in zip(after, final, strict=True)] == [s == shard_of(gone, 3) for s in range(3)]
    index = open_index(out)
    try:
        assert _ids(index) == {f"test_{n:05d}" for n in range(24)} - {gone}
    finally:
        index.close()


def test_layout_mismatches_are_refused(sharded, world, tmp_path):
    out, _ = sharded
    manifest = world / "manifest.jsonl"
    with pytest.raises(BuildError, match="sharded into 3"):
        build(manifest, str(DEMO_MODEL), out, _opts(shards=2))
    plain = tmp_path / "plain"
    build(manifest, str(DEMO_MODEL), plain, _opts(shard_size=64))
    with pytest.raises(BuildError, match="unsharded index"):
        build(manifest, str(DEMO_MODEL), plain, _opts(shards=2))
    with pytest.raises(BuildError, match="not sharded"):
        add(manifest, str(DEMO_MODEL), plain, _opts(shards=2))
    assert read_shards(plain) is None and IndexRoot(plain).current_version() is not None
    one = world / "one.jsonl"
    one.write_text(manifest.read_text().splitlines(keepends=True)[0])
    with pytest.raises(BuildError, match="empty"):
        build(one, str(DEMO_MODEL), tmp_path / "too-many", _opts(shards=4))


def test_cli_shards_flag(world, tmp_path):
    out = tmp_path / "cli"
    proc = run_cli("build", "--gallery", str(world / "manifest.jsonl"), "--model", str(DEMO_MODEL), "--out", str(out),
                   "--shards", "2", "--workers", "0")  # fmt: skip
    summary = json.loads(proc.stdout)
    assert summary["indexed"] == 24 and summary["version"].startswith("00=") and read_shards(out) == 2
    bad = run_cli("add", "--gallery", str(world / "manifest.jsonl"), "--model", str(DEMO_MODEL), "--out", str(out),
                  "--shards", "5", check=False)  # fmt: skip
    assert bad.returncode == 2 and "sharded into 2" in bad.stderr
