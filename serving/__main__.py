"""``python -m serving <command>``: the same dispatcher as the ``sim`` command
(:mod:`serving.cli.main`)."""

import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
