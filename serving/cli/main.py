"""``sim <command>``: the product's one command (``python -m serving <command>`` is the same).

Each command is a module with ``main(argv) -> exit code``; the module is imported only when
its command runs, so ``sim predict`` needs nothing of training, export or the app. The
commands that live above the library (``train``, ``eval``, ``quickstart``, ``export``, ``app``)
are named here by module path and loaded by name: the library's own code never imports them.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass

from ..errors import SimError


@dataclass(frozen=True)
class Command:
    """A sub-command: the module whose ``main(argv)`` runs it, a one-line summary, and the
    install extra it needs beyond the core package ("" for none; named in the error when an
    import fails)."""

    module: str
    summary: str
    extra: str


COMMANDS: dict[str, Command] = {
    "train": Command("training.train", "train a segmenter from box (or mask) annotations",
                     "train"),
    "eval": Command("training.evaluate", "COCO mask and box AP of a model on a dataset", "train"),
    "export": Command("export.__main__", "export to ONNX / TensorRT and verify against PyTorch",
                      "export"),
    "predict": Command("serving.cli.predict", "segment images: automatic, or one mask per box",
                       ""),
    "label": Command("serving.cli.label", "auto-label a box-only COCO dataset with masks", ""),
    "serve": Command("serving.server.app", "HTTP inference server with dynamic batching", "serve"),
    "app": Command("app.main", "web app: upload an image, draw boxes, get masks", "app"),
    "info": Command("serving.cli.info", "describe a model file (classes, sizes, thresholds)", ""),
    "quickstart": Command("training.quickstart",
                          "train, evaluate, export and predict on the built-in data", "all"),
}

EXAMPLES = """\
examples:
  sim quickstart                                   # the whole path on the built-in data
  sim train --config configs/quickstart_cpu.yaml --preset sim_bg
  sim eval --model runs/quickstart/model_final.safetensors \\
      --annotations data/synthetic/val.json --images data/synthetic/images
  sim export --model runs/quickstart/model_final.safetensors --verify img.png
  sim predict --model model.onnx --input photos/ --output out/ --save-vis
  sim label --model model.safetensors --annotations boxes.json --images imgs/ \\
      --output labelled.json
  sim serve --model model.onnx --port 8000
  sim app --model model.safetensors

'sim <command> --help' shows a command's options and examples."""

#: The name a command's parser shows (``sim train`` when run through this dispatcher).
_INVOKED_AS: ContextVar[str | None] = ContextVar("sim_invoked_as", default=None)


def prog(default: str) -> str:
    """A command's program name for its ``--help``: ``sim <command>`` when it runs through
    ``sim``, else ``default`` (for example ``python -m training``)."""
    return _INVOKED_AS.get() or default


def usage() -> str:
    """The text of ``sim --help``: one line per command, then examples."""
    lines = ["usage: sim <command> [options]", "",
             "Box-supervised instance segmentation (CondInst + SIM): train from boxes, deploy "
             "masks.", "", "commands:"]
    lines += [f"  {name:<11} {cmd.summary}" for name, cmd in COMMANDS.items()]
    return "\n".join(lines + ["", EXAMPLES])


def _load(name: str):
    """Import a command's module; a missing optional dependency becomes a one-line error."""
    cmd = COMMANDS[name]
    try:
        return importlib.import_module(cmd.module)
    except ModuleNotFoundError as exc:
        missing = exc.name or "a module"
        project = missing.split(".")[0] in ("training", "export", "app", "serving")
        extra = f"[{cmd.extra}]" if cmd.extra else ""
        fix = ("install the project from a source checkout (pip install -e '.[all]')" if project
               else f"pip install 'sim-boxseg{extra}'")
        raise SimError(f"sim {name}: needs {missing}, which is not installed; {fix}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sim <command> [options]``; returns the command's exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"error: unknown command '{name}'{hint}; 'sim --help' lists the commands",
              file=sys.stderr)
        return 2
    token = _INVOKED_AS.set(f"sim {name}")
    try:
        return int(_load(name).main(rest) or 0)
    except SimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        _INVOKED_AS.reset(token)
