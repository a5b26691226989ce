"""``python -m serving <command>``: predict | label | serve | info.

Each sub-command lives in its own module and is imported only when used.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .errors import SimError

COMMANDS = {
    "predict": ("serving.cli.predict", "batch inference on images (automatic or box-prompted)"),
    "label": ("serving.cli.label", "auto-label a box-only COCO dataset with masks"),
    "serve": ("serving.server.app", "HTTP inference server with dynamic batching"),
    "info": ("serving.cli.info", "describe a model file"),
}


def _usage() -> str:
    lines = ["usage: python -m serving <command> [options]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"error: unknown command '{name}'\n{_usage()}", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except SimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
