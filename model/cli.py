"""Help of the project's commands: :class:`CommandParser`, an ``argparse.ArgumentParser`` whose help shows every
option's default, keeps the description's layout, turns reST literals into plain text and ends with examples.

Every command (``python -m training.train``, ``python -m index_builder build``, ...) builds its parser with
it in a ``build_parser()`` function; tests/test_cli_help.py walks them all.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable

_ROLE = re.compile(r":[a-z]+:`([^`]+)`")  # :mod:`training.loop` -> `training.loop`
_LITERAL = re.compile(r"``([^`]+)``")  # ``x`` -> `x`
_NO_DEFAULT_SHOWN = (argparse._StoreConstAction, argparse._HelpAction, argparse._VersionAction)


def plain(text: str) -> str:
    """``text`` with reST literals (````x````) and roles (``:mod:`x```) written as `x`."""
    return _LITERAL.sub(r"`\1`", _ROLE.sub(r"`\1`", text))


def describe(doc: str) -> str:
    """A module docstring as a command's description: without its indented command-line paragraphs (the
    examples say those)."""
    paragraphs = doc.strip("\n").split("\n\n")
    return "\n\n".join(p for p in paragraphs if not p.startswith("    python -m"))


def shows_default(action: argparse.Action) -> bool:
    """Whether the help of ``action`` must state a default: an option that takes a value and has one."""
    if isinstance(action, _NO_DEFAULT_SHOWN) or action.required or action.nargs == 0:
        return False  # flags (store_true/false are store-const) are off unless given
    if action.default is None or action.default is argparse.SUPPRESS:
        return False
    return bool(action.option_strings) or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Description and epilog as written (examples stay on their lines); every option with a default says it,
    unless its help already does (``(default: one per GPU)``)."""

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain(text))

    def _get_help_string(self, action: argparse.Action) -> str:
        text = plain(action.help or "")
        if shows_default(action) and "default" not in text:
            text += " (default: %(default)s)"
        return text


class CommandParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with :class:`HelpFormatter`: the description may be a module docstring
    (:func:`describe`), and ``examples`` (command lines, one per item) end the help. Subcommands made with
    ``add_subparsers().add_parser(...)`` are ``CommandParser`` too."""

    def __init__(self, *args, examples: Iterable[str] = (), **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        if kwargs.get("description"):
            kwargs["description"] = describe(kwargs["description"])
        lines = [line for example in examples for line in example.splitlines()]
        if lines:
            block = "examples:\n" + "\n".join(f"  {line}" for line in lines)
            kwargs["epilog"] = f"{kwargs['epilog']}\n\n{block}" if kwargs.get("epilog") else block
        super().__init__(*args, **kwargs)
