"""``sim <command>``: the product's one command, the front door above every package.

It lists every command: those of the library (``predict``, ``label``, ``serve``, ``info``,
from :mod:`serving.cli.dispatch`, which ``python -m serving`` runs too) and those above it
(``train``, ``eval``, ``export``, ``app``, ``quickstart``). Each is imported inside a function
only when its command runs, so ``sim predict`` needs nothing of training, export or the app,
and the imports stay visible to tools and to ``tests/test_import_boundaries.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

from serving.cli.dispatch import COMMANDS as SERVING_COMMANDS
from serving.cli.dispatch import Command, CommandMain, dispatch


def _train() -> CommandMain:
    from training.train import main

    return main


def _evaluate() -> CommandMain:
    from training.evaluate import main

    return main


def _export() -> CommandMain:
    from export.__main__ import main

    return main


def _app() -> CommandMain:
    from app.launch import main

    return main


def _quickstart() -> CommandMain:
    from training.quickstart import main

    return main


COMMANDS: dict[str, Command] = {
    "train": Command(_train, "train a segmenter from box (or mask) annotations", "train"),
    "eval": Command(_evaluate, "COCO mask and box AP of a model on a dataset", "train"),
    "export": Command(_export, "export to ONNX / TensorRT and verify against PyTorch",
                      "export"),
    "predict": SERVING_COMMANDS["predict"],
    "label": SERVING_COMMANDS["label"],
    "serve": SERVING_COMMANDS["serve"],
    "app": Command(_app, "web app: upload an image, draw boxes, get masks", "app"),
    "info": SERVING_COMMANDS["info"],
    "quickstart": Command(_quickstart,
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sim <command> [options]``; returns the command's exit code."""
    return dispatch("sim", COMMANDS, argv, EXAMPLES)
