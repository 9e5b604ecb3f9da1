"""`python -m shards`: write, verify and inspect shards (see shards/README.md)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
