"""The generated world: deterministic, Karpathy-format, captions that name colours, shapes and relations."""

from __future__ import annotations

import hashlib
import json

import pytest

from training.data import DatasetError, caption_table, pick_captions, read_karpathy
from training.synthetic import COLOURS, Thing, captions, main, relation, twin


def digest(folder):
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    assert main(["--out", str(out), "--seed", "7", "--train", "12", "--val", "4", "--test", "5"]) == 0
    return out


def test_karpathy_format_and_splits(world):
    data = json.loads((world / "dataset.json").read_text())
    assert [i["split"] for i in data["images"]].count("test") == 5
    for item in data["images"]:
        assert (world / "images" / item["filename"]).is_file()
        assert len(item["sentences"]) == 5 and all(s["raw"] for s in item["sentences"])
    entries = read_karpathy(world / "dataset.json", world / "images", "train")
    assert len(entries) == 12 and all(len(e.captions) == 5 for e in entries)
    texts, owner = caption_table(entries)
    assert len(texts) == 60 and owner.tolist()[:6] == [0, 0, 0, 0, 0, 1]


def test_same_seed_same_bytes(world, tmp_path):
    main(["--out", str(tmp_path), "--seed", "7", "--train", "12", "--val", "4", "--test", "5"])
    assert digest(tmp_path) == digest(world)
    other = tmp_path / "other"
    main(["--out", str(other), "--seed", "8", "--train", "12", "--val", "4", "--test", "5"])
    assert digest(other) != digest(world)


def test_captions_are_varied_and_grounded():
    import random

    scene = [Thing("circle", "red", "small", 0.3, 0.5), Thing("square", "blue", "large", 0.7, 0.5)]
    texts = captions(random.Random(0), scene)
    assert len(set(texts)) == 5
    for text in texts:
        lowered = text.lower()
        assert "red" in lowered and "blue" in lowered
    assert relation(scene[0], scene[1]) == "left" and relation(scene[1], scene[0]) == "right"
    assert relation(Thing("star", "red", "small", 0.5, 0.2), scene[0]) == "above"


def test_twins_swap_binding_or_position():
    import random

    scene = [Thing("circle", "red", "small", 0.3, 0.5), Thing("square", "blue", "large", 0.7, 0.5)]
    rng = random.Random(1)
    for _ in range(10):
        t = twin(rng, scene)
        assert sorted(x.shape for x in t) == ["circle", "square"]
        assert t != scene
        assert {x.colour for x in t} == {"red", "blue"}
    assert len(COLOURS) >= 6


def test_pick_captions_one_per_image(world):
    import random

    entries = read_karpathy(world / "dataset.json", world / "images", "train")
    picks = pick_captions(entries, random.Random(0))
    assert [p // 5 for p in picks] == list(range(12))


def test_bad_dataset_files(tmp_path):
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(DatasetError, match="cannot read"):
        read_karpathy(tmp_path / "bad.json", tmp_path, "train")
    (tmp_path / "empty.json").write_text('{"images": []}')
    with pytest.raises(DatasetError, match="no images in split"):
        read_karpathy(tmp_path / "empty.json", tmp_path, "test")
    with pytest.raises(DatasetError, match="split must be"):
        read_karpathy(tmp_path / "empty.json", tmp_path, "dev")


def test_gallery_manifest_matches_dataset(tmp_path):
    from training.synthetic import main

    main(["--out", str(tmp_path), "--seed", "5", "--train", "0", "--val", "2", "--test", "3"])
    data = json.loads((tmp_path / "dataset.json").read_text())
    lines = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [x["image"] for x in lines] == [f"images/{im['filename']}" for im in data["images"]]
    assert [x["captions"] for x in lines] == [[s["raw"] for s in im["sentences"]] for im in data["images"]]
    assert len({x["id"] for x in lines}) == 5 and all((tmp_path / x["image"]).is_file() for x in lines)


def test_iter_world_replays_the_generated_captions(world):
    from training.synthetic import SPLIT_DEFAULTS, iter_world

    data = json.loads((world / "dataset.json").read_text())
    splits = dict.fromkeys(SPLIT_DEFAULTS, 0) | {"train": 12, "val": 4, "test": 5}
    replay = [caps for _, _, _, _, caps in iter_world(7, splits)]
    assert replay == [[s["raw"] for s in item["sentences"]] for item in data["images"]]
    assert "world" not in data  # the default world is not recorded (its files are unchanged)


def test_world_spec_options(tmp_path):
    from training.synthetic import WorldSpec, iter_world

    out = tmp_path / "w"
    argv = ["--out", str(out), "--seed", "1", "--train", "30", "--val", "0", "--test", "0"]
    assert main([*argv, "--colours", "red,green,blue", "--shapes", "circle,square,star", "--radii", "0.1,0.18"]) == 0
    data = json.loads((out / "dataset.json").read_text())
    assert data["world"]["colours"] == ["red", "green", "blue"] and data["world"]["radii"] == [0.1, 0.18]
    spec = WorldSpec(("red", "green", "blue"), ("circle", "square", "star"), (0.1, 0.18))
    for _, _, scene, _, _ in iter_world(1, {"train": 30}, spec):
        assert {t.colour for t in scene} <= {"red", "green", "blue"}
        assert {t.shape for t in scene} <= {"circle", "square", "star"}
    with pytest.raises(ValueError, match="unknown"):
        WorldSpec(colours=("red", "green", "teal"))
    with pytest.raises(ValueError, match="radii"):
        WorldSpec(radii=(0.2, 0.1))
