"""Untrusted pickles are never unpickled by default: every loader that reads a user's file refuses one that
would run code, with a clear error, and the code never runs.

The crafted files hold an object whose ``__reduce__`` is ``(os.system, ("touch SENTINEL",))``: unpickling it
creates the sentinel file. A control test proves each crafted file really does so when unpickled in full, so
a missing sentinel elsewhere means the loader refused, not that the payload was inert. Covered: the authors'
checkpoint loader (``model.load_model``, the converter CLI), training's ``--resume`` state and pretrained
weights (``--image-weights``, ``--text-weights``), and the index reader (``.npy`` files holding object arrays).
A static scan checks that no other loader in ``model/``, ``index_builder/`` or ``service/`` unpickles.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from index_format import IndexFormatError, open_index
from model import CheckpointError, HATError, UnsafeCheckpointError, load_model
from model.convert import main as convert_main
from training import TrainConfig, build_model, train
from training.synthetic import main as synthetic_main

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO / "models" / "demo"


class RunsCode:
    """Unpickling this runs a shell command that creates ``path``, as a malicious checkpoint would."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.path)}",))


def _authors_like(payload) -> dict:
    """A dictionary shaped like the authors' Lightning checkpoint, with ``payload`` among its hyperparameters."""
    t = torch.zeros(2, 2)
    state = {"vit_model.patch_embed.proj.weight": t, "text_transformer.embeddings.word_embeddings.weight": t,
             "cross_modal_image_transform.weight": t}  # fmt: skip
    return {"state_dict": state, "hyper_parameters": {"config": {}, "args": payload}, "epoch": 3}


def _write(kind: str, path: Path, sentinel: Path) -> Path:
    """A malicious file of ``kind``: torch's zip format, its legacy format, or a bare pickle."""
    if kind == "zip-ckpt":
        torch.save(_authors_like(RunsCode(sentinel)), path)
    elif kind == "legacy-pt":
        torch.save(_authors_like(RunsCode(sentinel)), path, _use_new_zipfile_serialization=False)
    elif kind == "zip-top-level":
        torch.save(RunsCode(sentinel), path)
    elif kind == "bare-pickle":
        path.write_bytes(pickle.dumps(_authors_like(RunsCode(sentinel)), protocol=2))
    else:
        raise AssertionError(kind)
    return path


TORCH_KINDS = ["zip-ckpt", "legacy-pt", "zip-top-level"]
KINDS = [*TORCH_KINDS, "bare-pickle"]


@pytest.fixture
def sentinel(tmp_path) -> Path:
    path = tmp_path / "SENTINEL"
    yield path
    assert not path.exists(), "a crafted pickle ran its code"


# ---------------------------------------------------------------------------------------------- control


@pytest.mark.parametrize("kind", KINDS)
def test_control_the_crafted_files_do_run_code_when_unpickled_in_full(kind, tmp_path):
    control = tmp_path / "CONTROL"
    path = _write(kind, tmp_path / "evil.ckpt", control)
    if kind == "bare-pickle":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, map_location="cpu", weights_only=False)
    assert control.exists()


# ----------------------------------------------------------------------------------- model checkpoints


@pytest.mark.parametrize("kind", TORCH_KINDS)
@pytest.mark.parametrize("suffix", [".ckpt", ".pt"])
def test_load_model_refuses_a_checkpoint_that_runs_code(kind, suffix, tmp_path, sentinel):
    path = _write(kind, tmp_path / f"evil{suffix}", sentinel)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_model(path)
    message = str(info.value)
    assert "arbitrary code" in message and "allow_unsafe_pickle=True" in message
    assert "posix.system" in message  # the detail names the offending global


def test_load_model_refuses_a_bare_pickle(tmp_path, sentinel):
    path = _write("bare-pickle", tmp_path / "evil.ckpt", sentinel)
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_model(path)


