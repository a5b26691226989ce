"""``python -m sim_cli <command>``: the same as ``sim <command>``."""

import sys

from .main import main

if __name__ == "__main__":
    sys.exit(main())
