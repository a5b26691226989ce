"""The NMS step of the automatic post-processing: the graph operator and the eager operator
keep the same boxes as torchvision's class-aware ``batched_nms``."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import batched_nms

from serving.inference.nms import class_nms_keep, multiclass_nms_keep


def _candidates(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(2, 60, 2, generator=gen) * 50
    boxes = torch.cat((xy, xy + 5 + torch.rand(2, 60, 2, generator=gen) * 30), dim=-1)
    scores = torch.rand(2, 60, generator=gen)
    labels = torch.randint(0, 3, (2, 60), generator=gen)
    valid = torch.rand(2, 60, generator=gen) > 0.2
    return boxes, scores, labels, valid


def _reference(boxes, scores, labels, valid, b):
    idx = valid[b].nonzero()[:, 0]
    return set(idx[batched_nms(boxes[b, idx], scores[b, idx], labels[b, idx], 0.5)].tolist())


def test_multiclass_nms_keep_matches_batched_nms():
    boxes, scores, labels, valid = _candidates()
    per_class = (labels[:, None] == torch.arange(3)[None, :, None]) & valid[:, None]
    class_scores = torch.where(per_class, scores[:, None], torch.zeros(()))
    keep = multiclass_nms_keep(boxes, class_scores, 0.5, 60)
    assert keep.shape == (2, 60) and keep.dtype == torch.bool
    for b in range(2):
        ref = _reference(boxes, scores, labels, valid, b)
        assert set(keep[b].nonzero()[:, 0].tolist()) == ref
        assert 0 < len(ref) < int(valid[b].sum())  # some boxes suppressed, some kept


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_class_nms_keep_both_operators(mode):
    """Eager inference uses batched_nms on the valid slots, anything else the graph op."""
    boxes, scores, labels, valid = _candidates(1)
    context = torch.inference_mode if mode == "eager" else torch.enable_grad
    with context():
        keep = class_nms_keep(boxes, scores, labels, valid, 3, 0.5)
    for b in range(2):
        assert set(keep[b].nonzero()[:, 0].tolist()) == _reference(boxes, scores, labels,
                                                                   valid, b)
    assert not (keep & ~valid).any()
