"""``python -m service``: serve the search service with uvicorn, configured by ``HAT_*`` environment variables."""

from __future__ import annotations

import logging
import sys
import textwrap

from .settings import Settings, SettingsError, settings_markdown, settings_rows

USAGE = "usage: python -m service   (configured by HAT_* environment variables; see docs/service.md)"


def main(argv: list[str] | None = None) -> int:
    """Serve, or with ``--help`` print the usage and the settings (``--settings-markdown``: as a Markdown table)."""
    args = sys.argv[1:] if argv is None else argv
    if args:  # no options: everything is configured by the environment
        if args == ["--settings-markdown"]:
            print(settings_markdown(), end="")
            return 0
        print(help_text() if args[0] in ("-h", "--help") else USAGE)
        return 0 if args[0] in ("-h", "--help") else 2
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


def help_text() -> str:
    """The usage line and every setting: variable, type, default, what it does (from ``service.Settings``)."""
    lines = [USAGE, "", "Settings (an unset or empty variable means the default):"]
    for name, kind, default, description in settings_rows():
        lines.append(f"  {name}  ({kind}; default {default})".replace("`", ""))
        lines += textwrap.wrap(description.replace("`", ""), 100, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


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
