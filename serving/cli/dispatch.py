"""``python -m serving <command>``: the library's own commands (predict, label, serve, info),
and the dispatcher that the product's ``sim`` command (:mod:`sim_cli.main`) shares.

Each command is a module with ``main(argv, prog) -> exit code`` (``prog``: the name its
``--help`` shows). A :class:`Command` imports its module inside a function, only when the
command runs, so ``sim predict`` needs nothing of the server, training, export or the app.
The commands that live above the library (``train``, ``eval``, ``export``, ``app``,
``quickstart``) are listed only by the front door, :mod:`sim_cli.main`: this package never
imports them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import SimError


class CommandMain(Protocol):
    """A command's entry: ``main(argv, prog)`` returns the exit code."""

    def __call__(self, argv: Sequence[str] | None = ..., prog: str = ...) -> int | None: ...


@dataclass(frozen=True)
class Command:
    """A sub-command: ``load()`` imports its module and returns its ``main``, a one-line
    summary, and the install extra it needs beyond the core package ("" for none; named in
    the error when an import fails)."""

    load: Callable[[], CommandMain]
    summary: str
    extra: str


def _predict() -> CommandMain:
    from .predict import main

    return main


def _label() -> CommandMain:
    from .label import main

    return main


def _serve() -> CommandMain:
    from ..server.app import main

    return main


def _info() -> CommandMain:
    from .info import main

    return main


#: The commands of ``python -m serving`` (``sim`` lists them too, after training's).
COMMANDS: dict[str, Command] = {
    "predict": Command(_predict, "segment images: automatic, or one mask per box", ""),
    "label": Command(_label, "auto-label a box dataset (COCO, YOLO, Label Studio) with masks", ""),
    "serve": Command(_serve, "HTTP inference server with dynamic batching", "serve"),
    "info": Command(_info, "describe a model file (classes, sizes, thresholds)", ""),
}

EXAMPLES = """\
examples:
  python -m serving predict --model model.onnx --input photos/ --output out/ --save-vis
  python -m serving serve --model model.onnx --port 8000

The 'sim' command runs these and also train, eval, export, app and quickstart."""


def usage(program: str, commands: Mapping[str, Command], examples: str) -> str:
    """The text of ``<program> --help``: one line per command, then ``examples``."""
    lines = [f"usage: {program} <command> [options]", "",
             "Box-supervised instance segmentation (CondInst + SIM): train from boxes, deploy "
             "masks.", "", "commands:"]
    lines += [f"  {name:<11} {cmd.summary}" for name, cmd in commands.items()]
    return "\n".join(lines + ["", examples])


def _load(program: str, name: str, cmd: Command) -> CommandMain:
    """Import a command's module; a missing optional dependency becomes a one-line error."""
    try:
        return cmd.load()
    except ModuleNotFoundError as exc:
        missing = exc.name or "a module"
        project = missing.split(".")[0] in ("training", "export", "app", "serving", "sim_cli")
        extra = f"[{cmd.extra}]" if cmd.extra else ""
        fix = ("install the project from a source checkout (pip install -e '.[all]')" if project
               else f"pip install 'sim-boxseg{extra}'")
        raise SimError(f"{program} {name}: needs {missing}, which is not installed; "
                       f"{fix}") from None


def dispatch(program: str, commands: Mapping[str, Command], argv: Sequence[str] | None,
             examples: str) -> int:
    """Run ``<program> <command> [options]`` from ``commands``; returns the exit code (2 for
    an unknown command, 1 for a :class:`SimError`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage(program, commands, examples))
        return 0
    name, rest = args[0], args[1:]
    if name not in commands:
        import difflib

        close = difflib.get_close_matches(name, list(commands), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"error: unknown command '{name}'{hint}; '{program} --help' lists the commands",
              file=sys.stderr)
        return 2
    try:
        return int(_load(program, name, commands[name])(rest, prog=f"{program} {name}") or 0)
    except SimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m serving <command> [options]``; returns the command's exit code."""
    return dispatch("python -m serving", COMMANDS, argv, EXAMPLES)
