"""The oracle-M_S diagnostic (benchmarks/oracle.py): M_S is each instance's ground-truth mask
(binary, inside its box, smaller than the box), only inside the ``with`` block."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import SIM_EXERCISE, Recorder

from benchmarks.oracle import oracle_semantic_map

pytestmark = pytest.mark.slow


def _train(tiny_cfg, out: Path, *overrides: str) -> list:
    from training.train import train

    cfg = tiny_cfg(out, "optim.max_iter=2", "data.val_json=null", "checkpoint_every=0",
                   "sim.start_iter=0", *SIM_EXERCISE, *overrides)
    rec = Recorder(snapshot_first=False)
    train(cfg, callbacks=[rec])
    return rec.records


def test_oracle_semantic_map_is_the_ground_truth(tiny_cfg, tmp_path: Path) -> None:
    import training.sim.iteration as sim_iteration
    import training.train as train_mod

    original_maps, original_dataset = sim_iteration.compute_sim_maps, train_mod.CocoInstanceDataset
    seen = []
    with oracle_semantic_map():
        oracle = sim_iteration.compute_sim_maps

        def recording(*args):
            maps = oracle(*args)
            seen.append(maps)
            return maps

        sim_iteration.compute_sim_maps = recording
        try:
            records = _train(tiny_cfg, tmp_path, "sim.copy_paste=false")
        finally:
            sim_iteration.compute_sim_maps = oracle
    assert len(records) == 2 and seen
    for maps in seen:
        m_sem, box = maps.m_sem, maps.box_s4
        assert set(m_sem.unique().tolist()) <= {0.0, 1.0}
        assert bool((m_sem <= box).all())  # a visible mask lies inside its box
        assert bool((m_sem.flatten(1).sum(1) > 0).all())
        assert float(m_sem.sum()) < float(box.sum())  # the shapes, not the boxes
    for r in records:
        assert "loss_pseudo" in r.losses and "loss_paste" not in r.losses
    # Outside the block, training is box supervision again.
    assert sim_iteration.compute_sim_maps is original_maps
    assert train_mod.CocoInstanceDataset is original_dataset


def test_oracle_needs_copy_paste_off(tiny_cfg, tmp_path: Path) -> None:
    with oracle_semantic_map(), pytest.raises(ValueError, match="sim.copy_paste=false"):
        _train(tiny_cfg, tmp_path)
