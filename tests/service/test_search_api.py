"""The search endpoints over real HTTP against an index built by ``python -m index_builder build``."""

from __future__ import annotations

import threading
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import torch
from live_server import metric

from model import load_image, preprocess_image


def _caption(world, image_id: str, n: int = 0) -> str:
    return world["items"][image_id]["captions"][n]


def test_text_search_response(client, world):
    query = _caption(world, "test_00008")
    r = client.post("/search/text", json={"query": f"  {query} ", "k": 5, "candidates": 20})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"] == query and body["k"] == 5 and body["candidates"] == 20 and body["stage"] == "rerank"
    assert body["index_version"].startswith("v-")
    timings = body["timings_ms"]
    assert set(timings) == {"queue", "batch_wait", "encode", "encode_share", "first_stage", "rerank", "total"}
    assert all(v >= 0 for v in timings.values())
    assert timings["batch_wait"] <= timings["queue"] and timings["encode_share"] <= timings["encode"]
    results = body["results"]
    assert [hit["rank"] for hit in results] == [1, 2, 3, 4, 5]
    scores = [hit["score"] for hit in results]
    assert scores == sorted(scores, reverse=True)
    assert len({hit["id"] for hit in results}) == 5
    for hit in results:
        assert set(hit) == {"id", "score", "first_stage_score", "rank", "image_url", "metadata", "strength"}
        assert hit["id"] in world["base_ids"]
        assert hit["image_url"] == "/images/" + quote(hit["id"], safe="")
        assert hit["metadata"]["split"] == "test"


