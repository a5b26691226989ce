"""The SIM code's colour x feature pairwise affinity (``boxinst.pairwise_affinity``, SIM_SPEC 6.4).

Config validation, the teacher-feature similarity on known inputs, and short training runs: with
a feature similarity of exactly 1 the run equals the colour-only run step for step, with the
teacher's real features the edge similarity drops below the colour one, and the teacher runs
once per step.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from train_helpers import SIM_EXERCISE, Recorder

from training.losses.criterion import _teacher_feature_similarity
from training.train import train
from training.train_config import ConfigError, TrainConfig, load_config


def test_config_rejects_unknown_affinity() -> None:
    with pytest.raises(ConfigError, match="boxinst.pairwise_affinity='colour'.*'color_feature'"):
        load_config(None, ["boxinst.pairwise_affinity=colour"])


def test_config_feature_affinity_needs_the_teacher() -> None:
    with pytest.raises(ConfigError, match="sim.enabled=true"):
        load_config(None, ["boxinst.pairwise_affinity=color_feature", "sim.enabled=false"])
    # Fully supervised training has no pairwise loss: the setting is harmless there.
    cfg = load_config(None, ["boxinst.pairwise_affinity=color_feature", "sim.enabled=false",
                             "supervision=mask"])
    assert cfg.boxinst.pairwise_affinity == "color_feature"
    assert TrainConfig().boxinst.pairwise_affinity == "color"  # the paper's BoxInst affinity


def test_teacher_feature_similarity_known_values() -> None:
    cfg = TrainConfig()
    # Stride-8 features (1, 2, 4, 4) -> stride 4 (1, 2, 8, 8): constant [3, 4] everywhere.
    feats = torch.zeros(1, 2, 4, 4)
    feats[:, 0], feats[:, 1] = 3.0, 4.0
    sim = _teacher_feature_similarity(feats, torch.Size((8, 8)), cfg)
    assert sim.shape == (1, 8, 8, 8)
    # Interior neighbours (distance 2 on the grid) have equal features: similarity exp(0) = 1.
    torch.testing.assert_close(sim[..., 2:-2, 2:-2], torch.ones(1, 8, 4, 4))
    # Neighbours in the zero padding are ||[3, 4]|| = 5 away (the colour term is 0 there).
    assert sim[0, 0, 0, 0].item() == pytest.approx(math.exp(-5.0))
    # A step of 1 in one channel between the left and right halves: exp(-1) across it.
    feats[:, 0, :, 2:] += 1.0
    sim = _teacher_feature_similarity(feats, torch.Size((8, 8)), cfg)
    right = 4  # neighbour order of unfold_wo_center: index 4 is (0, +2)
    assert sim[0, right, 4, 0].item() == pytest.approx(1.0)  # both in the left half
    assert sim[0, right, 4, 2].item() < 1.0  # crosses the (bilinearly smoothed) step
    with pytest.raises(ValueError, match="teacher_mask_feats"):
        _teacher_feature_similarity(None, torch.Size((8, 8)), cfg)


def _run(tiny_cfg, out: Path, *overrides: str) -> list:
    cfg = tiny_cfg(out, "optim.max_iter=3", "data.val_json=null", "checkpoint_every=0",
                   "sim.start_iter=1", "boxinst.color_threshold=0.1", *SIM_EXERCISE, *overrides)
    rec = Recorder(snapshot_first=False)
    train(cfg, callbacks=[rec])
    return rec.records


@pytest.mark.slow
def test_feature_affinity_of_one_equals_colour_affinity(tiny_cfg, tmp_path: Path,
                                                        monkeypatch) -> None:
    import training.losses.criterion as criterion
    from training.sim.iteration import SIMState

    colour = _run(tiny_cfg, tmp_path / "colour")
    calls = []
    original_forward = SIMState.teacher_forward

    def counting_forward(self, x):
        calls.append(x.shape)
        return original_forward(self, x)

    monkeypatch.setattr(SIMState, "teacher_forward", counting_forward)
    monkeypatch.setattr(criterion, "feature_similarity",
                        lambda feats, k, d: torch.ones(feats.shape[0], k * k - 1,
                                                       *feats.shape[-2:]))
    ones = _run(tiny_cfg, tmp_path / "ones",
                "boxinst.pairwise_affinity=color_feature")
    # The teacher ran once per step (also before SIM starts), its outputs reused by SIM's maps.
    assert len(calls) == 3
    assert [r.losses.keys() for r in ones] == [r.losses.keys() for r in colour]
    for a, b in zip(colour, ones, strict=True):
        for key in a.losses:
            assert b.losses[key] == pytest.approx(a.losses[key], rel=1e-5, abs=1e-7), key
    monkeypatch.undo()

    # With the teacher's real features: the edge similarity handed to the pairwise loss is the
    # colour similarity times a factor in (0, 1], below 1 where the features differ.
    seen: dict[str, list[torch.Tensor]] = {"colour": [], "real": []}
    original_loss = criterion.pairwise_loss

    def recording_loss(logits, sim, *args):
        seen[current].append(sim.detach().clone())
        return original_loss(logits, sim, *args)

    monkeypatch.setattr(criterion, "pairwise_loss", recording_loss)
    current = "colour"
    _run(tiny_cfg, tmp_path / "colour2")
    current = "real"
    _run(tiny_cfg, tmp_path / "real", "boxinst.pairwise_affinity=color_feature")
    # Step 0 starts from the same weights and data: compare there.
    colour_sim, real_sim = seen["colour"][0], seen["real"][0]
    assert colour_sim.shape == real_sim.shape
    assert bool((real_sim <= colour_sim + 1e-6).all())
    assert bool((real_sim < colour_sim - 1e-3).any())
