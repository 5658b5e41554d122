"""``python -m service``: serve the search service with uvicorn, configured by ``HAT_*`` environment variables."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap

from .settings import Settings, SettingsError, settings_markdown, settings_rows

DESCRIPTION = """\
Serves the search API and page (FastAPI under uvicorn). Every setting comes from a HAT_* environment
variable (listed below with its default), none from the command line. Endpoints, errors and decisions:
docs/service.md."""
EXAMPLES = (
    "HAT_INDEX_ROOT=indexes/demo python -m service    # the bundled demo model on http://127.0.0.1:8000/",
    "HAT_INDEX_ROOT=indexes/photos HAT_MODEL=models/mine HAT_HOST=0.0.0.0 HAT_PORT=8080 \\\n"
    "    HAT_RERANK_DTYPE=bfloat16 python -m service",
)


def build_parser() -> argparse.ArgumentParser:
    """``--help`` (usage, every setting from ``service.Settings``, examples) and ``--settings-markdown``."""
    parser = argparse.ArgumentParser(
        prog="python -m service", usage="%(prog)s   (configured by HAT_* environment variables)",
        description=DESCRIPTION, epilog=settings_text() + "\n\n" + examples_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument(
        "--settings-markdown", action="store_true",
        help="print the settings as the Markdown table kept in docs/service.md, and exit",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    """Serve, or with ``--help`` print the usage and the settings (``--settings-markdown``: as a Markdown table)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.settings_markdown:
        print(settings_markdown(), end="")
        return 0
    try:
        settings = Settings.from_env()
        settings.resolved_device()
    except SettingsError as exc:
        print(f"service: invalid configuration: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from .app import create_app

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, **server_options(settings))
    return 0


def settings_text() -> str:
    """Every setting: variable, type, default, what it does (from ``service.Settings``)."""
    lines = ["settings (an unset or empty variable means the default):"]
    for name, kind, default, description in settings_rows():
        lines.append(f"  {name}  ({kind}; default {default})".replace("`", ""))
        lines += textwrap.wrap(description.replace("`", ""), 100, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def examples_text() -> str:
    lines = [line for example in EXAMPLES for line in example.splitlines()]
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


# The request line and headers together may not exceed this; a longer head is answered 400 and the connection
# closed. (uvicorn's httptools parser has no such limit: measured, it buffered a 50 MB header and answered 200.)
MAX_HEAD_BYTES = 64 * 1024


def server_options(settings) -> dict:
    """uvicorn options of the service (also used by the tests' live servers): the h11 HTTP parser, whose
    incomplete-event limit caps the size of a request head, and no proxy or server headers."""
    return {
        "http": "h11",
        "h11_max_incomplete_event_size": MAX_HEAD_BYTES,
        "log_level": settings.log_level,
        "proxy_headers": False,
        "server_header": False,
    }


if __name__ == "__main__":
    sys.exit(main())
