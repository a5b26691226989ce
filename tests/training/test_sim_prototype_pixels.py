"""Which pixels feed the prototypes: M_I > threshold (the code) or the pseudo mask (the paper)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from training.sim.iteration import _update_prototypes
from training.train_config import SIMConfig


class _Recorder:
    def update(self, pixels, labels, all_reduce_sum=None):
        self.pixels, self.labels = pixels, labels


@pytest.mark.parametrize(("mode", "expected"), [("instance", 6), ("pseudo", 4)])
def test_prototype_pixels_come_from_the_chosen_map(mode: str, expected: int) -> None:
    h = w = 8
    m_inst = torch.zeros(1, h, w)
    m_inst[0, 0:3, 0:3] = 0.9  # 9 pixels over 0.7, 6 of them inside the box (rows 1-2)
    target = torch.zeros(1, h, w)
    target[0, 5:7, 5:7] = 1.0  # 4 pseudo-mask pixels, all inside the box
    box = torch.zeros(1, h, w)
    box[0, 1:8, 0:8] = 1.0
    feats = torch.randn(1, 16, h // 2, w // 2)  # stride 8; upsampled x2 inside
    sim = SimpleNamespace(cfg=SimpleNamespace(seed=0, sim=SIMConfig(prototype_pixels=mode)),
                          prototypes=_Recorder(), all_reduce_sum=None)
    pos = SimpleNamespace(gt_image=torch.tensor([0]), gt_labels=torch.tensor([3]))
    _update_prototypes(sim, SimpleNamespace(mask_feats=feats), pos, m_inst, target, box,
                       torch.tensor([True]), step=0)
    assert sim.prototypes.pixels.shape == (expected, 16)
    assert sim.prototypes.labels.tolist() == [3] * expected
    # An instance that is not usable (pasted, or without positives) feeds nothing.
    _update_prototypes(sim, SimpleNamespace(mask_feats=feats), pos, m_inst, target, box,
                       torch.tensor([False]), step=0)
    assert sim.prototypes.pixels.shape == (0, 16)
