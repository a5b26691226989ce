"""Self-describing inference checkpoints (safetensors + JSON metadata).

A checkpoint file holds the network weights as safetensors and, in the safetensors metadata,
the format name and version, the ``ModelConfig``, the ``InferenceConfig`` and the class names.
Loading never unpickles Python objects. Files are written atomically (temp file + rename).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import InferenceConfig, ModelConfig, config_to_dict
from ..errors import CheckpointError
from ..files import atomic_write
from . import CondInst, build_condinst
from .metadata import model_description, parse_json

FORMAT_NAME = "sim-condinst"
FORMAT_VERSION = 1


@dataclass
class CheckpointInfo:
    """What a checkpoint says about itself."""

    model: ModelConfig
    inference: InferenceConfig
    class_names: tuple[str, ...]
    format_version: int
    extra: dict[str, Any]




def save_checkpoint(path: str | os.PathLike, model: CondInst, model_cfg: ModelConfig,
                    class_names: list[str] | tuple[str, ...],
                    inference_cfg: InferenceConfig | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s weights and its description to ``path`` (``.safetensors``)."""
    if len(class_names) != model_cfg.num_classes:
        raise CheckpointError(
            f"{len(class_names)} class names given for num_classes={model_cfg.num_classes}"
        )
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "model_config": json.dumps(config_to_dict(model_cfg)),
        "inference_config": json.dumps(config_to_dict(inference_cfg or InferenceConfig())),
        "class_names": json.dumps(list(class_names)),
        "extra": json.dumps(extra or {}),
    }
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))
    return Path(path)


def read_checkpoint_info(path: str | os.PathLike) -> CheckpointInfo:
    """Read only the description of a checkpoint (fast: no weights are loaded)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file not found; check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path}: not a valid .safetensors checkpoint ({exc}); it may be "
            "truncated or of another format"
        ) from None
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"checkpoint {path}: missing the '{FORMAT_NAME}' header; pass a checkpoint written "
            "by this project (training's model_final.safetensors)"
        )
    where = f"checkpoint {path}: corrupt metadata"
    fields = {}
    for key in ("model_config", "inference_config", "class_names"):
        if key not in meta:
            raise CheckpointError(f"{where}: no '{key}' field; re-save the checkpoint")
        fields[key] = parse_json(meta[key], where, key)
    desc = model_description(where, version=meta.get("format_version", "0"),
                             supported_version=FORMAT_VERSION,
                             extra=parse_json(meta.get("extra", "{}"), where, "extra"), **fields)
    return CheckpointInfo(desc.model, desc.inference, desc.class_names, desc.format_version,
                          desc.extra)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                    ) -> tuple[CondInst, CheckpointInfo]:
    """Rebuild the network from a checkpoint: returns (model in eval mode, info)."""
    info = read_checkpoint_info(path)
    # The backbone's ImageNet init is overwritten by the checkpoint: never load it here.
    cfg = ModelConfig(**{**config_to_dict(info.model), "backbone_weights": None})
    model = build_condinst(cfg)
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path}: cannot read weights ({exc})") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatch between weights and config
        reason = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise CheckpointError(
            f"checkpoint {path}: weights do not match its model config ({reason})"
        ) from None
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path}: weights do not match its model config (missing "
            f"{len(missing)}: {missing[:2]}, unexpected {len(unexpected)}: {unexpected[:2]})"
        )
    return model.to(device).eval(), info


def update_checkpoint_extra(path: str | os.PathLike, updates: dict[str, Any]) -> CheckpointInfo:
    """Merge ``updates`` into a checkpoint's ``extra`` metadata (weights unchanged), rewriting
    the file atomically; returns the new description."""
    info = read_checkpoint_info(path)
    try:
        state = load_file(str(path), device="cpu")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path}: cannot read weights ({exc})") from None
    meta["extra"] = json.dumps({**info.extra, **updates})
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))
    return read_checkpoint_info(path)
