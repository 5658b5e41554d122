"""House rules that a reader would otherwise check by hand."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_model_imports_neither_service_nor_index_builder():
    offenders = {
        str(p.relative_to(REPO)): sorted(imported_modules(p) & {"service", "index_builder"})
        for p in (REPO / "model").rglob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_no_print_outside_clis():
    """Library code logs; only command-line entry points (functions named ``main``) print."""
    for path in (REPO / "model").rglob("*.py"):
        tree = ast.parse(path.read_text())
        allowed = {
            id(node)
            for fn in ast.walk(tree)
            if isinstance(fn, ast.FunctionDef) and fn.name == "main"
            for node in ast.walk(fn)
        }
        calls = [
            node.lineno
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print" and id(node) not in allowed
        ]
        assert not calls, f"{path}: print() at lines {calls}"


def test_rerank_benchmark_runs():
    """The benchmark script itself works (tiny run; its figures are recorded in docs/benchmarks.md)."""
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "rerank.py"), "--candidates", "2", "--runs", "1"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    assert "1 caption x 2 images (i2t)" in out and "scorer bfloat16" in out
    assert "straightforward vs scorer max abs difference" in out
