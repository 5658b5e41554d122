"""Fixtures for the index builder: a small generated world as a manifest and as a folder with bad files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from builder_helpers import write_bad_files


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    """24 generated scenes with five captions each, plus ``manifest.jsonl`` in the builder's format."""
    from training.synthetic import main as synth

    out = tmp_path_factory.mktemp("world")
    synth(["--out", str(out), "--seed", "3", "--train", "0", "--val", "0", "--test", "24"])
    data = json.loads((out / "dataset.json").read_text())
    with open(out / "manifest.jsonl", "w") as fh:
        for im in data["images"]:
            stem = im["filename"].rsplit(".", 1)[0]
            captions = [s["raw"] for s in im["sentences"]]
            fh.write(json.dumps({"id": stem, "image": f"images/{im['filename']}", "captions": captions,
                                 "metadata": {"file": im["filename"]}}) + "\n")
    return out


@pytest.fixture(scope="session")
def bad_folder(world, tmp_path_factory) -> Path:
    """A folder gallery: 8 world images (with side-car captions) plus every bad and unusual file."""
    folder = tmp_path_factory.mktemp("folder")
    data = json.loads((world / "dataset.json").read_text())
    for im in data["images"][:8]:
        shutil.copy(world / "images" / im["filename"], folder / im["filename"])
        (folder / im["filename"]).with_suffix(".txt").write_text("\n".join(s["raw"] for s in im["sentences"]))
    write_bad_files(folder, world / "images" / data["images"][0]["filename"])
    return folder
