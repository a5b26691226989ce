"""Known-answer tests of the memory bank and copy-paste (training/sim/copypaste.py, SIM_SPEC 7.8).
"""

from __future__ import annotations

import io

import torch

from training.sim.copypaste import MemoryBank, masks_to_boxes, paste, paste_instances


def _image(h: int = 32, w: int = 32, value: int = 10) -> torch.Tensor:
    return torch.full((3, h, w), value, dtype=torch.uint8)


def _no_paste(n: int = 0):
    return [], [], torch.zeros(n, dtype=torch.long), torch.zeros(n, 2, dtype=torch.long)


def _bank_of_tiny_objects(k: int, scores: torch.Tensor | None = None, capacity: int = 10,
                          h: int = 64, w: int = 64) -> MemoryBank:
    """One entry with ``k`` 2x2 objects, object ``i`` labelled ``i`` and coloured ``100 + i``."""
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    masks = torch.zeros(k, h, w, dtype=torch.bool)
    boxes = torch.zeros(k, 4)
    for i in range(k):
        y, x = 4 * (i // 8), 4 * (i % 8)
        img[:, y:y + 2, x:x + 2] = 100 + i
        masks[i, y:y + 2, x:x + 2] = True
        boxes[i] = torch.tensor([x, y, x + 1, y + 1])
    bank = MemoryBank(capacity)
    s = torch.full((k,), 0.5) if scores is None else scores
    assert bank.push(img, masks, boxes, torch.arange(k), s) == k
    return bank


def test_masks_to_boxes() -> None:
    m = torch.zeros(2, 5, 6, dtype=torch.bool)
    m[0, 1:4, 2] = True
    m[0, 2, 4] = True
    ext, nonempty = masks_to_boxes(m)
    assert ext.tolist() == [[2, 1, 4, 3], [0, 0, 0, 0]] and nonempty.tolist() == [True, False]


def test_push_crops_clears_outside_box_and_skips_empty() -> None:
    img = torch.arange(3 * 16 * 16).remainder(251).to(torch.uint8).view(3, 16, 16)
    masks = torch.zeros(3, 16, 16, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True
    masks[0, 10, 10] = True  # outside box 0: cleared
    masks[2, 7:9, 1:3] = True  # instance 1 stays empty
    boxes = torch.tensor([[3.0, 2.0, 8.0, 4.0], [0.0, 0.0, 5.0, 5.0], [0.0, 6.0, 4.0, 9.0]])
    bank = MemoryBank(4)
    assert bank.push(img, masks, boxes, torch.tensor([4, 5, 6]), torch.tensor([0.1, 0.2, 0.3])) == 2
    e = bank.entries[0]
    assert e["labels"].tolist() == [4, 6]
    torch.testing.assert_close(e["scores"], torch.tensor([0.1, 0.3]))
    assert torch.equal(e["patches"][0], img[:, 2:5, 3:9]) and e["masks"][0].all()
    assert torch.equal(e["patches"][1], img[:, 7:9, 1:3]) and e["masks"][1].shape == (2, 2)
    assert e["patches"][0].untyped_storage().nbytes() == 3 * 3 * 6  # a copy, not a view
    assert bank.push(img, torch.zeros(1, 16, 16, dtype=torch.bool), boxes[:1], torch.tensor([0]),
                     torch.tensor([1.0])) == 0
    assert len(bank) == 1


def test_bank_fifo_capacity_and_state_dict_round_trip() -> None:
    bank = MemoryBank(capacity=3)
    for i in range(5):
        m = torch.zeros(1, 8, 8, dtype=torch.bool)
        m[0, 1:3, 1:4] = True
        bank.push(_image(8, 8, i), m, torch.tensor([[0.0, 0.0, 7.0, 7.0]]), torch.tensor([i]),
                  torch.tensor([0.5]))
    assert len(bank) == 3 and bank.is_full
    assert [int(e["labels"][0]) for e in bank.entries] == [2, 3, 4]
    buf = io.BytesIO()
    torch.save(bank.state_dict(), buf)
    buf.seek(0)
    other = MemoryBank(capacity=50)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.capacity == 3 and len(other) == 3
    for a, b in zip(bank.entries, other.entries, strict=True):
        assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["scores"], b["scores"])
        assert all(torch.equal(x, y) for x, y in zip(a["patches"], b["patches"], strict=True))
        assert all(torch.equal(x, y) for x, y in zip(a["masks"], b["masks"], strict=True))
    valid = torch.ones(32, 32, dtype=torch.bool)
    r1 = paste(_image(), valid, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), None, bank,
               torch.Generator().manual_seed(3))
    r2 = paste(_image(), valid, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), None, other,
               torch.Generator().manual_seed(3))
    assert torch.equal(r1.image, r2.image) and torch.equal(r1.boxes, r2.boxes)


