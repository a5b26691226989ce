"""Post-processing on hand-made network outputs: thresholds, per-level top-k, class-aware NMS,
box-prompted weighting, and the final mask resize (known answers)."""

from __future__ import annotations

import math

import pytest
import torch
from sim_testing import tiny_model_config

from serving import InferenceConfig, build_condinst
from serving.inference.assign import candidate_matrix
from serving.inference.postprocess import (
    Detections,
    clip_boxes,
    detect,
    level_topk_candidates,
    postprocess_masks,
    segment_boxes,
)
from serving.model.ops import box_iou_pairwise

H = W = 64  # padded input; P3 is 8x8 (indices 0..63), P4 4x4 (64..79), P5 2x2, P6, P7


def logit(p: float) -> float:
    return math.log(p / (1 - p))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_condinst(tiny_model_config()).eval()


@pytest.fixture()
def blank(model):
    """Real outputs of a 2-image 64x64 batch with every candidate switched off."""
    torch.manual_seed(1)
    with torch.no_grad():
        out = model(torch.randn(2, 3, H, W))
    return out._replace(cls_logits=torch.full_like(out.cls_logits, -20.0),
                        ctrness=torch.full_like(out.ctrness, 20.0),  # sigmoid -> 1.0
                        box_reg=torch.zeros_like(out.box_reg))


def p3(i: int, j: int) -> int:
    return i * 8 + j


def put(out, b: int, k: int, cls: int, p_cls: float, box, p_ctr: float | None = None) -> None:
    """Make location k of image b predict ``box`` (input px) with class probability p_cls."""
    x, y = out.locations[k].tolist()
    s = float(out.strides[k])
    x1, y1, x2, y2 = box
    out.box_reg[b, k] = torch.tensor([(x - x1) / s, (y - y1) / s, (x2 - x) / s, (y2 - y) / s])
    out.cls_logits[b, k, cls] = logit(p_cls)
    if p_ctr is not None:
        out.ctrness[b, k] = logit(p_ctr)


def small_box(out, k: int):
    x, y = out.locations[k].tolist()
    return (x - 3, y - 3, x + 3, y + 3)


@pytest.fixture(params=["eager", "graph"])
def path(request):
    """How :func:`detect` runs: eagerly (``batched_nms``, masks of used slots only) or on its
    fixed-shape graph path (the ``sim::multiclass_nms_keep`` operator, masks of every slot,
    as traced into the ONNX graph). Every detection test must pass on both."""
    return torch.inference_mode if request.param == "eager" else torch.enable_grad


def run(model, out, path, sizes=((H, W), (H, W)), **cfg) -> list[Detections]:
    with path():
        padded = detect(model, out, torch.tensor(sizes), InferenceConfig(**cfg))
    return [Detections(*(t.detach() for t in d)) for d in padded.unpad()]


def test_nms_same_class_keeps_the_higher_score(model, blank, path):
    put(blank, 0, p3(1, 1), 0, 0.81, (8, 8, 40, 40))    # score sqrt(0.81) = 0.9
    put(blank, 0, p3(2, 2), 0, 0.64, (10, 10, 40, 40))  # IoU 900/1024 > 0.6, score 0.8
    dets = run(model, blank, path)
    assert len(dets[0].boxes) == 1 and len(dets[1].boxes) == 0
    torch.testing.assert_close(dets[0].boxes[0], torch.tensor([8.0, 8.0, 40.0, 40.0]))
    torch.testing.assert_close(dets[0].scores, torch.tensor([0.9]))
    assert dets[0].labels.tolist() == [0]


