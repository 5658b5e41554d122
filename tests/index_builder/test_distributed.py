"""The build on Ray (``--ray``): the same index as one process, bit for bit, and the same resume.

A local Ray cluster is started by the tests (two logical CPUs: two encoder actors of half a CPU, one decoding slot)
and stopped at the end of the module; the kill tests in ``test_distributed_kill.py`` start their own.
"""

from __future__ import annotations

import json
import shutil

import pytest
from builder_helpers import DEMO_MODEL

from index_builder import BuildError, BuildOptions, IndexRoot, add, build, compare

ray = pytest.importorskip("ray", reason="the Ray extra is not installed (pip install 'hat-search[ray]')")


@pytest.fixture(scope="module")
def cluster():
    import logging

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray.cluster_resources()
    ray.shutdown()


def _opts(**kw) -> BuildOptions:
    return BuildOptions(device="cpu", workers=0, shard_size=4, batch_size=3, progress=False, **kw)


def _ray_opts(**kw) -> BuildOptions:
    """The Ray build with as many torch threads per actor as this process (the one-process build) uses:
    on CPU, a different thread count can change the last bits of a few values (measured: caption global
    vectors, 6e-8, in a shard of five captions; docs/scale.md)."""
    import torch

    return _opts(ray="auto", ray_threads=torch.get_num_threads(), **kw)


def _manifest(root) -> dict:
    return json.loads((IndexRoot(root).current_dir() / "manifest.json").read_text())


def test_unreachable_cluster_is_one_clear_error(world, tmp_path):
    assert not ray.is_initialized()  # first in the module: before the cluster fixture connects
    with pytest.raises(BuildError, match=r"--ray 127\.0\.0\.1:1: cannot connect"):
        build(world / "manifest.jsonl", str(DEMO_MODEL), tmp_path / "x", _opts(ray="127.0.0.1:1"))
    with pytest.raises(BuildError, match="expected local, auto, HOST:PORT"):
        build(world / "manifest.jsonl", str(DEMO_MODEL), tmp_path / "x", _opts(ray="nowhere"))
    assert not (tmp_path / "x" / "current").exists()


def test_ray_build_is_bit_identical_to_one_process(cluster, bad_folder, tmp_path):
    """Every field a search reads (features, norms, global vectors, FAISS, ids, captions, metadata) and the
    skip report: a folder with good, odd and broken files, shards of 4 with batches of 3 (partial batches and
    shards where undecodable files leave gaps)."""
    one = build(bad_folder, str(DEMO_MODEL), tmp_path / "one", _opts())
    spread = build(bad_folder, str(DEMO_MODEL), tmp_path / "ray", _ray_opts())
    assert compare(tmp_path / "one", tmp_path / "ray") == []
    assert spread.skipped == one.skipped and spread.indexed == one.indexed and spread.captions == one.captions
    assert spread.encoded_shards == one.encoded_shards > 1
    engine = _manifest(tmp_path / "ray")["engine"]
    assert engine["ray"] == "auto" and engine["actors"] == 2 and engine["device"] == "cpu"
    assert "engine" not in _manifest(tmp_path / "one")


def test_compare_sees_a_difference(cluster, world, tmp_path):
    """The equality check above can fail: another store (int8) differs in the token tables, not in the ids."""
    gallery = world / "manifest.jsonl"
    build(gallery, str(DEMO_MODEL), tmp_path / "a", _opts())
    build(gallery, str(DEMO_MODEL), tmp_path / "b", _ray_opts(store="int8"))
    differ = compare(tmp_path / "a", tmp_path / "b")
    assert "manifest" in differ and any(name.startswith("image.l1") for name in differ)
    assert "metadata.images" not in differ and "items.jsonl" not in differ


def test_ray_add_equals_one_process_add(cluster, world, tmp_path):
    lines = (world / "manifest.jsonl").read_text().splitlines()
    first = tmp_path / "first.jsonl"
    first.write_text("\n".join(lines[:10]) + "\n")
    shutil.copytree(world / "images", tmp_path / "images")  # inside the manifests' folder (links lead out)
    full = tmp_path / "full.jsonl"
    full.write_text("\n".join(lines) + "\n")
    for name, opts in (("one", _opts()), ("ray", _ray_opts())):
        build(first, str(DEMO_MODEL), tmp_path / name, _opts())
        result = add(full, str(DEMO_MODEL), tmp_path / name, opts)
        assert result.indexed == len(lines) - 10
    assert compare(tmp_path / "one", tmp_path / "ray") == []


def test_resume_crosses_engines(cluster, world, tmp_path):
    """Shards committed by a one-process run are reused by a Ray run of the same command (and vice versa:
    the staging key depends on the gallery, model and store options, not on the engine)."""
    gallery = world / "manifest.jsonl"
    root = IndexRoot(tmp_path / "root")
    build(gallery, str(DEMO_MODEL), tmp_path / "reference", _opts())
    # A one-process run that stopped after its first two shards: run the planning and encode those only.
    from index_builder.build import _listing_hash
    from index_builder.encode import EncodeOptions, encode_shard
    from index_builder.gallery import read_gallery
    from model import load_model

    items, _ = read_gallery(gallery)
    model = load_model(DEMO_MODEL)
    key = "build-" + _listing_hash(items, [], model, _opts(), "build")
    for i in range(2):
        encode_shard(model, items[4 * i:4 * i + 4], [], root.staging / key / f"shard-{i:05d}", EncodeOptions(3, 0))
    result = build(gallery, str(DEMO_MODEL), root.root, _ray_opts())
    assert result.resumed_shards == 2 and result.encoded_shards == len(items) // 4 - 2
    assert compare(tmp_path / "reference", root.root) == []


def test_pool_shape_from_cluster_resources():
    from index_builder.distributed import pool_shape

    cpu = pool_shape(_opts(), {"CPU": 8.0})  # one 1-thread actor per CPU, half a CPU reserved each
    assert cpu == {"actors": 8, "num_gpus": 0, "num_cpus": 0.5, "threads": 1, "device": "cpu"}
    assert pool_shape(_opts(), {"CPU": 2.0})["actors"] == 2
    assert pool_shape(_opts(ray_actor_cpus=2.0), {"CPU": 8.0})["actors"] == 3  # given: one CPU kept for decoding
    assert pool_shape(_opts(ray_actor_cpus=2.0), {"CPU": 8.0})["threads"] == 2
    gpu = pool_shape(BuildOptions(), {"CPU": 16.0, "GPU": 4.0})
    assert gpu["actors"] == 4 and gpu["num_gpus"] == 1 and gpu["device"] == "cuda"
    assert pool_shape(BuildOptions(device="cpu"), {"CPU": 16.0, "GPU": 4.0})["device"] == "cpu"
    with pytest.raises(BuildError, match="no CPU for decoding"):
        pool_shape(_opts(ray_actors=2, ray_actor_cpus=1.0), {"CPU": 2.0})
    with pytest.raises(BuildError, match="no CPU for decoding"):
        pool_shape(_opts(ray_actors=4), {"CPU": 2.0})
    with pytest.raises(BuildError, match="above 0"):
        pool_shape(_opts(ray_actor_cpus=0.0), {"CPU": 2.0})
    with pytest.raises(BuildError, match="no GPUs"):
        pool_shape(BuildOptions(device="cuda"), {"CPU": 2.0})