def test_text_scores_are_the_full_hat_score(client, world, demo_model):
    """The service's re-rank score of each hit equals the model's own HAT score for that image."""
    query = _caption(world, "test_00003", 1)
    results = client.post("/search/text", json={"query": query, "k": 4}).json()["results"]
    paths = [world["items"][hit["id"]]["image"] for hit in results]
    pixels = torch.stack([preprocess_image(load_image(p), demo_model.config.image.image_size) for p in paths])
    with torch.inference_mode():
        images = demo_model.encode_images(pixels)
        texts, lengths = demo_model.encode_text_strings([query])
        expected = demo_model.similarity(images, texts, lengths)[:, 0]
        first = demo_model.global_images(images) @ demo_model.global_texts(texts, lengths)[0]
    got = torch.tensor([hit["score"] for hit in results])
    # The index stores token features as float16, hence the tolerance.
    torch.testing.assert_close(got, expected.float(), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(torch.tensor([h["first_stage_score"] for h in results]), first, atol=1e-2, rtol=1e-2)


def test_candidates_are_raised_to_k_and_defaults_apply(client):
    body = client.post("/search/text", json={"query": "a red square", "k": 6, "candidates": 2}).json()
    assert body["k"] == 6 and body["candidates"] == 6 and len(body["results"]) == 6
    body = client.post("/search/text", json={"query": "a red square"}).json()
    assert body["k"] == 10 and body["candidates"] == 100 and len(body["results"]) == 10


def test_k_larger_than_the_gallery_returns_the_whole_gallery(client, world):
    body = client.post("/search/text", json={"query": "a star", "k": 100, "candidates": 1000}).json()
    assert len(body["results"]) == len(world["base_ids"])
    assert {hit["id"] for hit in body["results"]} == set(world["base_ids"])


def _png(path) -> bytes:
    return Path(path).read_bytes()


def test_image_to_captions(client, world):
    item = world["items"]["test_00000"]
    r = client.post("/search/image", files={"image": ("q.png", _png(item["image"]), "image/png")},
                    data={"k": "10", "candidates": "50"})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["stage"] == "rerank" and body["target"] == "captions" and body["k"] == 10
    assert set(body["timings_ms"]) == {"queue", "batch_wait", "decode", "encode", "encode_share", "first_stage",
                                       "rerank", "total"}
    results = body["results"]
    assert len(results) == 10 and [h["rank"] for h in results] == list(range(1, 11))
    assert [h["score"] for h in results] == sorted((h["score"] for h in results), reverse=True)
    for hit in results:
        assert {"id", "score", "first_stage_score", "rank", "image_id", "text", "image_url", "metadata"} <= set(hit)
        assert hit["text"] in world["items"][hit["image_id"]]["captions"]
        assert hit["image_url"] == "/images/" + quote(hit["image_id"], safe="")
    assert any(hit["image_id"] == "test_00000" for hit in results)  # its own captions rank high


def test_image_to_image_uses_global_vectors_only(client, world):
    item = world["items"]["test_00011"]
    r = client.post(
        "/search/image", files={"image": ("q.png", _png(item["image"]))}, data={"target": "image", "k": "3"}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["stage"] == "first_stage_only" and body["target"] == "image"
    assert "rerank" not in body["timings_ms"]
    top = body["results"][0]
    assert top["id"] == "test_00011" and top["score"] == pytest.approx(1.0, abs=1e-3)
    assert top["score"] == top["first_stage_score"]


def test_image_url_serves_the_gallery_file(client, world):
    odd = world["odd_id"]
    for image_id in ("test_00005", odd):
        r = client.get("/images/" + quote(image_id, safe=""))
        assert r.status_code == 200, (image_id, r.text)
        assert r.headers["content-type"] == "image/png"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.content == _png(world["items"][image_id]["image"])


def test_odd_ids_round_trip_through_search(client, world):
    odd = world["odd_id"]
    body = client.post("/search/text", json={"query": "shape", "k": 100}).json()
    hit = next(h for h in body["results"] if h["id"] == odd)
    assert client.get(hit["image_url"]).status_code == 200


@pytest.mark.parametrize("path", ["/images/nope", "/images/..%2F..%2Fetc%2Fpasswd", "/images/%2Fetc%2Fpasswd"])
def test_unknown_image_ids_are_404(client, path):
    r = client.get(path)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_only_regular_files_are_served(tmp_path):
    from service.routers.gallery import _regular_file

    f = tmp_path / "a.png"
    f.write_bytes(b"x")
    (tmp_path / "link").symlink_to(f)
    (tmp_path / "dirlink").symlink_to(tmp_path)
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    assert _regular_file(str(f)) == str(f)
    # A link, even to a regular file, is not what the builder recorded (it stores resolved paths).
    for bad in (tmp_path / "link", tmp_path, tmp_path / "dirlink", tmp_path / "dangling", tmp_path / "missing",
                "/dev/null"):  # fmt: skip
        assert _regular_file(str(bad)) is None, bad


def test_concurrent_searches(server, world):
    errors, statuses = [], []

    def worker(n: int) -> None:
        try:
            with server.client() as c:
                for i in range(3):
                    if (n + i) % 2:
                        r = c.post("/search/text", json={"query": _caption(world, f"test_{n:05d}"), "k": 3})
                    else:
                        files = {"image": ("q.png", _png(world["items"][f"test_{n:05d}"]["image"]))}
                        r = c.post("/search/image", files=files, data={"k": "3"})
                    statuses.append(r.status_code)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and statuses == [200] * 18


def test_health_ready_index_and_metrics(client, world):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    info = client.get("/index").json()
    assert info["images"] == len(world["base_ids"]) and info["captions"] == 5 * len(world["base_ids"])
    assert info["version"] == ready.json()["index_version"] and info["refused_versions"] == {}
    assert info["manifest"]["counts"] == {"images": 40, "captions": 200}
    client.post("/search/text", json={"query": ""})
    text = client.get("/metrics")
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain; version=0.0.4")
    body = text.text
    assert metric(body, "hat_http_requests_total", route="/search/text", method="POST", status="200") >= 1
    assert metric(body, "hat_http_errors_total", route="/search/text", code="empty_query") >= 1
    assert metric(body, "hat_search_stage_duration_seconds_bucket", search="text", stage="rerank", le="+Inf") >= 1
    assert "hat_index_images 40.0" in body and "hat_index_captions 200.0" in body
    assert f'hat_index_info{{version="{info["version"]}"}} 1.0' in body and "hat_ready 1.0" in body


def test_openapi_documents_the_text_body(client):
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/search/text"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == {"query", "k", "candidates", "filter", "explain"}


def test_first_stage_candidates_are_the_faiss_neighbours(client, demo_model):
    """``candidates=k`` re-ranks exactly FAISS's top k: the hits are the k best global-vector matches."""
    query = "a large green hexagon"
    body = client.post("/search/text", json={"query": query, "k": 5, "candidates": 5}).json()
    wide = client.post("/search/text", json={"query": query, "k": 40, "candidates": 40}).json()
    by_first = sorted(wide["results"], key=lambda h: -h["first_stage_score"])[:5]
    assert {h["id"] for h in body["results"]} == {h["id"] for h in by_first}
    assert np.isfinite([h["score"] for h in wide["results"]]).all()


def test_bfloat16_rerank_agrees_with_float32(client, start_server, index_root):
    live = start_server(index_root=str(index_root), rerank_dtype="bfloat16")
    live.wait_ready()
    query = {"query": "a small yellow triangle below a pink circle", "k": 5, "candidates": 40}
    exact = client.post("/search/text", json=query).json()["results"]
    with live.client() as c:
        fast = c.post("/search/text", json=query).json()["results"]
        fast_scores = {h["id"]: h["score"] for h in c.post("/search/text", json={**query, "k": 40}).json()["results"]}
    assert len(fast) == 5
    for hit in exact:  # same images, same scores to bfloat16 precision
        assert fast_scores[hit["id"]] == pytest.approx(hit["score"], abs=3e-2)
