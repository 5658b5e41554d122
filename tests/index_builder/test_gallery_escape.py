"""Gallery paths cannot escape the gallery root: ``..``, absolute paths, symbolic links, encoded slashes.

The gallery root is the scanned folder, or the folder holding the manifest. Inputs that resolve (after every
symbolic link) outside it are skipped with a reason unless ``--allow-outside-root`` is given; ids stay opaque
strings. Real files and links on disk; the last test runs the real ``python -m index_builder`` twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from builder_helpers import DEMO_MODEL, run_cli
from PIL import Image

from index_builder import open_index
from index_builder.gallery import FOLDER_LINK, LINK_LOOP, OUTSIDE_FOLDER, read_gallery, read_manifest, scan_folder

OUTSIDE_MANIFEST = "leads outside the gallery root"


def _png(path: Path, colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (48, 40), colour).save(path)
    return path


@pytest.fixture
def tree(tmp_path) -> dict[str, Path]:
    """``tmp/outside.png``, ``tmp/outside_dir/a.png``, ``tmp/secret.txt``, ``tmp/gallery-evil/a.png`` (all
    outside) and ``tmp/gallery/`` (the root) with an image, links in and out, a link loop and a literal
    ``..%2Foutside.png`` file."""
    outside = _png(tmp_path / "outside.png", (0, 0, 255))
    _png(tmp_path / "outside_dir" / "a.png")
    _png(tmp_path / "gallery-evil" / "a.png")  # shares the root's name as a prefix
    (tmp_path / "secret.txt").write_text("the secret caption\n")
    root = tmp_path / "gallery"
    ok = _png(root / "images" / "ok.png")
    (root / "link_out.png").symlink_to("../outside.png")
    (root / "link_in.png").symlink_to("images/ok.png")
    (root / "linkdir_out").symlink_to("../outside_dir", target_is_directory=True)
    (root / "loop.png").symlink_to("loop.png")
    literal = _png(root / "..%2Foutside.png", (0, 255, 0))  # a file name with '%', '2', 'F' in it
    return {"tmp": tmp_path, "root": root, "ok": ok, "outside": outside, "literal": literal}


def _write_manifest(root: Path, entries: list[tuple[str, str]]) -> Path:
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"id": i, "image": image, "captions": [f"c {i}"]}) + "\n"
                                for i, image in entries))
    return manifest


def _manifest_entries(tree) -> list[tuple[str, str]]:
    root, tmp = tree["root"], tree["tmp"]
    return [
        ("ok", "images/ok.png"),
        ("dotdot", "../outside.png"),
        ("deep", "images/../../outside.png"),
        ("abs-out", str(tmp / "outside.png")),
        ("abs-in", str(root / "images" / "ok.png")),  # absolute but inside: fine (tests/service writes these)
        ("link-out", "link_out.png"),
        ("link-in", "link_in.png"),
        ("via-linkdir", "linkdir_out/a.png"),
        ("prefix", "../gallery-evil/a.png"),
        ("loop", "loop.png"),
        ("enc", "..%2Foutside.png"),
        ("enc-deep", "images/..%2F..%2Foutside.png"),
        ("enc-dots", "%2e%2e/outside.png"),
        ("sneaky", "images/../images/ok.png"),
        ("../../etc/passwd", "images/ok.png"),  # an id is an opaque string, never a path
    ]


ESCAPING = {"dotdot", "deep", "abs-out", "link-out", "via-linkdir", "prefix"}


def test_manifest_paths_must_stay_inside_the_manifest_folder(tree):
    root = tree["root"].resolve()
    manifest = _write_manifest(tree["root"], _manifest_entries(tree))
    items, skipped = read_manifest(manifest)
    by_id = {it.id: it for it in items}
    reasons = {s.id: s.reason for s in skipped}
    assert set(reasons) == ESCAPING | {"loop"}, reasons
    for item_id in ESCAPING:
        assert OUTSIDE_MANIFEST in reasons[item_id] and "--allow-outside-root" in reasons[item_id], reasons[item_id]
    assert LINK_LOOP in reasons["loop"]
    assert all(s.source.startswith("manifest.jsonl:") for s in skipped)
    # Everything kept resolves inside the root; nothing kept names the outside file.
    assert set(by_id) == {"ok", "abs-in", "link-in", "enc", "enc-deep", "enc-dots", "sneaky", "../../etc/passwd"}
    for item in items:
        assert Path(item.path).is_relative_to(root), item
        assert Path(item.path) != tree["outside"].resolve()
    ok = str(tree["ok"].resolve())
    assert by_id["abs-in"].path == by_id["link-in"].path == by_id["sneaky"].path == ok
    assert by_id["../../etc/passwd"].path == ok and by_id["../../etc/passwd"].captions == ["c ../../etc/passwd"]
    # Encoded slashes are not decoded: the literal file, or a literal (missing) name under the root.
    assert by_id["enc"].path == str(tree["literal"].resolve())
    assert by_id["enc-deep"].path == str(root / "images" / "..%2F..%2Foutside.png")
    assert by_id["enc-dots"].path == str(root / "%2e%2e" / "outside.png")
    # An escaping line claims no id: a later line with the same id and an inside path is kept.
    lines = [*_manifest_entries(tree), ("dotdot", "images/ok.png")]
    items, _ = read_manifest(_write_manifest(tree["root"], lines))
    assert [it.path for it in items if it.id == "dotdot"] == [ok]


def test_allow_outside_root_lets_a_trusted_manifest_point_elsewhere(tree):
    tmp = tree["tmp"].resolve()
    manifest = _write_manifest(tree["root"], _manifest_entries(tree))
    items, skipped = read_gallery(manifest, allow_outside_root=True)
    by_id = {it.id: it for it in items}
    assert [s.id for s in skipped] == ["loop"]  # a link loop never resolves
    assert set(by_id) >= ESCAPING
    for item_id in ("dotdot", "deep", "abs-out", "link-out"):
        assert by_id[item_id].path == str(tmp / "outside.png")
    assert by_id["via-linkdir"].path == str(tmp / "outside_dir" / "a.png")
    assert by_id["prefix"].path == str(tmp / "gallery-evil" / "a.png")
    assert by_id["enc"].path == str(tree["literal"].resolve())  # still literal, never decoded


def test_folder_scan_links_in_and_out(tree):
    tmp, folder = tree["tmp"], tree["tmp"] / "folder"
    _png(folder / "a.png")
    (folder / "a.txt").write_text("a caption inside\n")
    _png(folder / "sub" / "b.png")
    (folder / "link_in.png").symlink_to("a.png")
    (folder / "link_out.png").symlink_to("../outside.png")
    (folder / "dangling_out.png").symlink_to("../no-such-file.png")
    (folder / "linkdir_out").symlink_to("../outside_dir", target_is_directory=True)
    (folder / "linkdir_in").symlink_to("sub", target_is_directory=True)
    (folder / "loop.png").symlink_to("loop.png")
    _png(folder / "c.png")
    (folder / "c.txt").symlink_to("../secret.txt")  # a side-car caption file leading outside
    items, skipped = scan_folder(folder)
    by_id = {it.id: it for it in items}
    reasons = {s.source: s.reason for s in skipped}
    assert set(by_id) == {"a.png", "c.png", "link_in.png", "sub/b.png"}
    assert by_id["link_in.png"].path == str((folder / "a.png").resolve())
    assert by_id["a.png"].captions == ["a caption inside"]
    assert by_id["c.png"].captions == []  # the secret's text is not read
    assert reasons == {
        "link_out.png": OUTSIDE_FOLDER,
        "dangling_out.png": OUTSIDE_FOLDER,
        "linkdir_out": OUTSIDE_FOLDER,  # one entry: the linked folder is not descended into
        "linkdir_in": FOLDER_LINK,  # its target is scanned where it lies (sub/b.png)
        "loop.png": LINK_LOOP,
        "c.txt": f"caption file: {OUTSIDE_FOLDER}",
    }
    assert all(Path(it.path).is_relative_to(folder.resolve()) for it in items)
    # The option admits linked files outside the folder (and side-cars), still never descends into folders.
    items, skipped = scan_folder(folder, allow_outside_root=True)
    by_id = {it.id: it for it in items}
    assert by_id["link_out.png"].path == str((tmp / "outside.png").resolve())
    assert by_id["c.png"].captions == ["the secret caption"]
    assert "dangling_out.png" in by_id  # admitted here; the encoder then reports the missing file
    assert {s.source: s.reason for s in skipped} == {
        "linkdir_out": FOLDER_LINK, "linkdir_in": FOLDER_LINK, "loop.png": LINK_LOOP,
    }
    assert not any(i.startswith("linkdir_") for i in by_id)


def test_cli_skips_an_escaping_path_and_the_option_admits_it(tree):
    root, tmp = tree["root"], tree["tmp"]
    manifest = _write_manifest(root, [("in", "images/ok.png"), ("out", "../outside.png"),
                                      ("abs-out", str(tmp / "outside.png"))])
    base = ["build", "--gallery", str(manifest), "--model", str(DEMO_MODEL), "--workers", "0", "--device", "cpu"]
    proc = run_cli(*base, "--out", str(tmp / "strict"))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["indexed"] == 1 and summary["skipped"] == 2, summary
    assert OUTSIDE_MANIFEST in proc.stderr
    index = open_index(tmp / "strict")
    assert [m["id"] for m in index.images(range(index.num_images))] == ["in"]
    assert {s["id"] for s in index.manifest["skipped"]} == {"out", "abs-out"}
    assert index.manifest["options"]["allow_outside_root"] is False
    index.close()
    proc = run_cli(*base, "--out", str(tmp / "trusted"), "--allow-outside-root")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["indexed"] == 3 and summary["skipped"] == 0, summary
    index = open_index(tmp / "trusted")
    assert {m["id"] for m in index.images(range(index.num_images))} == {"in", "out", "abs-out"}
    assert index.manifest["options"]["allow_outside_root"] is True
    index.close()
    help_text = run_cli("build", "--help").stdout
    assert "--allow-outside-root" in " ".join(help_text.split()) and "trusted manifest" in " ".join(help_text.split())


def test_manifest_next_to_its_images_via_a_linked_folder_still_works(tmp_path):
    """A gallery root reached through a symbolic link (e.g. /data -> /mnt/disk) keeps its relative paths."""
    real = tmp_path / "disk" / "gallery"
    _png(real / "images" / "x.png")
    (tmp_path / "data").symlink_to(real.parent, target_is_directory=True)
    manifest = _write_manifest(tmp_path / "data" / "gallery", [("x", "images/x.png"),
                                                                ("abs", str(tmp_path / "data/gallery/images/x.png"))])
    items, skipped = read_manifest(manifest)
    assert not skipped and [it.id for it in items] == ["x", "abs"]
    assert os.path.samefile(items[0].path, real / "images" / "x.png")
