"""A manifest whose images are object-store URIs: read through pyarrow's S3 file system from a real
S3-compatible server on loopback (moto's server), encoded exactly as the same files on local disk."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from builder_helpers import DEMO_MODEL

from index_builder import BuildOptions, IndexRoot, build, compare

moto_server = pytest.importorskip("moto.server", reason="moto (a dev dependency) is not installed")
boto3 = pytest.importorskip("boto3")


@pytest.fixture
def s3(monkeypatch):
    """An S3 endpoint on 127.0.0.1 with a bucket ``gallery``; (endpoint host:port, boto3 client)."""
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION":
                       "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    client = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1")
    client.create_bucket(Bucket="gallery")
    yield f"{host}:{port}", client
    server.stop()


def test_s3_images_index_like_local_files(s3, world, tmp_path):
    endpoint, client = s3
    lines = [json.loads(line) for line in (world / "manifest.jsonl").read_text().splitlines()[:6]]
    local = tmp_path / "local"
    (local / "images").mkdir(parents=True)
    remote_lines, local_lines = [], []
    for line in lines:
        name = line["image"].split("/")[-1]
        shutil.copy(world / line["image"], local / "images" / name)
        client.upload_file(str(world / line["image"]), "gallery", f"photos/{name}")
        uri = f"s3://gallery/photos/{name}?endpoint_override={endpoint}&scheme=http"
        remote_lines.append({**line, "image": uri})
        local_lines.append({**line, "image": f"images/{name}"})
    client.put_object(Bucket="gallery", Key="photos/notes.png", Body=b"not a picture")
    bad = [
        {"id": "missing", "image": f"s3://gallery/photos/nope.png?endpoint_override={endpoint}&scheme=http"},
        {"id": "notes", "image": f"s3://gallery/photos/notes.png?endpoint_override={endpoint}&scheme=http"},
        {"id": "ftp", "image": "ftp://example.org/a.png"},
    ]
    (local / "remote.jsonl").write_text("".join(json.dumps(x) + "\n" for x in remote_lines + bad))
    (local / "local.jsonl").write_text("".join(json.dumps(x) + "\n" for x in local_lines))
    opts = BuildOptions(device="cpu", workers=0, progress=False)
    remote = build(local / "remote.jsonl", str(DEMO_MODEL), tmp_path / "remote", opts)
    build(local / "local.jsonl", str(DEMO_MODEL), tmp_path / "local-index", opts)

    assert remote.indexed == 6
    reasons = {s["id"]: s["reason"] for s in remote.skipped}
    assert set(reasons) == {"missing", "notes", "ftp"}
    assert "cannot read" in reasons["missing"] and "nope.png" in reasons["missing"]
    assert "not an image" in reasons["notes"] and "s3://gallery/photos/notes.png" in reasons["notes"]
    assert "unsupported URI scheme 'ftp'" in reasons["ftp"]
    # Same pixels, same features; only the paths (and so the skip list and metadata rows) differ.
    differ = compare(tmp_path / "remote", tmp_path / "local-index")
    assert differ and all(d in ("manifest", "items.jsonl", "metadata.images") for d in differ), differ
    meta = IndexRoot(tmp_path / "remote").current_dir()
    rows = [json.loads(x) for x in next((meta.parents[1] / "segments").iterdir()).joinpath("items.jsonl")
            .read_text().splitlines()]
    assert all(r["path"].startswith("s3://gallery/photos/") for r in rows)
    assert np.array_equal(np.load(meta / "image_rows.npy"), np.load(IndexRoot(tmp_path / "local-index")
                                                                    .current_dir() / "image_rows.npy"))


def test_file_uris_are_local_paths_under_the_root_rule(world, tmp_path):
    line = json.loads((world / "manifest.jsonl").read_text().splitlines()[0])
    inside = tmp_path / "g"
    (inside / "images").mkdir(parents=True)
    shutil.copy(world / line["image"], inside / "images" / "a b.png")
    outside = world / line["image"]  # "file:///.../a%20b.png": URL-decoded to the file's name
    (inside / "m.jsonl").write_text(
        json.dumps({"id": "in", "image": (inside / "images" / "a b.png").as_uri()}) + "\n"
        + json.dumps({"id": "out", "image": outside.as_uri()}) + "\n"
    )
    result = build(inside / "m.jsonl", str(DEMO_MODEL), tmp_path / "idx",
                   BuildOptions(device="cpu", workers=0, progress=False))
    assert result.indexed == 1
    assert [s["id"] for s in result.skipped] == ["out"] and "outside the gallery root" in result.skipped[0]["reason"]
