"""Self-describing inference checkpoints (safetensors + JSON metadata).

A checkpoint file holds the network weights as safetensors and, in the safetensors metadata,
the format name and its :class:`~serving.model.card.ModelCard` (configs, class names,
calibration, history), each field as JSON text.
Loading never unpickles Python objects. Files are written atomically (temp file + rename).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..files import atomic_write
from ..model_config import InferenceConfig, ModelConfig, config_to_dict
from . import CondInst, build_condinst
from .card import CARD_VERSION, Calibration, ModelCard, Provenance
from .metadata import parse_json

FORMAT_NAME = "sim-condinst"
#: The checkpoint's format version: the card's (:data:`serving.model.card.CARD_VERSION`).
FORMAT_VERSION = CARD_VERSION


def save_checkpoint(path: str | os.PathLike, model: CondInst, card: ModelCard) -> Path:
    """Write ``model``'s weights and its ``card`` to ``path`` (``.safetensors``): the card's
    fields as JSON text in the safetensors metadata (:meth:`ModelCard.to_json`)."""
    if len(card.class_names) != card.model.num_classes:
        raise CheckpointError(f"{len(card.class_names)} class names given for "
                              f"num_classes={card.model.num_classes}")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT_NAME, **{k: json.dumps(v) for k, v in card.to_json().items()}}
    meta["format_version"] = str(FORMAT_VERSION)
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))
    return Path(path)


def new_card(model_cfg: ModelConfig, class_names: list[str] | tuple[str, ...],
             inference_cfg: InferenceConfig | None = None, *, made_by: str = "save",
             category_ids: list[int] | tuple[int, ...] | None = None,
             calibration: Calibration | None = None, **details: Any) -> ModelCard:
    """The card of a model made now (by training, or ``made_by="save"``): its configs, class
    names, category ids, calibration, and one history step with ``details``."""
    return ModelCard(tuple(class_names), model_cfg, inference_cfg or InferenceConfig(),
                     calibration or Calibration(),
                     None if category_ids is None else tuple(category_ids),
                     history=(Provenance.now(made_by, **details),))


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file not found; check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path}: not a valid .safetensors checkpoint ({exc}); it may be "
            "truncated or of another format"
        ) from None


def read_checkpoint_card(path: str | os.PathLike) -> ModelCard:
    """Read only the card of a checkpoint (fast: no weights are loaded), any format version."""
    path = Path(path)
    meta = _metadata(path)
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"checkpoint {path}: missing the '{FORMAT_NAME}' header; pass a checkpoint written "
            "by this project (training's model_final.safetensors)"
        )
    where = f"checkpoint {path}: corrupt metadata"
    fields: dict[str, Any] = {"format_version": meta.get("format_version", "0")}
    for key in ("model_config", "inference_config", "class_names"):
        if key not in meta:
            raise CheckpointError(f"{where}: no '{key}' field; re-save the checkpoint")
    for key, text in meta.items():
        if key not in ("format", "format_version"):
            fields[key] = parse_json(text, where, key)
    return ModelCard.from_json(fields, where, "checkpoint")


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                    ) -> tuple[CondInst, ModelCard]:
    """Rebuild the network from a checkpoint: returns (model in eval mode, its card)."""
    info = read_checkpoint_card(path)
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


def update_checkpoint_card(path: str | os.PathLike, step: Provenance,
                           **changes: Any) -> ModelCard:
    """Rewrite a checkpoint's card (weights unchanged, atomically) after one more ``step``
    with ``changes`` (:meth:`ModelCard.step`); returns the new card."""
    card = read_checkpoint_card(path)
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path}: cannot read weights ({exc})") from None
    new = card.step(step, **changes)
    meta = {"format": FORMAT_NAME, **{k: json.dumps(v) for k, v in new.to_json().items()}}
    meta["format_version"] = str(FORMAT_VERSION)
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))
    return read_checkpoint_card(path)


def recalibrate_checkpoint(path: str | os.PathLike, found: Calibration,
                           source: str | None = None) -> ModelCard:
    """Merge ``found`` into a checkpoint's calibration (``sim eval --calibrate``): the fields
    it sets replace the stored ones, the others stay; ``source`` is the annotation file."""
    card = read_checkpoint_card(path)
    return update_checkpoint_card(path, Provenance.now("evaluate --calibrate", source),
                                  calibration=card.calibration.merged(found))
