"""``python -m index_format compare A B``: which fields of two published indexes differ."""

import sys

from .compare import main

if __name__ == "__main__":
    sys.exit(main())
