"""``python -m service``: serve the search service with uvicorn, configured by ``HAT_*`` environment variables."""

from __future__ import annotations

import logging
import sys

from .settings import Settings, SettingsError


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args:  # no options: everything is configured by the environment
        print("usage: python -m service   (configured by HAT_* environment variables; see docs/service.md)")
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
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        proxy_headers=False,
        server_header=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