def test_nms_is_class_aware(model, blank, path):
    put(blank, 0, p3(1, 1), 0, 0.81, (8, 8, 40, 40))
    put(blank, 0, p3(2, 2), 2, 0.64, (10, 10, 40, 40))
    dets = run(model, blank, path)
    torch.testing.assert_close(dets[0].scores, torch.tensor([0.9, 0.8]))
    assert dets[0].labels.tolist() == [0, 2]
    # below the NMS IoU the same class survives too: IoU(8..40, 24..56 on x) = 512/1536
    blank.cls_logits[0, p3(2, 2), 2] = -20.0
    put(blank, 0, p3(2, 2), 0, 0.64, (24, 8, 56, 40))
    assert box_iou_pairwise(torch.tensor([8.0, 8, 40, 40]), torch.tensor([24.0, 8, 56, 40])) < 0.6
    assert len(run(model, blank, path)[0].boxes) == 2


def test_threshold_applies_to_the_product_and_score_is_sqrt(model, blank, path):
    # 0.2 * 0.2 = 0.04 < 0.05 (dropped although sqrt = 0.2 > 0.05); 0.3 * 0.3 = 0.09 kept
    put(blank, 0, p3(0, 0), 1, 0.2, small_box(blank, p3(0, 0)), p_ctr=0.2)
    put(blank, 0, p3(4, 4), 1, 0.3, small_box(blank, p3(4, 4)), p_ctr=0.3)
    dets = run(model, blank, path)
    assert len(dets[0].boxes) == 1
    torch.testing.assert_close(dets[0].scores, torch.tensor([0.3]))
    torch.testing.assert_close(dets[0].boxes[0], torch.tensor(small_box(blank, p3(4, 4))))
    # with a lower threshold both are there
    assert len(run(model, blank, path, score_threshold=0.03)[0].boxes) == 2


def test_per_level_topk_and_max_detections(model, blank, path):
    ks = [p3(0, 0), p3(0, 3), p3(0, 6), p3(3, 3)]
    for k, p in zip(ks, [0.9, 0.8, 0.7, 0.6]):
        put(blank, 0, k, 0, p, small_box(blank, k))
    k4 = 64 + 3 * 4 + 3  # P4 location (56, 56)
    put(blank, 0, k4, 0, 0.5, small_box(blank, k4))
    dets = run(model, blank, path, pre_nms_topk=2)
    # two best of P3 and the P4 one
    torch.testing.assert_close(dets[0].scores, torch.tensor([0.9, 0.8, 0.5]).sqrt())
    dets = run(model, blank, path)
    assert len(dets[0].boxes) == 5
    dets = run(model, blank, path, max_detections=3)
    torch.testing.assert_close(dets[0].scores, torch.tensor([0.9, 0.8, 0.7]).sqrt())


