"""Shared fixtures: a tiny random-weight CondInst checkpoint and small test images."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

# Honour OMP_NUM_THREADS (the documented test command sets 1): two spinning threads on a
# busy 2-core machine cost ~10x the CPU time.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0)
                      or max(1, min(2, os.cpu_count() or 1)))

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


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path of a tiny random-weight checkpoint (.safetensors), built once per session."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="session")
def sample_image() -> np.ndarray:
    """(120, 160, 3) uint8 RGB: two coloured rectangles on a gray background."""
    img = np.full((120, 160, 3), 90, dtype=np.uint8)
    img[20:60, 30:80] = (220, 40, 40)
    img[50:110, 90:150] = (40, 200, 60)
    return img
