"""``python -m serving <command>``: the library's commands (predict, label, serve, info) through
the dispatcher of :mod:`serving.cli.dispatch`; ``sim`` (:mod:`sim_cli.main`) runs these and
the rest."""

import sys

from .cli.dispatch import main

if __name__ == "__main__":
    sys.exit(main())
