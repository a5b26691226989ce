"""The oracle-M_S diagnostic of the quality benchmark (row ``oraclems``): NOT box supervision.

Inside :func:`oracle_semantic_map`, training reads the instance masks of the training set and
SIM's semantic map ``M_S`` of every box is replaced by the box's ground-truth mask (on the
stride-4 grid), so the pseudo masks get a perfect semantic map. It measures what the rest of
SIM's pseudo-mask path (blend, thresholds, weights, loss) can do when ``M_S`` is right
(docs/training_notes.md). Copy-paste must be off (``sim.copy_paste=false``): pasted instances
have no ground truth.

    with oracle_semantic_map():
        train(load_config("configs/bench_synthetic.yaml", ["sim.copy_paste=false"]))

The switch lives here, not in the training config, because it reads what box supervision
must never read; it patches ``training.train``'s dataset (mask mode) and
``training.sim.iteration.compute_sim_maps`` for the duration of the block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


@contextlib.contextmanager
def oracle_semantic_map() -> Iterator[None]:
    """Train with ``M_S`` := ground-truth masks inside the ``with`` block (one process)."""
    import training.sim.iteration as sim_iteration
    import training.train as train_mod
    from training.data import CocoInstanceDataset
    from training.sim.pseudo import pseudo_masks

    original_maps = sim_iteration.compute_sim_maps
    original_dataset = train_mod.CocoInstanceDataset

    class MaskReadingDataset(CocoInstanceDataset):
        def __init__(self, annotation_file: Any, image_dir: Any, **kwargs: Any) -> None:
            super().__init__(annotation_file, image_dir, **{**kwargs, "mode": "mask"})

    def oracle_maps(sim: Any, x: Any, pos: Any, targets: Any, cfg: Any, *args: Any) -> Any:
        if cfg.sim.copy_paste:
            raise ValueError("the oracle M_S needs sim.copy_paste=false (pasted instances "
                             "have no ground-truth mask)")
        maps = original_maps(sim, x, pos, targets, cfg, *args)
        h, w = maps.m_inst.shape[-2:]
        m_sem = torch.cat(targets.gt_masks)[:, 2::4, 2::4][:, :h, :w].float()
        pm = pseudo_masks(maps.m_inst, m_sem, maps.box_s4, cfg.sim.alpha, cfg.sim.tau_low,
                          cfg.sim.tau_high_range)
        return maps._replace(m_sem=m_sem, pseudo=pm)

    train_mod.CocoInstanceDataset = MaskReadingDataset
    sim_iteration.compute_sim_maps = oracle_maps
    try:
        yield
    finally:
        train_mod.CocoInstanceDataset = original_dataset
        sim_iteration.compute_sim_maps = original_maps
