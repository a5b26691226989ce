"""Fixtures of the library tests."""

from __future__ import annotations

import pytest
import torch
from sim_testing import TINY_CLASSES, tiny_model_config


@pytest.fixture(scope="session")
def varied_checkpoint(tmp_path_factory):
    """Like conftest's tiny checkpoint, with a controller that makes masks depend on the
    location (random weights otherwise give masks that are all or nothing)."""
    from serving import InferenceConfig, build_condinst
    from serving.model.model_file import new_card, save_checkpoint

    torch.manual_seed(1)
    cfg = tiny_model_config()
    model = build_condinst(cfg).eval()
    with torch.no_grad():
        model.head.cls_logits.bias.fill_(1.0)
        model.head.controller.bias.normal_(0, 1.0)
        model.head.controller.weight.mul_(30)
    path = tmp_path_factory.mktemp("varied") / "varied.safetensors"
    save_checkpoint(path, model, new_card(cfg, TINY_CLASSES, InferenceConfig(
        min_size=128, max_size=256, max_detections=20)))
    return path
