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


PACKAGES = ("model", "training", "index_format", "index_builder", "service")
# What each package may import of the project's packages: one direction, library first.
ALLOWED = {
    "model": set(),
    "training": {"model"},
    "index_format": {"model"},
    "index_builder": {"model", "index_format"},
    "service": {"model", "index_format"},
}


def _project_imports(path: Path) -> set[str]:
    return imported_modules(path) & set(PACKAGES)


def test_packages_import_in_one_direction():
    """model imports none of the others; the index's read side neither the builder nor the service; training
    and the service stay apart."""
    offenders = {}
    for package, allowed in ALLOWED.items():
        for path in (REPO / package).rglob("*.py"):
            extra = _project_imports(path) - allowed - {package}
            if extra:
                offenders[str(path.relative_to(REPO))] = sorted(extra)
    assert not offenders, offenders


def _imported_names(path: Path):
    """(module, name) for every ``from module import name`` with an absolute module, and every ``a.b.c``
    attribute path starting at an imported project package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                yield node.module, alias.name


def test_service_and_builder_use_only_package_fronts():
    """The service reaches model and index_format through their fronts (``from model import ...``), never a
    module inside them; the builder likewise for index_format."""
    rules = {"service": ("model", "index_format"), "index_builder": ("index_format",)}
    offenders = []
    for package, fronts in rules.items():
        for path in (REPO / package).rglob("*.py"):
            for module, _ in _imported_names(path):
                if module.split(".")[0] in fronts and module not in fronts:
                    offenders.append(f"{path.relative_to(REPO)}: from {module} import ...")
    assert not offenders, offenders


def test_benchmarks_and_tools_use_no_private_names():
    offenders = []
    for path in [*(REPO / "benchmarks").glob("*.py"), *(REPO / "tools").glob("*.py")]:
        for module, name in _imported_names(path):
            private_module = any(part.startswith("_") for part in module.split("."))
            if module.split(".")[0] in PACKAGES and (name.startswith("_") or private_module):
                offenders.append(f"{path.relative_to(REPO)}: from {module} import {name}")
    assert not offenders, offenders


def test_layering_rules_can_fail(tmp_path):
    """The import walker sees what the rules are about (a check that sees nothing passes vacuously)."""
    probe = tmp_path / "probe.py"
    probe.write_text("from index_builder.build import _manifest\nimport service\nfrom model import load_model\n")
    assert _project_imports(probe) == {"index_builder", "service", "model"}
    assert ("index_builder.build", "_manifest") in set(_imported_names(probe))


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