def test_converter_cli_refuses_a_checkpoint_that_runs_code(tmp_path, sentinel, capsys):
    path = _write("zip-ckpt", tmp_path / "evil.ckpt", sentinel)
    assert convert_main([str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--allow-unsafe-pickle" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pickle-world")
    synthetic_main(["--out", str(out), "--seed", "4", "--train", "2", "--val", "1", "--test", "0", "--size", "64"])
    return out


@pytest.fixture
def tiny_cfg(tiny_minilm_config) -> TrainConfig:
    return TrainConfig(
        preset="demo", epochs=1, batch_size=2, workers=0, val_images=1, model=tiny_minilm_config.to_dict(), amp="off"
    )


def test_training_resume_refuses_a_state_file_that_runs_code(tiny_world, tiny_cfg, tmp_path, sentinel):
    """``--resume`` reads ``OUT/last.pt``: a planted one that runs code is refused with a clear error."""
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"model": {}, "optimizer": {}, "scheduler": {}, "state": RunsCode(sentinel)}, out / "last.pt")
    with pytest.raises(HATError) as info:
        train(tiny_cfg, tiny_world / "dataset.json", tiny_world / "images", out, resume=True)
    message = str(info.value)
    assert "last.pt" in message and "posix.system" in message
    assert not (out / "best").exists()


def test_pretrained_swin_file_that_runs_code_is_refused(tiny_cfg, tmp_path, sentinel):
    path = tmp_path / "swin.pth"
    torch.save({"model": {"norm.weight": torch.zeros(2)}, "extra": RunsCode(sentinel)}, path)
    with pytest.raises(HATError, match="cannot read Swin weights"):
        build_model(tiny_cfg, str(path), None)


def test_pretrained_bert_directory_that_runs_code_is_refused(tiny_cfg, tmp_path, sentinel):
    bert = tmp_path / "bert"
    bert.mkdir()
    config = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 64, "vocab_size": 100}  # fmt: skip
    (bert / "config.json").write_text(json.dumps(config))
    torch.save({"embeddings.word_embeddings.weight": torch.zeros(100, 32), "x": RunsCode(sentinel)},
               bert / "pytorch_model.bin")  # fmt: skip
    with pytest.raises(HATError) as info:
        build_model(tiny_cfg, None, str(bert))
    assert "cannot read BERT weights" in str(info.value) and "posix.system" in str(info.value)


# ------------------------------------------------------------------------------------------ index reader


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory) -> Path:
    """A 6-image index with a PCA-compressed image store (its codebooks are .npy files too), built in-process."""
    from index_builder.build import BuildOptions, build

    out = tmp_path_factory.mktemp("pickle-index")
    synthetic_main(["--out", str(out / "world"), "--seed", "5", "--train", "0", "--val", "0", "--test", "6"])
    data = json.loads((out / "world" / "dataset.json").read_text())
    with open(out / "gallery.jsonl", "w") as fh:
        for im in data["images"]:
            line = {"id": im["filename"].rsplit(".", 1)[0], "image": f"world/images/{im['filename']}",
                    "captions": [s["raw"] for s in im["sentences"]]}  # fmt: skip
            fh.write(json.dumps(line) + "\n")
    opts = BuildOptions(store="pca:2", progress=False, workers=0, device="cpu")
    build(out / "gallery.jsonl", str(DEMO_MODEL), out / "root", opts)
    return out / "root"


# (directory, file) of every kind of .npy the reader opens: row tables, caption offsets, global vectors
# (memory-mapped), feature tables and their norms (memory-mapped), PCA codebooks.
INDEX_FILES = [
    ("version", "image_rows.npy"),
    ("version", "caption_rows.npy"),
    ("segment", "caption.offsets.npy"),
    ("segment", "image.global.npy"),
    ("segment", "caption.global.npy"),
    ("segment", "image.l1.pca.npy"),
    ("segment", "image.l2.norms.npy"),
    ("segment", "caption.l1.f16.npy"),
    ("segment", "codebook.image.l1.basis.npy"),
]