def test_partial_cover_shrinks_box_to_visible_part() -> None:
    img = _image()
    gt_boxes = torch.tensor([[4.0, 4.0, 19.0, 19.0]])  # BoxInst raster: columns/rows 4..19
    patch = torch.full((3, 32, 20), 200, dtype=torch.uint8)
    mask = torch.ones(32, 20, dtype=torch.bool)
    valid = torch.ones(32, 32, dtype=torch.bool)
    r = paste_instances(img, valid, gt_boxes, torch.tensor([7]), None, [patch], [mask],
                        torch.tensor([3]), torch.tensor([[12, 0]]))
    assert r.labels.tolist() == [7, 3] and r.pasted.tolist() == [False, True]
    torch.testing.assert_close(r.boxes, torch.tensor([[4.0, 4.0, 12.0, 19.0],
                                                      [12.0, 0.0, 32.0, 32.0]]))
    expect = torch.zeros(32, 32, dtype=torch.bool)
    expect[4:20, 4:12] = True
    assert torch.equal(r.box_masks_full[0], expect)
    assert not r.paste_targets[0].any() and r.paste_targets[1, :, 12:].all()
    assert not r.paste_targets[1, :, :12].any()
    assert (r.image[:, :, 12:] == 200).all() and (r.image[:, :, :12] == 10).all()
    assert r.dropped_indices.numel() == 0 and r.kept_indices.tolist() == [0]


def test_full_cover_drops_instance_and_untouched_box_is_exact() -> None:
    gt_boxes = torch.tensor([[4.3, 4.0, 9.6, 9.0], [20.2, 20.0, 30.7, 29.5]])
    patch = torch.full((3, 12, 12), 50, dtype=torch.uint8)
    r = paste_instances(_image(), torch.ones(32, 32, dtype=torch.bool), gt_boxes,
                        torch.tensor([1, 2]), None, [patch], [torch.ones(12, 12, dtype=torch.bool)],
                        torch.tensor([5]), torch.tensor([[2, 2]]))
    assert r.dropped_indices.tolist() == [0] and r.kept_indices.tolist() == [1]
    assert r.labels.tolist() == [2, 5]
    torch.testing.assert_close(r.boxes, torch.tensor([[20.2, 20.0, 30.7, 29.5],
                                                      [2.0, 2.0, 14.0, 14.0]]))


