"""SIM step fast paths give exactly the results of the straightforward code they replace, and the
benchmark helpers measure what they say.

- ``EMATeacher.update`` (multi-tensor ``torch._foreach_*`` calls on CUDA, a per-tensor loop on
  the CPU) is equal, bit for bit, to ``t.mul_(m).add_(s, alpha=1 - m)`` and buffer copies.
- ``_push_bank`` upsamples only the instances that can be stored: the bank receives the same
  entries as when every instance is upsampled.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from serving import ModelConfig, build_condinst
from training.losses.criterion import Positives
from training.sim import EMATeacher, MemoryBank
from training.sim.ema import ema_step
from training.sim.iteration import _push_bank
from training.sim.pseudo import PseudoMask, full_resolution_masks, instance_importance


def _tiny_model():
    cfg = ModelConfig(backbone="mobilenet_v2", num_classes=3, fpn_channels=16, head_convs=1,
                      mask_branch_channels=8, mask_branch_convs=1)
    return build_condinst(cfg)


def test_ema_update_equals_the_per_tensor_loop():
    torch.manual_seed(0)
    student = _tiny_model()
    teacher = EMATeacher(student)
    reference = copy.deepcopy(teacher.module)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
        for b in student.buffers():
            b.add_(3) if not b.is_floating_point() else b.mul_(1.5).add_(0.25)
    m = 0.9
    for _ in range(3):
        teacher.update(student, m)
        s_params, s_bufs = dict(student.named_parameters()), dict(student.named_buffers())
        with torch.no_grad():
            for name, t in reference.named_parameters():
                t.mul_(m).add_(s_params[name].detach(), alpha=1.0 - m)
            for name, t in reference.named_buffers():
                t.copy_(s_bufs[name])
    got, expected = teacher.module.state_dict(), reference.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert not any(p.requires_grad for p in teacher.module.parameters())


@pytest.mark.parametrize("fused", [False, True])
def test_ema_step_fused_and_looped_give_the_same_values(fused):
    gen = torch.Generator().manual_seed(4)
    t = [torch.randn((3, 5), generator=gen), torch.randn(7, generator=gen)]
    s = [torch.randn((3, 5), generator=gen), torch.randn(7, generator=gen)]
    tb, sb = [torch.zeros(2, dtype=torch.int64)], [torch.tensor([4, 5])]
    expected = [a.clone().mul_(0.99).add_(b, alpha=1.0 - 0.99) for a, b in zip(t, s)]
    ema_step(t, s, tb, sb, 0.99, fused=fused)
    assert all(torch.equal(a, b) for a, b in zip(t, expected))
    assert tb[0].tolist() == [4, 5]
    ema_step([], [], [], [], 0.5, fused=fused)  # nothing to update is fine


def _reference_push(bank, images, pos, pm, m_inst, box_full, usable):
    """The original loop: every instance upsampled, then filtered per image."""
    masks_full = full_resolution_masks(pm.blended, pm.tau_high, box_full)
    scores = instance_importance(m_inst, pm.target)
    for b in range(images.shape[0]):
        keep = (pos.gt_image == b) & usable & masks_full.flatten(1).any(dim=1)
        if bool(keep.any()):
            bank.push(images[b], masks_full[keep], pos.gt_boxes[keep], pos.gt_labels[keep],
                      scores[keep])


def test_push_bank_upsampling_only_usable_instances_stores_the_same_entries():
    gen = torch.Generator().manual_seed(1)
    g, h, w = 6, 8, 10
    images = torch.randint(0, 256, (2, 3, 4 * h, 4 * w), generator=gen, dtype=torch.uint8)
    boxes = torch.tensor([[2, 2, 20, 18], [5, 1, 30, 25], [0, 0, 39, 31], [10, 10, 12, 12],
                          [3, 4, 25, 30], [8, 2, 36, 20]], dtype=torch.float32)
    box_full = torch.zeros(g, 4 * h, 4 * w)
    for i, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
        box_full[i, y1:y2 + 1, x1:x2 + 1] = 1
    blended = torch.rand((g, h, w), generator=gen)
    blended[3] = 0.0  # empty pseudo mask: never stored
    pm = PseudoMask(target=(blended > 0.6).float(), weight=torch.ones(g, h, w), blended=blended,
                    tau_high=torch.full((g,), 0.6))
    m_inst = torch.rand((g, h, w), generator=gen)
    pos = Positives(image_index=torch.zeros(0, dtype=torch.long),
                    location=torch.zeros(0, dtype=torch.long),
                    gt_global=torch.zeros(0, dtype=torch.long), num_gts=g,
                    gt_image=torch.tensor([0, 0, 0, 1, 1, 1]), gt_boxes=boxes,
                    gt_labels=torch.tensor([0, 1, 2, 0, 1, 2]))
    usable = torch.tensor([True, False, True, True, True, False])
    sim = SimpleNamespace(bank=MemoryBank(10))
    expected = MemoryBank(10)
    _push_bank(sim, images, pos, pm, m_inst, box_full, usable)
    _reference_push(expected, images, pos, pm, m_inst, box_full, usable)
    assert len(sim.bank) == len(expected) == 2
    for a, b in zip(sim.bank.entries, expected.entries, strict=True):
        assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["scores"], b["scores"])
        for key in ("patches", "masks"):
            assert len(a[key]) == len(b[key])
            assert all(torch.equal(x, y) for x, y in zip(a[key], b[key], strict=True))
    none = SimpleNamespace(bank=MemoryBank(10))
    _push_bank(none, images, pos, pm, m_inst, box_full, torch.zeros(g, dtype=torch.bool))
    assert len(none.bank) == 0


def test_interleaved_times_runs_rounds_in_order_and_skips_warmup():
    from benchmarks.common import interleaved_times, markdown_table, summarize

    calls: list[str] = []
    results: list[tuple[str, int]] = []
    times = interleaved_times({"a": lambda: calls.append("a") or 1,
                               "b": lambda: calls.append("b") or 2},
                              rounds=3, warmup=1, on_result=lambda n, r: results.append((n, r)))
    assert calls == ["a", "b"] * 4
    assert len(results) == 8 and results[:2] == [("a", 1), ("b", 2)]
    assert sorted(times) == ["a", "b"] and all(len(t) == 3 for t in times.values())
    s = summarize([0.001, 0.003, 0.002])
    assert s["median_ms"] == 2.0 and s["min_ms"] == 1.0 and s["max_ms"] == 3.0
    assert s["rounds"] == 3
    table = markdown_table(["x", "y"], [[1.23456, None], ["s", 12345.6]])
    assert table.splitlines() == ["| x | y |", "| --- | --- |", "| 1.23 | - |", "| s | 12346 |"]


def test_train_speed_ellipse_masks_and_bank_prefill():
    from benchmarks.train_speed import ellipse_masks, prefill_bank
    from training.data.collate import Batch

    masks = ellipse_masks(torch.tensor([[0.0, 0.0, 10.0, 6.0]]), 8, 12)
    assert masks.shape == (1, 8, 12)
    assert masks[0, 3, 5] and masks[0, 3, 0] and not masks[0, 0, 0] and not masks[0, 7, 11]
    assert int(masks.sum()) < 10 * 6  # strictly inside the box
    batch = Batch(images=torch.zeros(2, 3, 16, 16, dtype=torch.uint8),
                  valid=torch.ones(2, 16, 16, dtype=torch.bool),
                  boxes=[torch.tensor([[1.0, 1.0, 9.0, 9.0]]), torch.zeros(0, 4)],
                  labels=[torch.tensor([0]), torch.zeros(0, dtype=torch.long)], masks=None,
                  image_ids=[1, 2], orig_sizes=[(16, 16)] * 2, image_sizes=[(16, 16)] * 2)
    sim = SimpleNamespace(bank=MemoryBank(5))
    prefill_bank(sim, batch, 3)
    assert len(sim.bank) == 3 and all(len(e["labels"]) == 1 for e in sim.bank.entries)