def _save_object_array(path: Path, payload) -> None:
    """``path`` becomes a .npy object array (a pickle inside) holding ``payload``."""
    array = np.empty(2, dtype=object)
    array[0] = payload
    with open(path, "wb") as fh:  # np.save appends ".npy" to a name without it; write through a handle
        np.save(fh, array, allow_pickle=True)


@pytest.mark.parametrize(("where", "name"), INDEX_FILES)
def test_index_reader_refuses_an_object_array_pickle(where, name, tiny_index, tmp_path, sentinel):
    root = tmp_path / "root"
    shutil.copytree(tiny_index, root, symlinks=True, ignore=shutil.ignore_patterns(".lock"))
    open_index(root).close()  # the copy is a good index
    version = root / "current"
    segment = root / "segments" / json.loads((version / "manifest.json").read_text())["segments"][0]
    target = (version if where == "version" else segment) / name
    assert target.is_file(), f"the test index has no {target.name}"
    control = tmp_path / "CONTROL"
    _save_object_array(target, RunsCode(control))
    np.load(target, allow_pickle=True)  # the control: a full load of the file runs the payload
    assert control.exists()
    _save_object_array(target, RunsCode(sentinel))
    with pytest.raises(IndexFormatError) as info:
        open_index(root)
    message = str(info.value)
    assert "allow_pickle=False" in message or "Python objects in dtype" in message, message
    assert (version.resolve().name if where == "version" else segment.name) in message, message


# --------------------------------------------------------------------------------------------- static scan


def _calls(tree: ast.AST):
    """(dotted name, call node, enclosing function name) of every call in ``tree``."""

    def dotted(node) -> str:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute):
            return f"{dotted(node.value)}.{node.attr}"
        return "?"

    def walk(node, function: str):
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else function
            if isinstance(child, ast.Call):
                yield dotted(child.func), child, function
            yield from walk(child, name)

    yield from walk(tree, "<module>")


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


def test_no_loader_unpickles_except_the_explicit_opt_in():
    """``torch.load`` always with ``weights_only=True`` (but in the documented opt-in), never ``pickle.load``,
    never ``np.load(allow_pickle=True)``, in the packages that read users' files."""
    problems, torch_loads, np_loads = [], 0, 0
    packages = ("model", "training", "index_format", "index_builder", "service")
    for path in sorted(p for d in packages for p in (REPO / d).rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        tree = ast.parse(path.read_text(), filename=rel)
        for name, call, function in _calls(tree):
            where = f"{rel}:{call.lineno} ({function})"
            short = name.rsplit(".", 1)[-1]
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "dill.load", "joblib.load"):
                problems.append(f"{where}: {name}")
            elif name == "torch.load":
                torch_loads += 1
                opt_in = rel == "model/checkpoint.py" and function == "_load_unsafe"
                if _keyword(call, "weights_only") is not True and not opt_in:
                    problems.append(f"{where}: torch.load without weights_only=True")
            elif name in ("np.load", "numpy.load") or (short == "load" and name.startswith("np.")):
                np_loads += 1
                if _keyword(call, "allow_pickle") not in (None, False):
                    problems.append(f"{where}: np.load with allow_pickle")
    assert not problems, problems
    assert torch_loads >= 3 and np_loads >= 5  # the scan did find the loaders


def test_the_unsafe_opt_in_is_only_reached_when_asked_for():
    """``_load_unsafe`` (full unpickling) is called from one place, under ``if not allow_unsafe_pickle: raise``."""
    source = (REPO / "model" / "checkpoint.py").read_text()
    tree = ast.parse(source)
    callers = [(call, function) for name, call, function in _calls(tree) if name == "_load_unsafe"]
    assert [function for _, function in callers] == ["read_authors_checkpoint"]
    ((call, _),) = callers
    guard = [node for node in ast.walk(tree) if isinstance(node, ast.If) and ast.unparse(node.test) ==
             "not allow_unsafe_pickle" and node.lineno < call.lineno]  # fmt: skip
    assert guard and isinstance(guard[-1].body[0], ast.Raise)