def test_later_paste_occludes_earlier_and_valid_region() -> None:
    valid = torch.zeros(32, 32, dtype=torch.bool)
    valid[:24, :24] = True
    big = torch.ones(10, 10, dtype=torch.bool)
    p1 = torch.full((3, 10, 10), 1, dtype=torch.uint8)
    p2 = torch.full((3, 10, 10), 2, dtype=torch.uint8)
    r = paste_instances(_image(), valid, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), None,
                        [p1, p2, p1], [big, big, big], torch.tensor([0, 1, 2]),
                        torch.tensor([[0, 0], [5, 0], [20, 20]]))
    assert r.labels.tolist() == [0, 1, 2]
    torch.testing.assert_close(r.boxes, torch.tensor([[0.0, 0.0, 5.0, 10.0], [5.0, 0.0, 15.0, 10.0],
                                                      [20.0, 20.0, 24.0, 24.0]]))
    assert (r.image[:, 0:10, 5:15] == 2).all() and (r.image[:, 24:, 24:] == 10).all()
    # Fully covered by a later paste: dropped from the output.
    r = paste_instances(_image(), valid, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), None,
                        [p1, p2], [big, big], torch.tensor([0, 1]), torch.tensor([[3, 3], [3, 3]]))
    assert r.labels.tolist() == [1] and r.pasted.tolist() == [True]


def test_sampling_without_replacement_never_repeats() -> None:
    bank = _bank_of_tiny_objects(12)  # n = clamp(floor(0.25 * 12), 1, 3) = 3
    valid = torch.ones(64, 64, dtype=torch.bool)
    counts = []
    for seed in range(30):
        r = paste(_image(64, 64), valid, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), None,
                  bank, torch.Generator().manual_seed(seed))
        labels = r.labels[r.pasted].tolist()
        assert len(labels) == len(set(labels)) and len(labels) <= 3
        counts.append(len(labels))
        for lab, m in zip(labels, r.paste_targets[r.pasted], strict=True):
            assert (r.image[:, m] == 100 + lab).all()
    assert max(counts) == 3
    eight = _bank_of_tiny_objects(8)  # floor(0.25 * 8) = 2
    r = paste(_image(64, 64), valid, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), None,
              eight, torch.Generator().manual_seed(0))
    assert int(r.pasted.sum()) == 2


def test_only_positive_scores_are_sampled_and_zero_scores_do_not_crash() -> None:
    valid = torch.ones(64, 64, dtype=torch.bool)
    scores = torch.zeros(12)
    scores[[4, 9]] = 0.8
    bank = _bank_of_tiny_objects(12, scores)
    for seed in range(10):
        r = paste(_image(64, 64), valid, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), None,
                  bank, torch.Generator().manual_seed(seed))
        assert sorted(r.labels[r.pasted].tolist()) == [4, 9]
    zero = _bank_of_tiny_objects(12, torch.zeros(12))
    r = paste(_image(64, 64), valid, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), None,
              zero, torch.Generator().manual_seed(1))
    assert int(r.pasted.sum()) == 3


def test_determinism_and_fit_into_valid_region() -> None:
    bank = MemoryBank()
    m = torch.zeros(1, 64, 64, dtype=torch.bool)
    m[0, 5:45, 5:45] = True
    bank.push(torch.full((3, 64, 64), 77, dtype=torch.uint8), m, torch.tensor([[5.0, 5, 44, 44]]),
              torch.tensor([2]), torch.tensor([0.9]))
    valid = torch.zeros(32, 32, dtype=torch.bool)
    valid[:16, :20] = True
    gt = torch.tensor([[0.0, 0.0, 31.0, 31.0]])
    outs = [paste(_image(), valid, gt, torch.tensor([1]), None, bank,
                  torch.Generator().manual_seed(s), scale_range=(0.5, 1.5)) for s in (5, 5, 6)]
    a, b, c = outs
    for field in a._fields:
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.image, c.image)
    for r in outs:
        assert r.pasted.tolist() == [False, True]
        assert not (r.paste_targets[1] & ~valid).any()
        x0, y0, x1, y1 = r.boxes[1].tolist()
        assert x0 >= 0 and y0 >= 0 and x1 <= 20 and y1 <= 16
    empty = paste(_image(), valid, gt, torch.tensor([1]), None, MemoryBank(),
                  torch.Generator().manual_seed(0))
    assert torch.equal(empty.image, _image()) and not empty.pasted.any()
    torch.testing.assert_close(empty.boxes, gt)
