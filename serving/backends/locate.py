"""Which model a path names: every file and folder that training and export write.

:func:`locate_model` turns what a user passes as a model (``--model`` of every command,
``Segmenter.load``) into one file and the backend that reads it:

- ``x.safetensors``: a checkpoint (PyTorch);
- ``x.auto.onnx`` / ``x.prompt.onnx`` / ``x.int8.auto.onnx`` or the sidecar ``x.json`` /
  ``x.int8.json``: that export, through ONNX Runtime;
- ``x.auto.engine`` / ``.plan`` / ``.trt``: that export's TensorRT engines;
- a folder: the export in it (its sidecar); with several, the only fp32 one (the others are
  loaded through their own ``.json``); without an export, its only ``.safetensors``.

Anything else is one :class:`~serving.errors.InputError` in one wording (:func:`model_error`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

from ..errors import InputError

#: The ``format`` of an export sidecar (:mod:`serving.backends.exported`).
SIDECAR_FORMAT = "sim-condinst-export"

#: What a model path may be, as every error about one says it.
ACCEPTED = ("pass a .safetensors checkpoint, an exported .onnx graph or its .json sidecar, an "
            "export folder, or a TensorRT .engine")
#: The ``--model`` help of every command.
MODEL_HELP = (".safetensors checkpoint, exported .onnx or its .json sidecar, export folder, or "
              "TensorRT .engine")
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
#: Sidecars larger than this are not opened while choosing among a folder's files.
_MAX_SIDECAR_BYTES = 16 << 20


class ModelPath(NamedTuple):
    """A located model: ``path`` (a file) and ``kind``: "checkpoint", "onnx" or "tensorrt"."""

    path: Path
    kind: str


def model_error(path: str | os.PathLike, reason: str) -> InputError:
    """The one error about a model path: ``model PATH: REASON; pass ...`` (one line)."""
    return InputError(f"model {path}: {reason}; {ACCEPTED}")


def locate_model(path: str | os.PathLike) -> ModelPath:
    """The model file ``path`` names and its kind (see the module docstring)."""
    given = Path(path)
    found = _in_folder(given) if given.is_dir() else given
    suffix = found.suffix.lower()
    kind = {".safetensors": "checkpoint", ".onnx": "onnx", ".json": "onnx",
            **dict.fromkeys(ENGINE_SUFFIXES, "tensorrt")}.get(suffix)
    if suffix in (".pt", ".pth"):
        raise model_error(path, f"PyTorch pickle files ({suffix}) are not loaded (unpickling "
                                "can run code)")
    if kind is None:
        raise model_error(path, f"unknown file type '{suffix}'")
    if not found.is_file():
        raise model_error(path, "file not found" if not found.exists() else "not a file")
    return ModelPath(found, kind)


def _sidecar_precision(path: Path) -> str | None:
    """The precision a JSON file declares when it is an export sidecar, else ``None``."""
    try:
        if path.stat().st_size > _MAX_SIDECAR_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        return None
    return str(data.get("precision", "fp32"))


def _in_folder(folder: Path) -> Path:
    """The one model of an export or run folder (rule in the module docstring)."""
    sidecars = {p: _sidecar_precision(p) for p in sorted(folder.glob("*.json"))
                if ".verify." not in p.name}
    sidecars = {p: prec for p, prec in sidecars.items() if prec is not None}
    fp32 = [p for p, prec in sidecars.items() if prec == "fp32"]
    if len(sidecars) == 1 or len(fp32) == 1:
        return next(iter(sidecars)) if len(sidecars) == 1 else fp32[0]
    if sidecars:
        names = ", ".join(p.name for p in sidecars)
        raise model_error(folder, f"the folder holds {len(sidecars)} exports ({names}) and no "
                                  "single fp32 one; pass the .json of the one to load")
    checkpoints = sorted(folder.glob("*.safetensors"))
    if len(checkpoints) == 1:
        return checkpoints[0]
    what = (f"{len(checkpoints)} checkpoints ({', '.join(p.name for p in checkpoints)})"
            if checkpoints else "no model file")
    raise model_error(folder, f"the folder holds {what}; pass the file to load")
