"""``python -m training`` / ``accelerate launch -m training``: see :mod:`training.train`."""

import sys

from .train import main

if __name__ == "__main__":
    sys.exit(main())
