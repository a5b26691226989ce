"""The export wrapper (eager) against the library's post-processing, and its building blocks."""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms

from export.nms import multiclass_nms_keep
from export.wrapper import AutomaticGraph, PromptGraph, valid_pixels
from serving.inference.postprocess import clip_boxes, detect, level_topk_candidates, segment_boxes
from serving.model.checkpoint import load_checkpoint


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, 128, 256, generator=gen) * 255
    sizes = torch.tensor([[128, 250], [96, 256]])
    return images, sizes


def test_automatic_graph_equals_detect(tiny_checkpoint):
    model, info = load_checkpoint(tiny_checkpoint)
    images, sizes = _batch()
    with torch.no_grad():
        boxes, scores, labels, masks, num = AutomaticGraph(model, info.inference)(images, sizes)
        out = model(model.normalize(images, valid_pixels(images, sizes)))
        ref = detect(model, out, sizes, info.inference)
    for b, det in enumerate(ref):
        n = int(num[b])
        assert n == len(det.scores) == 20  # max_detections of the tiny checkpoint
        torch.testing.assert_close(scores[b, :n], det.scores, atol=0, rtol=0)
        torch.testing.assert_close(boxes[b, :n], det.boxes, atol=0, rtol=0)
        torch.testing.assert_close(labels[b, :n], det.labels, atol=0, rtol=0)
        torch.testing.assert_close(masks[b, :n], det.mask_probs, atol=1e-6, rtol=0)


def test_automatic_graph_pads_to_max_detections(tiny_checkpoint):
    model, info = load_checkpoint(tiny_checkpoint)
    images, sizes = _batch(1)
    with torch.no_grad():
        out = model(model.normalize(images, valid_pixels(images, sizes)))
        top = detect(model, out, sizes, info.inference)[0].scores
        # a threshold between the 5th and 6th best p = score**2 keeps 5 detections in image 0
        info.inference.score_threshold = float(top[4] ** 2 + top[5] ** 2) / 2
        boxes, scores, labels, masks, num = AutomaticGraph(model, info.inference)(images, sizes)
        ref = detect(model, out, sizes, info.inference)
    assert boxes.shape == (2, 20, 4) and masks.shape == (2, 20, 32, 64)
    assert int(num[0]) == 5
    for b, det in enumerate(ref):
        n = int(num[b])
        assert n == len(det.scores) < 20
        torch.testing.assert_close(scores[b, :n], det.scores, atol=0, rtol=0)
        assert (labels[b, n:] == -1).all() and (scores[b, n:] == 0).all()
        assert (boxes[b, n:] == 0).all() and (masks[b, n:] == 0).all()


def test_prompt_graph_equals_segment_boxes(tiny_checkpoint):
    model, info = load_checkpoint(tiny_checkpoint)
    images, sizes = _batch(2)
    boxes = torch.tensor([[[10.0, 10, 100, 90], [50, 20, 240, 120]],
                          [[0.0, 0, 30, 30], [5, 40, 200, 95]]])
    labels = torch.tensor([[1, -1], [-1, 2]])
    with torch.no_grad():
        masks, scores, out_labels = PromptGraph(model, info.inference)(images, sizes, boxes,
                                                                        labels)
        out = model(model.normalize(images, valid_pixels(images, sizes)))
        ref = segment_boxes(model, out, boxes, labels, info.inference)
    torch.testing.assert_close(masks, ref.mask_probs, atol=0, rtol=0)
    torch.testing.assert_close(scores, ref.scores, atol=0, rtol=0)
    assert out_labels[0, 0] == 1 and out_labels[1, 1] == 2


def test_valid_pixels_marks_the_resized_image():
    images = torch.zeros(2, 3, 4, 5)
    valid = valid_pixels(images, torch.tensor([[2, 3], [4, 5]]))
    expected = torch.zeros(2, 4, 5, dtype=torch.bool)
    expected[0, :2, :3] = True
    expected[1] = True
    assert torch.equal(valid, expected)


def test_multiclass_nms_keep_matches_batched_nms():
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(2, 60, 2, generator=gen) * 50
    boxes = torch.cat((xy, xy + 5 + torch.rand(2, 60, 2, generator=gen) * 30), dim=-1)
    scores = torch.rand(2, 60, generator=gen)
    labels = torch.randint(0, 3, (2, 60), generator=gen)
    valid = torch.rand(2, 60, generator=gen) > 0.2
    per_class = (labels[:, None] == torch.arange(3)[None, :, None]) & valid[:, None]
    class_scores = torch.where(per_class, scores[:, None], torch.zeros(()))
    keep = multiclass_nms_keep(boxes, class_scores, 0.5, 60)
    for b in range(2):
        idx = valid[b].nonzero()[:, 0]
        ref = idx[batched_nms(boxes[b, idx], scores[b, idx], labels[b, idx], 0.5)]
        assert set(keep[b].nonzero()[:, 0].tolist()) == set(ref.tolist())
        assert 0 < len(ref) < len(idx)  # some boxes suppressed, some kept


def test_level_topk_candidates_padding_and_batching():
    probs = torch.rand(2, 7, 3, generator=torch.Generator().manual_seed(0))
    levels = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    s_pad, i_pad = level_topk_candidates(probs, levels, 3, 10, pad=True)
    assert s_pad.shape == i_pad.shape == (2, 30) and int(i_pad.max()) <= 20
    for b in range(2):
        s, i = level_topk_candidates(probs[b], levels, 3, 10)  # unpadded: k = min(10, 21)
        assert s.shape == (30,)
        torch.testing.assert_close(s_pad[b], s)
        keep = s > 0
        torch.testing.assert_close(i_pad[b][keep], i[keep])
        # level 2 holds one location x 3 classes: 3 positive slots, the rest zero
        assert int((s[20:] > 0).sum()) == 3
    s, _ = level_topk_candidates(probs[0], levels, 3, 40, pad=True)
    assert s.shape == (120,)  # 40 slots per level although N*C = 21


def test_clip_boxes_by_image_size():
    boxes = torch.tensor([[[-5.0, 3, 300, 90]], [[10.0, -1, 20, 500]]])
    clipped = clip_boxes(boxes, torch.tensor([[80], [100]]), torch.tensor([[256], [30]]))
    assert clipped.tolist() == [[[0.0, 3, 256, 80]], [[10.0, 0, 20, 100]]]
