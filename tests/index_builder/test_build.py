"""The rebuild job end to end: real model, real FAISS, real files, real processes killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from builder_helpers import BAD_FILES, DEMO_MODEL, REPO, assert_same_index, run_cli, search_text

from index_builder import BuildOptions, IndexFormatError, IndexRoot, add, build, open_index, remove
from index_builder.gallery import read_manifest
from model import load_model


@pytest.fixture(scope="module")
def demo():
    return load_model(DEMO_MODEL)


def _opts(**kw) -> BuildOptions:
    """In-process builds decode in the main process (faster for 24 images); the CLI runs use the default 2."""
    return BuildOptions(progress=False, **{"workers": 0, **kw})


def test_folder_with_every_bad_file_kind(bad_folder, tmp_path):
    result = build(bad_folder, str(DEMO_MODEL), tmp_path / "idx", _opts(shard_size=8))
    reasons = {s["id"]: s["reason"] for s in result.skipped}
    expected_bad = {name: why for name, why in BAD_FILES.items() if why}
    assert set(reasons) == set(expected_bad)
    for name, fragment in expected_bad.items():
        assert fragment in reasons[name], (name, reasons[name])
    unusual = [name for name, why in BAD_FILES.items() if why is None]
    assert result.indexed == 8 + len(unusual)
    assert result.captions == 8 * 5  # side-car captions of the 8 scenes
    index = open_index(tmp_path / "idx")
    manifest = index.manifest
    assert manifest["counts"] == {"images": result.indexed, "captions": 40}
    assert {s["id"] for s in manifest["skipped"]} == set(expected_bad)
    assert {m["id"] for m in index.images(range(index.num_images))} >= set(unusual)


def test_bad_manifest_lines_and_duplicates(world, tmp_path):
    lines = (world / "manifest.jsonl").read_text().splitlines()[:3]
    first = json.loads(lines[0])
    extra = [
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"image": "images/x.png"}),
        json.dumps({"id": "no-image"}),
        json.dumps({"id": "bad-captions", "image": first["image"], "captions": "a string"}),
        json.dumps(first),  # duplicate id
        json.dumps({"id": "missing", "image": "images/does-not-exist.png"}),
    ]
    manifest = world / "bad_manifest.jsonl"
    manifest.write_text("\n".join(lines + extra) + "\n")
    items, skipped = read_manifest(manifest)
    assert [it.id for it in items] == [json.loads(line)["id"] for line in lines] + ["missing"]
    assert len(skipped) == 6
    assert any("duplicate id" in s.reason for s in skipped)
    proc = run_cli("build", "--gallery", str(manifest), "--model", str(DEMO_MODEL), "--out", str(tmp_path / "i"))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["indexed"] == 3 and summary["skipped"] == 7
    assert "file not found" in proc.stderr


def test_nothing_indexable_or_unloadable_model_exits_nonzero(tmp_path, world):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "junk.png").write_bytes(b"junk")
    proc = run_cli("build", "--gallery", str(empty), "--model", str(DEMO_MODEL), "--out", str(tmp_path / "a"),
                   check=False)
    assert proc.returncode != 0 and "nothing could be indexed" in proc.stderr
    assert not (tmp_path / "a" / "current").exists()
    proc = run_cli("build", "--gallery", str(world / "manifest.jsonl"), "--model", str(tmp_path / "nope"),
                   "--out", str(tmp_path / "b"), check=False)
    assert proc.returncode != 0 and "cannot load model" in proc.stderr


@pytest.mark.parametrize("store", ["float16", "pca:2", "pq:1"])
def test_own_caption_retrieves_its_image(world, tmp_path, demo, store):
    build(world / "manifest.jsonl", str(DEMO_MODEL), tmp_path / "idx", _opts(store=store))
    index = open_index(tmp_path / "idx", expect_identity=demo.identity)
    hits = 0
    items, _ = read_manifest(world / "manifest.jsonl")
    for item in items:
        hits += item.id in search_text(index, demo, item.captions[0], candidates=10)[:5]
    assert hits >= 0.8 * len(items), f"{hits}/{len(items)} images found by their own caption in the top 5"
    # Image -> captions: an image's own captions come back near the top of the re-ranked candidates.
    with torch.inference_mode():
        from model import load_image, preprocess_image

        own = 0
        for item in items[:8]:
            pixels = preprocess_image(load_image(item.path), demo.config.image.image_size)[None]
            levels = demo.encode_images(pixels)
            _, rows = index.search("captions", demo.global_images(levels).numpy(), 25)
            scores = index.rerank_captions(levels, rows[0])
            top5 = index.captions(rows[0][torch.argsort(scores, descending=True)[:5].numpy()])
            own += any(c["image_id"] == item.id for c in top5)
        assert own >= 6, f"{own}/8 images have one of their captions in the re-ranked top 5"


def test_an_index_of_format_version_1_still_opens_and_ranks_alike(world, tmp_path, demo):
    """Format 2 keeps a coded store's norms in one byte; an index written before (format 1: float32 norms, no
    ranges files) opens and searches as before."""
    root = tmp_path / "idx"
    build(world / "manifest.jsonl", str(DEMO_MODEL), root, _opts(store="pq:1"))
    index = open_index(root)
    assert index.manifest["format_version"] == 2
    items, _ = read_manifest(world / "manifest.jsonl")
    queries = [item.captions[0] for item in items[:6]]
    before = [search_text(index, demo, q, candidates=20) for q in queries]
    seg = index.segments[0]
    # rewrite the published index as format 1 wrote it: float32 norms (the decoded ones), no ranges, version 1
    for level, table in enumerate(seg.image):
        norms = table.norms(np.arange(len(table))).numpy()
        (seg.dir / f"image.l{level + 1}.normrange.npy").unlink()
        np.save(seg.dir / f"image.l{level + 1}.norms.npy", norms.astype(np.float32))
    info = json.loads((seg.dir / "segment.json").read_text())
    (seg.dir / "segment.json").write_text(json.dumps({**info, "format_version": 1}))
    current = IndexRoot(root).current_dir()
    manifest = json.loads((current / "manifest.json").read_text())
    (current / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    old = open_index(root)
    assert old.manifest["format_version"] == 1
    assert old.segments[0].image[0].parts["norms"].dtype == np.float32
    assert "normrange" not in old.segments[0].image[0].parts
    assert [search_text(old, demo, q, candidates=20) for q in queries] == before


@pytest.mark.parametrize("store", ["pca:2", "pq:1"])
def test_add_and_remove_round_trip(world, tmp_path, demo, store):
    manifest = world / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    first, second = world / "first.jsonl", world / "second.jsonl"  # image paths are relative to the world
    first.write_text("\n".join(lines[:14]) + "\n")
    second.write_text("\n".join(lines[10:]) + "\n")  # overlaps the first by four ids
    root = tmp_path / "idx"
    build(first, str(DEMO_MODEL), root, _opts(store=store))
    v1 = IndexRoot(root).current_version()
    added = add(second, str(DEMO_MODEL), root, _opts())
    assert added.indexed == len(lines) - 14
    assert sum("already in the index" in s["reason"] for s in added.skipped) == 4
    full = open_index(root)
    assert full.num_images == len(lines) and full.num_captions == 5 * len(lines)
    assert len(full.manifest["segments"]) == 2 and full.manifest["parent"] == v1
    # the added segment is coded with the first one's codebooks (one version, one frame)
    assert [seg.info["store_kinds"]["image"] for seg in full.segments] == [store.split(":")[0]] * 2
    first_book, added_book = (seg.image[0].book for seg in full.segments)
    assert np.array_equal(first_book.basis, added_book.basis)
    # Nothing new: no new version.
    assert add(second, str(DEMO_MODEL), root, _opts()).version is None
    gone = [json.loads(line)["id"] for line in lines[:2]]
    removed = remove([*gone, "no-such-id"], root)
    assert removed.skipped == [{"source": "no-such-id", "id": "no-such-id", "reason": "id not in the index"}]
    assert removed.removed == sorted(gone) and removed.indexed == 0
    after = open_index(root)
    ids = {m["id"] for m in after.images(range(after.num_images))}
    assert after.num_images == len(lines) - 2 and not ids & set(gone)
    assert all(c["image_id"] not in gone for c in after.captions(range(after.num_captions)))
    # Search results never name removed ids.
    item = json.loads(lines[0])
    assert not set(search_text(after, demo, item["captions"][0], 30)) & set(gone)
    # The older versions are kept (default 3) and still open.
    assert len(IndexRoot(root).list_versions()) == 3
    assert open_index(root / "versions" / v1).num_images == 14


@pytest.mark.slow
def test_kill_9_mid_build_then_resume_equals_uninterrupted(world, tmp_path):
    gallery = str(world / "manifest.jsonl")
    args = ["--gallery", gallery, "--model", str(DEMO_MODEL), "--shard-size", "2", "--batch-size", "2"]
    root = tmp_path / "killed"
    build(gallery, str(DEMO_MODEL), root, _opts(shard_size=2))  # a live index the killed build must not damage
    live = IndexRoot(root).current_version()
    proc = subprocess.Popen(
        [sys.executable, "-m", "index_builder", "build", *args, "--out", str(root), "--store", "pca:2",
         "--no-progress"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        shards = list((root / "staging").glob("build-*/shard-*"))
        if len(shards) >= 3:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 3 <= len(shards) < 12, "the kill must land mid-build"
    assert IndexRoot(root).current_version() == live
    assert open_index(root).num_images == 24  # the live index still opens and is whole
    done = run_cli("build", *args, "--out", str(root), "--store", "pca:2")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["resumed_shards"] >= 3 and summary["encoded_shards"] == 12 - summary["resumed_shards"]
    resumed = open_index(root)
    clean_pca = tmp_path / "clean_pca"
    run_cli("build", *args, "--out", str(clean_pca), "--store", "pca:2")
    reference = open_index(clean_pca)
    assert resumed.version != live and resumed.num_images == 24
    # Same ids, metadata, captions, features within 1e-3 and ranked answers as the uninterrupted build.
    queries = [json.loads(line)["captions"][1] for line in (world / "manifest.jsonl").read_text().splitlines()[:6]]
    assert_same_index(resumed, reference, load_model(DEMO_MODEL), queries, atol=1e-3)


def test_reader_polling_current_never_sees_a_partial_index(world, tmp_path):
    root = tmp_path / "idx"
    build(world / "manifest.jsonl", str(DEMO_MODEL), root, _opts())
    seen, errors, stop = set(), [], threading.Event()

    def poll():
        while not stop.is_set():
            try:
                index = open_index(root)
                assert index.num_images == 24 and index.faiss["images"].ntotal == 24
                seen.add(index.version)
                index.close()
            except Exception as exc:  # any failure to open a published index is the bug under test
                errors.append(repr(exc))

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        for _ in range(3):
            build(world / "manifest.jsonl", str(DEMO_MODEL), root, _opts(keep=2))
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
    assert not errors, errors[:3]
    assert len(seen) >= 3


def test_reader_refuses_broken_indexes(world, tmp_path, demo):
    root = tmp_path / "idx"
    build(world / "manifest.jsonl", str(DEMO_MODEL), root, _opts(store="float16"))  # truncates image.l1.f16.npy
    with pytest.raises(IndexFormatError, match="no index published"):
        open_index(tmp_path / "fresh" if (tmp_path / "fresh" / "versions").mkdir(parents=True) is None else None)
    with pytest.raises(IndexFormatError, match="built by model"):
        open_index(root, expect_identity="0" * 64)
    current = IndexRoot(root).current_dir()
    manifest = json.loads((current / "manifest.json").read_text())
    seg = root / "segments" / manifest["segments"][0]
    table = seg / "image.l1.f16.npy"
    original = table.read_bytes()
    table.write_bytes(original[: len(original) // 2])
    with pytest.raises(IndexFormatError, match=r"image\.l1"):
        open_index(root)
    table.write_bytes(original)
    (current / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(IndexFormatError, match="format version 99"):
        open_index(root)
    (current / "manifest.json").write_text(json.dumps(manifest))
    (current / "images.faiss").rename(current / "moved.faiss")
    with pytest.raises(IndexFormatError, match=r"images\.faiss"):
        open_index(root)
    (current / "moved.faiss").rename(current / "images.faiss")
    assert open_index(root, expect_identity=demo.identity).num_images == 24


def test_second_builder_is_refused_while_one_holds_the_lock(world, tmp_path):
    from index_builder import BuildError

    root = IndexRoot(tmp_path / "idx")
    with root.lock(), pytest.raises(BuildError, match="another build"):
        build(world / "manifest.jsonl", str(DEMO_MODEL), root.root, _opts())


@pytest.mark.gpu
def test_cuda_rerank_matches_cpu(world, tmp_path, demo):
    if not torch.cuda.is_available():
        pytest.skip("CUDA not available on this machine")
    build(world / "manifest.jsonl", str(DEMO_MODEL), tmp_path / "idx", _opts(store="pca:2"))
    index = open_index(tmp_path / "idx", gpu=True)
    with torch.inference_mode():
        levels, lengths = demo.encode_text_strings(["a red circle left of a blue square"])
        _, rows = index.search("images", demo.global_texts(levels, lengths).numpy(), 20)
        cpu = index.rerank_images(levels, int(lengths[0]), rows[0])
        gpu = index.rerank_images(levels, int(lengths[0]), rows[0], device="cuda")
    assert torch.allclose(cpu, gpu, atol=1e-4)
