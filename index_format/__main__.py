"""``python -m index_format compare A B``: which fields of two published indexes differ."""

import sys

from .compare import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
