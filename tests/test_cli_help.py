"""Every command's help: each option explained, with its default where it has one; plain text (no reST
literals); examples at the end. ``python -m service --help`` lists every ``HAT_*`` setting."""

from __future__ import annotations

import argparse
import ast
import importlib
from pathlib import Path

import pytest

from model.cli import shows_default
from service.settings import Settings, env_name, settings_rows

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "training", "index_format", "index_builder", "service")


def _is_command(path: Path) -> bool:
    """A ``__main__.py``, or a module with an ``if __name__ == "__main__":`` block."""
    if path.name == "__main__.py":
        return True
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            names = {getattr(n, "id", None) for n in (node.test.left, *node.test.comparators)}
            values = {getattr(n, "value", None) for n in node.test.comparators}
            if "__name__" in names and "__main__" in values:
                return True
    return False


def _command_modules() -> dict[str, str]:
    """``{command: module}`` of every ``python -m`` command in the packages: ``index_builder`` ->
    ``index_builder.__main__``, ``training.train`` -> ``training.train``."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if _is_command(path):
                module = ".".join(path.relative_to(REPO).with_suffix("").parts)
                found[module.removesuffix(".__main__")] = module
    return found


COMMANDS = _command_modules()


def _parsers(parser: argparse.ArgumentParser):
    """``parser`` and its subcommands' parsers, depth first."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from _parsers(sub)


def test_the_commands_are_found():
    assert {"training.train", "index_builder", "service", "model.convert"} <= set(COMMANDS), COMMANDS


@pytest.mark.parametrize("module", sorted(COMMANDS.values()))
def test_help_explains_every_option_with_its_default_and_ends_with_examples(module):
    """For the command and each of its subcommands. A command's module defines ``build_parser()``
    (``model.CommandParser`` gives this layout)."""
    build_parser = getattr(importlib.import_module(module), "build_parser", None)
    assert callable(build_parser), f"{module} has no build_parser()"
    for parser in _parsers(build_parser()):
        _check_help(parser)


def _check_help(parser: argparse.ArgumentParser) -> None:
    text = parser.format_help()
    assert "``" not in text and ":mod:`" not in text and ":func:`" not in text, text
    last = text.rstrip().split("\n\n")[-1]
    assert last.startswith("examples:\n  python -m") or last.startswith("examples:\n  HAT_"), (parser.prog, last)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{parser.prog} {name}: no help"
        shown = formatter._expand_help(action)
        if shows_default(action):
            assert "default" in shown, f"{parser.prog} {name}: the help does not say the default: {shown!r}"
            if "default" not in action.help:  # the formatter added it: the value itself
                assert f"(default: {action.default})" in shown, shown


def test_subcommands_have_their_own_examples():
    """``python -m index_builder build --help`` shows build's examples, not only the top-level ones."""
    parser = importlib.import_module("index_builder.__main__").build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, child in sub.choices.items():
        assert f"python -m index_builder {name} " in child.format_help().split("examples:")[-1], name


def test_service_help_lists_every_setting_with_its_default_and_description():
    text = importlib.import_module("service.__main__").build_parser().format_help()
    assert text.startswith("usage: python -m service")
    for name, field in Settings.model_fields.items():
        assert field.description, f"{env_name(name)} has no description (service/settings.py)"
        assert f"  {env_name(name)}  (" in text
    for name, kind, default, _ in settings_rows():
        assert f"  {name}  ({kind}; default {default})".replace("`", "") in text
    assert "  HAT_PORT  (integer 0–65535; default 8000)" in text
    assert "The port `python -m service` listens on.".replace("`", "") in text
