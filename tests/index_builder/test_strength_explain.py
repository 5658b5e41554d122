"""Match strength calibrated at build time, and HAT's cross attention read back from the same stored features
the re-rank scores (float16 and the rotated ``pca`` store), through the real builder and reader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from builder_helpers import DEMO_MODEL

from index_builder import BuildOptions, build, open_index, remove
from index_format import StrengthScale
from index_format.strength import POOL_IMAGES


def _opts(**kw) -> BuildOptions:
    return BuildOptions(progress=False, workers=0, device="cpu", **kw)


@pytest.fixture(scope="module")
def model():
    from model import load_model

    return load_model(DEMO_MODEL)


@pytest.fixture(scope="module")
def built(world, tmp_path_factory):
    roots = {}
    for store in ("float16", "pca:2", "pq:1.5"):
        roots[store] = tmp_path_factory.mktemp(f"strength-{store.replace(':', '')}") / "root"
        build(world / "manifest.jsonl", str(DEMO_MODEL), roots[store], _opts(store=store))
    return roots


def test_build_stores_the_calibration(built):
    index = open_index(built["float16"])
    strength = index.manifest["strength"]
    assert strength["method"] == "gallery_pairs" and index.strength.method == "gallery_pairs"
    assert strength["true_pairs"] == 120 and strength["random_pairs"] == 120 * POOL_IMAGES  # 24 images x 5
    for key in ("random_quantiles", "match_quantiles"):
        assert np.all(np.diff(strength[key]) >= 0)
    assert strength["thresholds"]["strong"] >= strength["thresholds"]["good"]
    assert strength["thresholds"]["good"] == strength["random_quantiles"][198]  # the 99th percentile
    assert index.manifest["timings"]["strength_s"] >= 0
    assert index.strength.reference_rows("images") is None
    index.close()


def test_a_version_written_by_remove_is_calibrated_too(world, built, tmp_path):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(built["float16"], root, symlinks=True)
    remove(["test_00000"], root)
    index = open_index(root)
    assert index.manifest["strength"]["true_pairs"] == 115
    index.close()


def test_gallery_without_captions_rates_against_a_query_sample(world, tmp_path, model):
    lines = [json.loads(line) for line in (world / "manifest.jsonl").read_text().splitlines()]
    bare = tmp_path / "bare.jsonl"
    bare.write_text("".join(json.dumps({**item, "captions": [], "image": str(world / item["image"])}) + "\n"
                            for item in lines))  # fmt: skip
    build(bare, str(DEMO_MODEL), tmp_path / "root", _opts(allow_outside_root=True))
    index = open_index(tmp_path / "root")
    assert index.manifest["strength"] is None and index.strength.method == "query_sample"
    sample = index.strength.reference_rows("images")
    assert len(sample) == 24 and index.strength.reference_rows("captions").size == 0
    rated = index.strength.rate(np.array([1.0, 0.0]), reference=np.array([-0.5, 0.1, 0.2]))
    assert [r["label"] for r in rated] == ["good", "weak"]
    assert [r["percentile"] for r in rated] == [100.0, 33.33] and rated[0]["match_percentile"] is None
    index.close()


def test_calibrated_labels_follow_the_thresholds():
    calibration = {
        "method": "gallery_pairs",
        "thresholds": {"strong": 0.2, "good": 0.0},
        "random_quantiles": list(np.linspace(-1.0, 0.01, 201)),
        "match_quantiles": list(np.linspace(0.0, 0.4, 21)),
    }
    scale = StrengthScale(calibration, 10, 0)
    rated = scale.rate(np.array([0.3, 0.2, 0.1, -0.5, -2.0]))
    assert [r["label"] for r in rated] == ["strong", "strong", "good", "weak", "weak"]
    assert rated[0]["percentile"] == 100.0 and rated[4]["percentile"] == 0.0
    assert rated[0]["match_percentile"] == 75.0 and rated[2]["match_percentile"] == 25.0


@pytest.mark.parametrize("store", ["float16", "pca:2", "pq:1.5"])
def test_explanation_comes_from_the_reranked_features(built, model, store):
    """For text -> images and image -> captions: each level's attention, recomputed into a score, equals the
    level score the re-rank gave (same features: decoded, rotated); each word's map sums to 1 over the grid."""
    index = open_index(built[store])
    with torch.inference_mode():
        levels, lengths = model.encode_text_strings(["a red circle left of a blue square"])
        n = int(lengths[0])
        rows = np.arange(6)
        per_level = index.rerank_images([t[:, :n] for t in levels], n, rows, per_level=True)
        explained = index.explain_images([t[:, :n] for t in levels], n, rows)
        image_levels = [t[:1] for t in model.encode_images(torch.zeros(1, 3, 128, 128))]
        caption_rows = np.array([0, 7, 33, 119])
        caption_levels = index.rerank_captions(image_levels, caption_rows, per_level=True)
        caption_explained = index.explain_captions(image_levels, caption_rows)
    tokens = index.manifest["model"]["image_tokens"]
    for got, want in ((explained, per_level), (caption_explained, caption_levels)):
        for j, attentions in enumerate(got):
            assert [a.word_maps.shape[1] for a in attentions] == tokens
            np.testing.assert_allclose([a.score for a in attentions], want[j].numpy(), atol=1e-4)
            for a in attentions:
                torch.testing.assert_close(a.word_maps.sum(dim=1), torch.ones(len(a.word_maps)))
    assert explained[0][0].word_maps.shape[0] == n  # [CLS] and [SEP] included here
    index.close()


def test_filtered_search_on_the_compressed_tier(world, tmp_path, model):
    """An IVF-PQ first stage re-scored from the segments (the manifest's refine), restricted to allowed rows:
    the best allowed rows by exact inner product, as many as asked when enough are allowed."""
    build(world / "manifest.jsonl", str(DEMO_MODEL), tmp_path / "root", _opts(exact_limit=5, compress_limit=10))
    index = open_index(tmp_path / "root")
    assert index.refine.get("images")
    with torch.inference_mode():
        levels, lengths = model.encode_text_strings(["a small blue star"])
        vector = model.global_texts(levels, lengths).numpy()
    allowed = np.array([1, 4, 9, 16, 23])
    scores, rows = index.search("images", vector, 3, allowed=allowed)
    exact = index.global_vectors("images", allowed) @ vector[0]
    assert rows[0].tolist() == allowed[np.argsort(-exact)[:3]].tolist()
    np.testing.assert_allclose(scores[0], np.sort(exact)[::-1][:3], atol=1e-5)
    assert index.search("images", vector, 10, allowed=allowed)[1].shape == (1, 5)
    assert index.search("images", vector, 10, allowed=np.zeros(0, np.int64))[1].shape == (1, 0)
    index.close()
