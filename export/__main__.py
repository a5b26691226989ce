"""``python -m export``: see :mod:`export.cli`. Bad input prints ``error: <message>``, exit 1."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from serving.errors import SimError


def main(argv: Sequence[str] | None = None, prog: str = "python -m export") -> int:
    """``sim export``: :func:`export.cli.main` with bad input as one ``error:`` line."""
    from .cli import main as cli_main

    try:
        return int(cli_main(argv, prog) or 0)
    except SimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