def test_boxes_clipped_to_the_resized_image_and_masks(model, blank, path):
    put(blank, 1, p3(5, 5), 1, 0.81, (40, 30, 70, 60))
    put(blank, 1, p3(1, 1), 2, 0.64, (8, 8, 20, 20))
    dets = run(model, blank, path, sizes=((H, W), (48, 60)))
    assert len(dets[0].boxes) == 0
    d = dets[1]
    torch.testing.assert_close(d.boxes, torch.tensor([[40.0, 30.0, 60.0, 48.0],
                                                      [8.0, 8.0, 20.0, 20.0]]))
    assert d.mask_probs.shape == (2, H // 4, W // 4)
    # mask of a detection = sigmoid of the dynamic head at its location
    k = torch.tensor([p3(5, 5), p3(1, 1)])
    with torch.no_grad():
        params = model.controller_params(blank, torch.ones_like(k), k)
        ref = model.mask_head(blank.mask_feats, params, blank.locations[k],
                              blank.levels[k], torch.tensor([1, 1]))[:, 0].sigmoid()
    torch.testing.assert_close(d.mask_probs, ref)


def test_no_candidates_gives_empty_detections(model, blank, path):
    dets = run(model, blank, path)
    for d in dets:
        assert d.boxes.shape == (0, 4) and d.scores.shape == (0,) and d.labels.shape == (0,)
        assert d.mask_probs.shape == (0, H // 4, W // 4)


def test_padded_layout_and_unused_slots(model, blank, path):
    """detect() returns K = max_detections slots per image, the used ones first; unused
    slots are zero (label -1): the automatic graph's output layout."""
    put(blank, 0, p3(1, 1), 0, 0.81, (8, 8, 40, 40))
    put(blank, 0, p3(6, 6), 2, 0.64, (44, 44, 60, 60))
    put(blank, 1, p3(3, 3), 1, 0.49, small_box(blank, p3(3, 3)))
    with path():
        padded = detect(model, blank, torch.tensor([[H, W], [H, W]]),
                        InferenceConfig(max_detections=4))
    assert padded.boxes.shape == (2, 4, 4) and padded.mask_probs.shape == (2, 4, 16, 16)
    assert padded.num.tolist() == [2, 1]
    assert padded.labels.tolist() == [[0, 2, -1, -1], [1, -1, -1, -1]]
    torch.testing.assert_close(padded.scores.detach(), torch.tensor([[0.9, 0.8, 0, 0],
                                                                     [0.7, 0, 0, 0]]))
    assert not padded.boxes[0, 2:].any() and not padded.boxes[1, 1:].any()
    assert not padded.mask_probs[0, 2:].any() and padded.mask_probs[0, :2].all()
    dets = padded.unpad()
    assert [len(d.scores) for d in dets] == [2, 1]
    torch.testing.assert_close(dets[0].boxes.detach(), torch.tensor([[8.0, 8, 40, 40],
                                                                     [44, 44, 60, 60]]))


def test_detections_above_a_score():
    det = Detections(torch.arange(12.0).reshape(3, 4), torch.tensor([0.75, 0.5, 0.25]),
                     torch.tensor([2, 0, 1]), torch.zeros(3, 4, 4))
    assert det.above(None) is det
    kept = det.above(0.5)  # score >= threshold
    assert kept.scores.tolist() == [0.75, 0.5] and kept.labels.tolist() == [2, 0]
    assert kept.boxes.shape == (2, 4) and kept.mask_probs.shape == (2, 4, 4)
    assert kept.mask_probs.data_ptr() == det.mask_probs.data_ptr()  # sorted: a view, no copy
    assert len(det.above(0.8).scores) == 0
    unsorted = det._replace(scores=torch.tensor([0.25, 0.75, 0.5]))  # not sorted: still exact
    kept = unsorted.above(0.5)
    assert kept.scores.tolist() == [0.75, 0.5] and kept.labels.tolist() == [0, 1]
    assert torch.equal(kept.boxes, det.boxes[1:])


def test_level_topk_candidates_fixed_shape():
    probs = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.4], [0.7, 0.05]])
    levels = torch.tensor([0, 0, 1, 1])
    scores, flat = level_topk_candidates(probs, levels, num_levels=2, topk=2)
    assert scores.tolist() == pytest.approx([0.9, 0.8, 0.7, 0.4])
    assert flat.tolist() == [1, 2, 6, 5]


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


