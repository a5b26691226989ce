"""``Segmenter`` end to end on tiny random-weight checkpoints: automatic and box-prompted modes,
prompt order, clipping, labels, batching, and the ``python -m serving`` error contract."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from sim_testing import TINY_CLASSES

from serving import Prediction, Segmenter
from serving.__main__ import main as cli_main
from serving.inference import quality

BOXES = [[30, 20, 80, 60], [90, 50, 150, 110], [5, 5, 25, 30], [40.5, 70.25, 120.75, 118]]


@pytest.fixture(scope="module")
def seg(varied_checkpoint):
    return Segmenter.from_checkpoint(varied_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def image(sample_image):
    return sample_image


def inside_box(masks: np.ndarray, boxes) -> bool:
    """Every True pixel's centre lies inside its box."""
    for m, (x1, y1, x2, y2) in zip(masks, boxes):
        ys, xs = np.nonzero(m)
        if not (((xs + 0.5) >= x1) & ((xs + 0.5) <= x2) & ((ys + 0.5) >= y1)
                & ((ys + 0.5) <= y2)).all():
            return False
    return True


def assert_same(a: Prediction, b: Prediction) -> None:
    assert len(a) == len(b)
    np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    assert np.array_equal(a.labels, b.labels)
    # masks may differ only where a probability sits on the threshold (float noise)
    assert (a.masks != b.masks).sum() <= max(1, a.masks.size // 10_000)


# ------------------------------------------------------------------ automatic mode
def test_automatic_prediction_contract(seg, image):
    pred = seg.predict(image)
    assert isinstance(pred, Prediction)
    assert 0 < len(pred) <= 20
    assert pred.boxes.dtype == np.float32 and pred.boxes.shape == (len(pred), 4)
    assert pred.scores.dtype == np.float32 and pred.labels.dtype == np.int64
    assert pred.masks.dtype == bool and pred.masks.shape == (len(pred), 120, 160)
    assert pred.image_size == (120, 160)
    assert np.all(np.diff(pred.scores) <= 0)
    assert np.all((pred.scores >= 0) & (pred.scores <= 1))
    assert np.all((pred.labels >= 0) & (pred.labels < 3))
    b = pred.boxes
    assert np.all(b[:, 0] >= 0) and np.all(b[:, 2] <= 160 + 1e-3)
    assert np.all(b[:, 1] >= 0) and np.all(b[:, 3] <= 120 + 1e-3)
    assert np.all(b[:, 2] > b[:, 0]) and np.all(b[:, 3] > b[:, 1])
    assert pred.label_names == [TINY_CLASSES[i] for i in pred.labels]
    assert np.array_equal(pred.areas, pred.masks.sum(axis=(1, 2)))


def test_automatic_score_threshold(seg, image):
    full = seg.predict(image)
    cut = float(np.median(full.scores))
    part = seg.predict(image, score_threshold=cut)
    assert len(part) == int((full.scores >= cut).sum()) and np.all(part.scores >= cut)
    np.testing.assert_allclose(part.scores, full.scores[full.scores >= cut])


def test_image_sources_agree(seg, image, tmp_path):
    path = tmp_path / "im.png"
    Image.fromarray(image).save(path)
    a = seg.predict(image, boxes=BOXES[:2])
    for source in (path, str(path), path.read_bytes(), Image.fromarray(image)):
        assert_same(seg.predict(source, boxes=BOXES[:2]), a)


# ------------------------------------------------------------------ box-prompted mode
def test_one_mask_per_box_in_order(seg, image):
    pred = seg.predict(image, boxes=BOXES)
    assert len(pred) == len(BOXES)
    assert pred.masks.shape == (len(BOXES), 120, 160)
    np.testing.assert_allclose(pred.boxes, np.array(BOXES, np.float32))
    rev = seg.predict(image, boxes=BOXES[::-1])
    np.testing.assert_allclose(rev.boxes, pred.boxes[::-1])
    np.testing.assert_allclose(rev.scores, pred.scores[::-1], atol=1e-6)
    assert np.array_equal(rev.labels, pred.labels[::-1])
    assert np.array_equal(rev.masks, pred.masks[::-1])
    # each box alone gives the same mask as in the group, and the score of a box that
    # overlaps no other (the group's score lowers those that overlap: quality.crowding)
    crowded = quality.crowding(np.array(BOXES, np.float32))
    for i, box in enumerate(BOXES):
        single = seg.predict(image, boxes=[box])
        assert np.array_equal(single.masks[0], pred.masks[i])
        np.testing.assert_allclose(
            single.scores[0] * (1 - crowded[i]) ** quality.CROWDING_POWER, pred.scores[i],
            rtol=1e-5, atol=1e-6)


def test_masks_never_leave_their_box(seg, varied_checkpoint, image):
    pred = seg.predict(image, boxes=BOXES)
    assert seg.cfg.clip_to_box
    assert inside_box(pred.masks, BOXES)
    assert pred.masks.any()
    free = Segmenter.from_checkpoint(varied_checkpoint, device="cpu", clip_to_box=False)
    unclipped = free.predict(image, boxes=BOXES)
    assert not inside_box(unclipped.masks, BOXES)  # so the check above is not vacuous
    # clipping only removes pixels (compared unrefined: the full-resolution refinement runs
    # on clipped masks only, and may add pixels inside the box)
    raw = seg.with_box_scale(True, refine=False).predict(image, boxes=BOXES)
    assert inside_box(raw.masks, BOXES) and np.all(raw.masks <= unclipped.masks)


def test_prompted_masks_are_not_all_identical(seg, image):
    pred = seg.predict(image, boxes=BOXES)
    inside = [m[int(y1):int(y2), int(x1):int(x2)].mean()
              for m, (x1, y1, x2, y2) in zip(pred.masks, BOXES)]
    assert len({round(v, 3) for v in inside}) > 1


def test_labels_given_by_index_name_or_predicted(seg, image):
    auto = seg.predict(image, boxes=BOXES[:3])
    also_auto = seg.predict(image, boxes=BOXES[:3], labels=[-1, None, -1])
    assert np.array_equal(auto.labels, also_auto.labels)
    np.testing.assert_allclose(auto.scores, also_auto.scores)
    forced = [(int(lab) + 1) % 3 for lab in auto.labels]
    given = seg.predict(image, boxes=BOXES[:3], labels=forced)
    assert given.labels.tolist() == forced
    # the class does not change the mask, but it changes the score
    assert np.array_equal(given.masks, auto.masks)
    assert not np.allclose(given.scores, auto.scores)
    named = seg.predict(image, boxes=BOXES[:3], labels=[TINY_CLASSES[i] for i in forced])
    assert named.labels.tolist() == forced
    np.testing.assert_allclose(named.scores, given.scores)
    mixed = seg.predict(image, boxes=BOXES[:3], labels=[forced[0], -1, TINY_CLASSES[forced[2]]])
    assert mixed.labels.tolist() == [forced[0], int(auto.labels[1]), forced[2]]


def test_predict_batch_mixed_modes_keeps_order(seg, image):
    rng = np.random.default_rng(0)
    other = rng.integers(0, 255, image.shape, dtype=np.uint8)
    third = np.ascontiguousarray(image[::-1])
    images = [image, other, third, image]
    boxes = [None, BOXES[:1], None, BOXES]
    labels = [None, [2], None, None]
    preds = seg.predict_batch(images, boxes=boxes, labels=labels, batch_size=2)
    assert len(preds) == 4
    for im, bx, lb, pred in zip(images, boxes, labels, preds):
        assert_same(pred, seg.predict(im, boxes=bx, labels=lb))
    assert preds[1].labels.tolist() == [2] and len(preds[3]) == len(BOXES)
    # batch size does not change the results
    for a, b in zip(preds, seg.predict_batch(images, boxes=boxes, labels=labels, batch_size=8)):
        assert_same(a, b)


def test_predict_batch_different_sizes(seg, image):
    small = np.ascontiguousarray(image[:80, :100])
    preds = seg.predict_batch([image, small], boxes=[BOXES[:2], [[10, 10, 60, 70]]])
    assert preds[0].masks.shape == (2, 120, 160)
    assert preds[1].masks.shape == (1, 80, 100)
    assert inside_box(preds[1].masks, [[10, 10, 60, 70]])


def test_small_square_image(tiny_checkpoint):
    """A 100x100 image resized to 128x128 has a 1x1 P7 (GroupNorm edge case)."""
    small = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu")
    img = np.full((100, 100, 3), 90, np.uint8)
    assert small.predict(img).masks.shape[1:] == (100, 100)
    assert small.predict(img, boxes=[[10, 10, 60, 50]]).masks.shape == (1, 100, 100)


# ------------------------------------------------------------------ command line
def test_cli_info_and_error(varied_checkpoint, tmp_path, capsys):
    assert cli_main(["info", str(varied_checkpoint), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["classes"] == list(TINY_CLASSES) and info["backend"] == "torch"
    assert info["min_size"] == 128 and info["max_prompt_boxes"] == 256
    assert info["calibration"] == {}  # trained without a validation split
    assert cli_main(["info", "--model", str(varied_checkpoint)]) == 0
    text = capsys.readouterr().out
    assert f"classes:    {', '.join(TINY_CLASSES)}" in text and "calibration: none" in text
    assert cli_main(["info", str(tmp_path / "missing.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: model ") and "file not found; pass a .safetensors" in err
    assert err.count("\n") == 1
    assert cli_main(["nonsense"]) == 2
