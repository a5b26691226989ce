"""Tiny-model helpers shared by every test folder (import as ``from sim_testing import ...``).

``tests/`` is on ``sys.path`` under pytest (its conftest.py lives there); a uniquely named module
is used because ``from conftest import ...`` resolves to whichever conftest pytest loaded last.
"""

from __future__ import annotations

import torch

TINY_CLASSES = ("disc", "ring", "triangle")


def tiny_model_config(num_classes: int = len(TINY_CLASSES)):
    """A MobileNetV2-FPN small enough for CPU tests (random init, no downloads)."""
    from serving import ModelConfig

    return ModelConfig(backbone="mobilenet_v2", num_classes=num_classes, fpn_channels=32,
                       head_convs=1, mask_branch_channels=16, mask_branch_convs=1)


def make_tiny_checkpoint(path, seed: int = 0, detections: bool = True,
                         min_size: int = 128, max_size: int = 256):
    """Write a random-weight checkpoint. With ``detections`` the class bias is raised so the
    automatic mode returns instances (an untrained model otherwise scores below 0.05)."""
    from serving import InferenceConfig, build_condinst
    from serving.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    cfg = tiny_model_config()
    model = build_condinst(cfg).eval()
    if detections:
        with torch.no_grad():
            model.head.cls_logits.bias.fill_(1.0)
    infer = InferenceConfig(min_size=min_size, max_size=max_size, max_detections=20)
    save_checkpoint(path, model, cfg, list(TINY_CLASSES), infer)
    return path