# ------------------------------------------------------------------ box-prompted mode
def test_segment_boxes_is_the_iou_weighted_mean(model):
    torch.manual_seed(2)
    with torch.no_grad():
        out = model(torch.randn(2, 3, H, W))
    out = out._replace(box_feats=out.box_feats * 30)  # distinct masks per location
    boxes = torch.tensor([[[6.0, 6.0, 40.0, 38.0], [30.0, 20.0, 60.0, 60.0]],
                          [[10.0, 4.0, 50.0, 30.0], [2.0, 2.0, 12.0, 12.0]]])
    labels = torch.tensor([[2, -1], [-1, 0]])
    cfg = InferenceConfig(prompt_topk=16)
    with torch.no_grad():
        res = segment_boxes(model, out, boxes, labels, cfg)
    assert res.mask_probs.shape == (2, 2, H // 4, W // 4)
    assert res.scores.shape == (2, 2) and res.labels.shape == (2, 2)
    assert res.labels[0, 0] == 2 and res.labels[1, 1] == 0  # given labels kept
    # independent reference for every box
    for b in range(2):
        for m in range(2):
            box = boxes[b, m]
            cand, _ = candidate_matrix(out.locations, out.strides, out.levels, box[None])
            ks = cand[0].nonzero()[:, 0]
            if len(ks) == 0:  # fallback: the single nearest location
                d = (out.locations - (box[:2] + box[2:]) / 2).norm(dim=-1)
                ks = d.argmin()[None]
            centre = (box[:2] + box[2:]) / 2
            ks = ks[(out.locations[ks] - centre).norm(dim=-1).argsort()][:16]
            s = out.strides[ks, None]
            loc = out.locations[ks]
            reg = out.box_reg[b, ks] * s
            pred = torch.cat((loc - reg[:, :2], loc + reg[:, 2:]), dim=1)
            w = torch.exp(5.0 * box_iou_pairwise(pred, box[None]))
            w = w / w.sum()
            with torch.no_grad():
                params = model.controller_params(out, torch.full_like(ks, b), ks)
                probs = model.mask_head(out.mask_feats, params, loc,
                                        out.levels[ks], torch.full_like(ks, b))[:, 0].sigmoid()
            ref_map = (probs * w[:, None, None]).sum(0)
            torch.testing.assert_close(res.mask_probs[b, m], ref_map, rtol=0, atol=1e-5)
            cls_p = out.cls_logits[b, ks].sigmoid()
            lab = int(labels[b, m]) if labels[b, m] >= 0 else int((cls_p * w[:, None]).sum(0)
                                                                      .argmax())
            assert int(res.labels[b, m]) == lab
            score = ((cls_p[:, lab] * out.ctrness[b, ks].sigmoid()).sqrt() * w).sum()
            torch.testing.assert_close(res.scores[b, m], score)


# ------------------------------------------------------------------ final mask resize
def test_postprocess_masks_region_same_size():
    probs = torch.zeros(2, 16, 16)
    probs[0, 3:7, 2:5] = 1.0  # stride-4 cells rows 3..6, cols 2..4
    out = postprocess_masks(probs, (64, 64), (64, 64))
    assert out.shape == (2, 64, 64) and out.dtype == torch.bool
    expected = torch.zeros(64, 64, dtype=torch.bool)
    # cell k is centred on pixel 4k + 2; cells a..b threshold to pixels 4a+1 .. 4b+3
    expected[13:28, 9:20] = True
    assert torch.equal(out[0], expected)
    assert not out[1].any()


def test_postprocess_masks_resize_and_crop():
    probs = torch.zeros(1, 16, 16)
    probs[0, 3:7, :] = 1.0  # full-width band of cells 3..6
    out = postprocess_masks(probs, (64, 64), (128, 128))
    assert out.shape == (1, 128, 128)
    expected = torch.zeros(128, 128, dtype=torch.bool)
    expected[25:57, :] = True  # hand-computed: rows 8a+1 .. 8b+8 after the x2 resize
    assert torch.equal(out[0], expected)
    # crop: only the top 48 x 64 of the padded input is image; original is 48 x 64
    probs = torch.zeros(1, 16, 16)
    probs[0, 10:, :] = 1.0  # only rows inside the resized image count
    out = postprocess_masks(probs, (48, 64), (48, 64))
    assert out.shape == (1, 48, 64)
    assert out[0, :41].sum() == 0 and out[0, 41:].all()


def test_postprocess_masks_clip_boxes():
    probs = torch.ones(1, 16, 16)
    out = postprocess_masks(probs, (64, 64), (64, 64),
                            clip_boxes=torch.tensor([[10.2, 5.0, 20.0, 30.7]]))
    expected = torch.zeros(64, 64, dtype=torch.bool)
    expected[5:31, 10:20] = True  # pixel centres (x + 0.5, y + 0.5) inside the box
    assert torch.equal(out[0], expected)
