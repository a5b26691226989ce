"""Per-box scale of box prompts (serving/inference/box_scale.py): which scales each box gets,
the crop geometry round trip, the choice by quality, the collapsed-mask fallback, and the
Segmenter's prompted path with it on and off."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from serving import Segmenter
from serving.errors import InputError
from serving.inference import box_scale as bs
from serving.inference import quality
from serving.inference.postprocess import PromptDetections

TRAIN = 32.0  # training objects' median size at the input, px
SIZES = (16.0, TRAIN, 48.0)  # p10, p50, p90


class BoxBackend:
    """A backend whose mask is exactly the prompt box (probability ``inside`` there, 0.01
    elsewhere) and whose score is 1 when the box is ``best`` px at the input (sqrt(w*h)),
    falling off with the log-ratio; records every input box."""

    name, device = "fake", "cpu"

    def __init__(self, best: float = TRAIN, inside: float = 0.99) -> None:
        self.best, self.inside, self.seen = best, inside, []

    def segment_boxes(self, images, image_sizes, boxes, labels):
        bsz, m = boxes.shape[:2]
        h4, w4 = images.shape[-2] // 4, images.shape[-1] // 4
        ys = torch.arange(h4, dtype=torch.float32) * 4 + 2  # stride-4 cell centres
        xs = torch.arange(w4, dtype=torch.float32) * 4 + 2
        probs = torch.full((bsz, m, h4, w4), 0.01)
        scores = torch.zeros(bsz, m)
        for b in range(bsz):
            for j in range(m):
                x1, y1, x2, y2 = boxes[b, j].tolist()
                self.seen.append((x1, y1, x2, y2))
                inside = ((ys >= y1) & (ys <= y2))[:, None] & ((xs >= x1) & (xs <= x2))[None]
                probs[b, j][inside] = self.inside
                side = math.sqrt((x2 - x1) * (y2 - y1))
                scores[b, j] = math.exp(-abs(math.log(side / self.best)))
        return PromptDetections(probs, scores, labels.clamp(min=0))


class Cfg:
    min_size, max_size, mask_threshold, clip_to_box, max_prompt_boxes = 128, 512, 0.5, True, 256


def test_box_scales_put_a_tiny_and_a_huge_box_at_the_trained_sizes():
    boxes = np.array([[1000, 1000, 1020, 1020], [500, 500, 3500, 3500], [0, 0, 4, 4],
                      [0, 0, 1000, 1000]], np.float32)
    model_scale = 128 / 4000  # a 1000 px box is 32 px at the model's size: inside p10-p90
    tiny, huge, minute, fine = bs.box_scales(boxes, model_scale, SIZES)
    assert tiny * 20 == pytest.approx(16)  # 20 px (0.64 px at the model scale) -> p10
    assert huge * 3000 == pytest.approx(48)  # 3000 px (96 px at the model scale) -> p90
    assert minute == bs.BoxScaleOptions().max_upsample == 1.5  # a 4 px box: at most 1.5x
    assert fine == pytest.approx(model_scale)  # already among the training sizes: unchanged
    median = bs.box_scales(boxes, model_scale, SIZES, bs.BoxScaleOptions(fit="median"))
    np.testing.assert_allclose(median * [20, 3000, 4, 1000], [30, 32, 6, 32])  # capped at 1.5x
    # without calibration: today's whole-image scale for every box
    np.testing.assert_array_equal(bs.box_scales(boxes, 0.032, None), [0.032] * 4)


def test_scale_groups_share_the_whole_image_when_it_is_small_enough():
    scales = np.array([1.0, 1.2, 1.5, 4.0, 0.3])
    scale, members = bs.scale_groups(scales, (256, 256), 4 * 256 ** 2)
    assert scale == pytest.approx(1.2)  # the median
    np.testing.assert_array_equal(members, [True, True, True, False, False])  # within 2x
    assert bs.scale_groups(scales, (4000, 4000), 4 * 256 ** 2)[0] is None  # too large: crops
    off = bs.scale_groups(scales, (256, 256), 4 * 256 ** 2, bs.BoxScaleOptions(group=False))
    assert off[0] is None and not off[1].any()


@pytest.mark.parametrize("group", [True, False])
def test_tiny_and_huge_box_are_segmented_at_the_trained_size_and_pasted_back_exactly(group):
    image = np.zeros((4000, 4000, 3), np.uint8)
    boxes = np.array([[1000, 1000, 1020, 1020], [500, 500, 3500, 3500]], np.float32)
    image[500:3500, 500:3500] = 200  # each object a flat colour on a flat background
    image[1000:1020, 1000:1020] = 100
    backend = BoxBackend()
    out = bs.segment_per_box(backend, image, boxes, np.array([-1, -1]), Cfg(), SIZES,
                             bs.BoxScaleOptions(group=group))
    sides = [math.sqrt((x2 - x1) * (y2 - y1)) for x1, y1, x2, y2 in backend.seen]
    assert sides == [pytest.approx(16, rel=0.05), pytest.approx(48, rel=0.05)]  # p10, p90
    # sqrt(box score) x confidence^2 x projections^3 (the rim's interpolated rows of the
    # stride-4 mask reach less) x colour separation and distance (~1: flat colours) x
    # boundary sharpness^2: ~1 for the small box (refined onto its colour edge), ~0.5^2 for
    # the huge one (its region too large to refine: the stride-4 rim ramps over ~4 input px)
    assert 0.7 * 0.5 ** 0.5 < out.scores[0] < 0.5 ** 0.5
    assert 0.15 * 0.67 ** 0.5 < out.scores[1] < 0.3 * 0.67 ** 0.5
    for i, (x1, y1, x2, y2) in enumerate(boxes):  # each mask lands on its box, filled
        y0, x0, ye, xe = out.masks.box(i)  # within 1.5 stride-4 cells of the crop's input
        atol = 6 * (x2 - x1) / sides[i]
        assert np.allclose([x0, y0, xe, ye], [x1, y1, x2, y2], atol=atol)
        assert out.masks.crops[i].mean() > 0.95


def test_boxes_of_one_scale_share_one_whole_image_run_and_match_the_crops():
    image = np.zeros((256, 256, 3), np.uint8)
    boxes = np.array([[20, 20, 52, 52], [100, 100, 140, 130], [200, 30, 230, 64]], np.float32)
    whole, cropped = BoxBackend(), BoxBackend()
    a = bs.segment_per_box(whole, image, boxes, np.array([0, 0, 0]), Cfg(), SIZES)
    b = bs.segment_per_box(cropped, image, boxes, np.array([0, 0, 0]), Cfg(), SIZES,
                           bs.BoxScaleOptions(group=False))
    assert len(whole.seen) == len(cropped.seen) == 3
    for i in range(3):
        inter = (a.masks.mask(i) & b.masks.mask(i)).sum()
        assert inter / (a.masks.mask(i) | b.masks.mask(i)).sum() > 0.9


def test_a_collapsed_mask_falls_back_and_scores_zero():
    image = np.zeros((256, 256, 3), np.uint8)
    boxes = np.array([[100, 100, 140, 140]], np.float32)
    # probability 0.3 < 0.5 inside the box: the fallback keeps the model's most likely
    # pixels (above half their peak), and the score says it fell back
    weak = BoxBackend(inside=0.3)
    out = bs.segment_per_box(weak, image, boxes, np.array([0]), Cfg(), SIZES)
    area = out.masks.areas()[0]
    assert 0.8 * 40 * 40 < area <= 40 * 40 and out.scores[0] == 0.0
    off = bs.segment_per_box(weak, image, boxes, np.array([0]), Cfg(), SIZES,
                             bs.BoxScaleOptions(fallback=False))
    assert off.masks.areas()[0] == 0 and off.scores[0] > 0


def test_the_fallback_threshold_is_half_the_peak_and_read_only_for_a_collapsed_mask(
        monkeypatch):
    image = np.zeros((256, 256, 3), np.uint8)
    boxes = np.array([[100, 100, 140, 140]], np.float32)
    # two candidates' peaks 0.3 and 0.5 inside the box: half their mean, 0.2
    probs = [torch.full((64, 64), 0.01) for _ in range(2)]
    for p, peak in zip(probs, (0.3, 0.5)):
        p[30, 30] = peak
    pairs = [(bs.Crop(0, 1.0, (0, 0, 256, 256), (256, 256), boxes[0]), bs.CropResult(p, 1.0, 0))
             for p in probs]
    assert bs.fallback_threshold(pairs, Cfg()) == pytest.approx(0.2)
    confident = torch.full((64, 64), 0.01)
    confident[30, 30] = 1.0  # half of it is the mask threshold: never above it
    single = [(pairs[0][0], bs.CropResult(confident, 1.0, 0))]
    assert bs.fallback_threshold(single, Cfg()) == Cfg.mask_threshold
    # a good mask never reads it
    monkeypatch.setattr(bs, "fallback_threshold", lambda *a: pytest.fail("read the peak"))
    out = bs.segment_per_box(BoxBackend(), image, boxes, np.array([0]), Cfg(), SIZES)
    assert out.masks.areas()[0] > 0.9 * 40 * 40 and out.scores[0] > 0


def test_unclipped_masks_are_scored_on_the_network_probabilities_they_come_from(monkeypatch):
    """Without ``clip_to_box`` the mask is the network's own (pasted), so the score must read
    the unrefined probabilities: no colour model, no guided filter."""
    from serving.inference import refine

    class Unclipped(Cfg):
        clip_to_box = False

    image = np.zeros((256, 256, 3), np.uint8)
    image[60:140, 60:140] = 200
    boxes = np.array([[60, 60, 140, 140]], np.float32)
    clipped = bs.segment_per_box(BoxBackend(), image, boxes, np.array([0]), Cfg(), SIZES)
    monkeypatch.setattr(refine, "colour_model", lambda *a, **k: pytest.fail("colour model"))
    monkeypatch.setattr(refine, "guided_coefficients",
                        lambda *a, **k: pytest.fail("filtered"))
    out = bs.segment_per_box(BoxBackend(), image, boxes, np.array([0]), Unclipped(), SIZES)
    assert out.masks.areas()[0] > 0.9 * 80 * 80 and 0 < out.scores[0] <= 1
    assert clipped.scores[0] > 0  # the clipped path refines (the patches were not yet set)


def test_mask_confidence_hand_computed():
    probs = torch.tensor([[0.9, 0.6, 1.2], [0.1, 0.3, 0.5]])
    inside = np.array([[True, True, False], [True, True, False]])
    assert quality.mask_confidence(probs, inside) == pytest.approx((0.8 + 0.2 + 0.8 + 0.4) / 4)
    assert quality.mask_confidence(probs, ~inside) == pytest.approx(0.5)  # 1.2 clamped to 1
    assert quality.mask_confidence(probs, np.zeros((2, 3), bool)) == 0.0


def test_segmenter_default_uses_per_box_scale_and_can_turn_it_off(tiny_checkpoint,
                                                                    sample_image):
    seg = Segmenter.load(tiny_checkpoint, device="cpu")
    assert seg.box_scale and not seg.with_box_scale(False).box_scale
    assert not seg.with_image_size(160).box_scale  # an explicit size is an override
    # the score's definition follows the path: the quality estimate, or the box score
    assert seg.prompt_score == quality.SCORE_VERSION
    assert seg.with_image_size(160).prompt_score is None
    assert not Segmenter.load(tiny_checkpoint, device="cpu", box_scale=False).box_scale
    with pytest.raises(InputError, match="box_scale"):
        Segmenter.load(tiny_checkpoint, device="cpu", box_scale="off")
    boxes = [[30, 20, 80, 60], [90, 50, 150, 110]]
    on, off = seg.predict(sample_image, boxes=boxes), \
        seg.with_box_scale(False).predict(sample_image, boxes=boxes)
    assert len(on) == len(off) == 2
    np.testing.assert_array_equal(on.boxes, off.boxes)
    assert all(m[:, :].any() for m in on.masks)
    # masks stay inside their boxes either way
    for pred in (on, off):
        for mask, (x1, y1, x2, y2) in zip(pred.masks, boxes):
            assert not mask[:y1].any() and not mask[y2:].any() and not mask[:, x2:].any()
            assert not mask[:, :x1].any()


def test_an_8px_box_on_a_4000px_image_gets_a_non_empty_mask(varied_checkpoint):
    seg = Segmenter.load(varied_checkpoint, device="cpu")
    seg.info["calibration"] = {"object_sizes": {"p10": 16.0, "p50": 24.0, "p90": 40.0}}
    image = np.random.default_rng(0).integers(0, 255, (4000, 4000, 3), dtype=np.uint8)
    pred = seg.predict(image, boxes=[[2000, 1500, 2008, 1508]])
    mask = pred.masks[0]
    assert mask.any() and not mask[:1500].any() and not mask[:, 2008:].any()


def test_a_box_overlapping_another_prompt_box_keeps_its_mask_and_scores_lower():
    """The score's crowding term: the same mask, its score times (1 - IoU) ** power, where
    IoU is the box's highest with another box of the same prompt; a distant box changes
    nothing."""
    image = np.zeros((256, 256, 3), np.uint8)
    image[40:90, 40:90] = 180
    box = np.array([[40, 40, 90, 90]], np.float32)
    alone = bs.segment_per_box(BoxBackend(), image, box, np.array([0]), Cfg(), SIZES)
    near = np.array([[40, 40, 90, 90], [65, 40, 115, 90]], np.float32)  # IoU 1/3
    far = np.array([[40, 40, 90, 90], [180, 180, 230, 230]], np.float32)
    for boxes, iou in ((near, 1 / 3), (far, 0.0)):
        out = bs.segment_per_box(BoxBackend(), image, boxes, np.array([0, 0]), Cfg(), SIZES)
        assert np.array_equal(out.masks.mask(0), alone.masks.mask(0))
        assert out.scores[0] == pytest.approx(
            alone.scores[0] * (1 - iou) ** quality.CROWDING_POWER, rel=1e-6)
