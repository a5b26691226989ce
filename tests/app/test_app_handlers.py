"""The app's handlers as plain functions: uploads, boxes, modes, outputs and every refusal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from app_helpers import SERVER_MAX_SIDE, two_rect_image
from PIL import Image

from serving.errors import BoxError, ImageError, InputError
from serving.inference.quality import SCORE_VERSION

pytest.importorskip("gradio", reason="the app needs the 'app' extra: pip install -e .[app]")
pytest.importorskip("gradio_image_annotation", reason="the app needs the 'app' extra")

BOXES = [[25.0, 15.0, 85.0, 65.0], [85.0, 45.0, 155.0, 115.0]]


def _mask_inside(mask: np.ndarray, box) -> bool:
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    outside = mask.copy()
    outside[y1:y2, x1:x2] = False
    return not outside.any()


# ----------------------------------------------------------------- parsing
def test_parse_boxes_accepts_every_form():
    from app.handlers import parse_boxes

    boxes, labels = parse_boxes([
        [1, 2, 3, 4],
        {"box": [5, 6, 7, 8], "label": "ring"},
        {"xmin": 9, "ymin": 10, "xmax": 11, "ymax": 12, "label": "auto"},
        {"box": [0, 0, 2, 2], "label": 2},
        {"box": [0, 0, 2, 2], "label": -1},
        {"xmin": 0, "ymin": 0, "xmax": 3, "ymax": 3, "label": ""},
    ])
    assert boxes.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [0, 0, 2, 2],
                              [0, 0, 2, 2], [0, 0, 3, 3]]
    assert labels == [None, "ring", None, 2, None, None]
    empty, no_labels = parse_boxes(None)
    assert empty.shape == (0, 4) and no_labels == []


@pytest.mark.parametrize("item, fragment", [
    ([1, 2, 3], "box 1"), ({"x": 1}, "box 1"), (["a", 2, 3, 4], "box 1"),
    ({"box": [1, 2, 3, 4], "label": 1.5}, "box 1: label"),
])
def test_parse_boxes_rejects_bad_items_with_their_index(item, fragment):
    from app.handlers import parse_boxes

    with pytest.raises(InputError, match=fragment):
        parse_boxes([[0, 0, 5, 5], item])


def test_parse_boxes_json():
    from app.handlers import parse_boxes_json

    boxes, labels = parse_boxes_json('[[1, 2, 3, 4], {"box": [5, 6, 7, 8], "label": "disc"}]')
    assert boxes.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]] and labels == [None, "disc"]
    assert parse_boxes_json("  ")[0].shape == (0, 4)
    with pytest.raises(BoxError, match="not valid JSON"):
        parse_boxes_json("[[1, 2, 3, 4]")
    with pytest.raises(BoxError, match="JSON list"):
        parse_boxes_json('{"box": [1, 2, 3, 4]}')


# ----------------------------------------------------------------- uploads
def test_read_upload_refusals(tmp_path):
    from app.handlers import read_upload

    with pytest.raises(ImageError, match="nothing uploaded"):
        read_upload(None, 100)
    bad = tmp_path / "holiday.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ImageError) as err:
        read_upload(str(bad), 100)
    assert "holiday.png" in str(err.value) and str(tmp_path) not in str(err.value)
    big = tmp_path / "big.png"
    Image.new("RGB", (101, 20)).save(big)
    with pytest.raises(ImageError, match="101x20 px is larger than the 100 px"):
        read_upload(str(big), 100)
    with pytest.raises(ImageError, match="20x101 px"):  # arrays are checked after decoding
        read_upload(np.zeros((101, 20, 3), np.uint8), 100)
    assert read_upload(np.zeros((100, 20, 3), np.uint8), 100).shape == (100, 20, 3)


def test_segment_rejects_bad_upload_and_oversized_image(handlers, tmp_path):
    bad = tmp_path / "x.jpg"
    bad.write_bytes(b"")
    with pytest.raises(ImageError, match="x.jpg"):
        handlers.segment(str(bad), BOXES)
    with pytest.raises(ImageError, match=f"{SERVER_MAX_SIDE} px limit"):
        handlers.segment(np.zeros((20, SERVER_MAX_SIDE + 1, 3), np.uint8), BOXES)


# ----------------------------------------------------------------- box mode
def test_two_boxes_give_two_masks_inside_them_and_consistent_files(handlers, tiny_segmenter):
    from pycocotools.coco import COCO

    img = two_rect_image()
    res = handlers.segment(img, BOXES)
    ref = tiny_segmenter.predict(img, boxes=BOXES)  # the library's own answer
    assert [r[0] for r in res.rows] == [1, 2]
    assert [r[1] for r in res.rows] == ref.label_names
    assert res.overlay.shape == img.shape and res.overlay.dtype == np.uint8
    coco = COCO(str(res.json_path))
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[1]))
    assert [a["id"] for a in anns] == [1, 2]
    png = np.asarray(Image.open(res.png_path))
    assert png.shape == img.shape[:2]
    for i, (ann, box) in enumerate(zip(anns, BOXES, strict=True)):
        mask = coco.annToMask(ann).astype(bool)
        np.testing.assert_array_equal(mask, ref.masks[i])
        assert mask.any() and _mask_inside(mask, box)
        assert ann["area"] == int(mask.sum()) == res.rows[i][3]
        assert ann["bbox"] == [box[0], box[1], box[2] - box[0], box[3] - box[1]]
        np.testing.assert_array_equal(png == i + 1, mask)  # the boxes do not overlap
    assert json.loads(res.json_path.read_text()) == res.coco


def test_class_choice_is_respected(handlers, tiny_segmenter):
    img = two_rect_image()
    res = handlers.segment(img, [{"box": BOXES[0], "label": "ring"},
                                 {"xmin": 85, "ymin": 45, "xmax": 155, "ymax": 115,
                                  "label": 0}])
    assert [r[1] for r in res.rows] == ["ring", "disc"]
    assert [a["category_id"] for a in res.coco["annotations"]] == [2, 1]
    auto = handlers.segment(img, [{"box": b, "label": "auto"} for b in BOXES])
    assert [r[1] for r in auto.rows] == tiny_segmenter.predict(img, boxes=BOXES).label_names
    with pytest.raises(InputError, match="unknown class 'cat'"):
        handlers.segment(img, [{"box": BOXES[0], "label": "cat"}])


def test_too_many_and_bad_boxes(tiny_checkpoint, tmp_path):
    from app.handlers import Handlers
    from serving import Segmenter

    h = Handlers(Segmenter.load(tiny_checkpoint, device="cpu"), output_dir=tmp_path,
                 max_boxes=2)
    img = two_rect_image()
    with pytest.raises(BoxError, match="3 drawn, this app takes at most 2"):
        h.segment(img, BOXES + [[0, 0, 10, 10]])
    with pytest.raises(BoxError, match="box 1: .*reversed or has zero area"):
        h.segment(img, [BOXES[0], [50, 50, 40, 60]])
    with pytest.raises(BoxError, match="box 0: contains NaN"):
        h.segment(img, [[float("nan"), 0, 10, 10]])
    with pytest.raises(BoxError, match="box 0: lies outside"):
        h.segment(img, [[500, 500, 600, 600]])
    with pytest.raises(BoxError, match="none drawn"):
        h.segment(img, [])
    assert len(h.segment(img, BOXES).rows) == 2  # still serving after the refusals


def test_options_are_checked(handlers):
    img = two_rect_image()
    with pytest.raises(InputError, match="mode 'everything'"):
        handlers.segment(img, BOXES, mode="everything")
    with pytest.raises(InputError, match="threshold 1.5"):
        handlers.segment(img, None, mode="automatic", threshold=1.5)


def test_orientation_rotates_the_image_before_boxes_apply(handlers):
    img = two_rect_image()  # 120 x 160
    res = handlers.segment(img, [[10, 10, 50, 50]], orientation=1)  # one quarter turn cw
    assert res.overlay.shape == (160, 120, 3)
    assert res.coco["images"][0]["width"] == 120 and res.coco["images"][0]["height"] == 160


# ----------------------------------------------------------------- automatic mode
def test_automatic_mode_threshold(handlers):
    img = two_rect_image()
    everything = handlers.segment(img, BOXES, mode="automatic", threshold=0.0)  # boxes ignored
    scores = np.array([a["score"] for a in everything.coco["annotations"]])
    assert len(scores) > 1 and (np.diff(scores) <= 0).all()  # sorted by score
    distinct = np.unique(scores)
    t = float(distinct[len(distinct) // 2 - 1] + distinct[len(distinct) // 2]) / 2
    kept = handlers.segment(img, None, mode="automatic", threshold=t)
    assert [a["score"] for a in kept.coco["annotations"]] == scores[scores > t].tolist()
    assert "automatic mode" in kept.message
    none = handlers.segment(img, None, mode="automatic", threshold=1.0)
    assert none.rows == [] and none.coco["annotations"] == []
    assert np.asarray(Image.open(none.png_path)).max() == 0


# ----------------------------------------------------------------- the Gradio callbacks
def test_page_handler_turns_errors_into_messages(handlers, tmp_path):
    import gradio as gr

    from app.ui import make_page_handler

    page = make_page_handler(handlers)
    good = tmp_path / "good.png"
    two_rect_image(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.warns(UserWarning, match="bad.png"):
        out = page({"image": str(bad), "boxes": [], "orientation": 0}, False, 0.3)
    assert out[0] is None and out[4].startswith("**Error:**") and "bad.png" in out[4]
    assert page(None, False, 0.3)[4] == "Upload an image or pick an example."
    # no boxes yet: the image comes back with a hint
    shown = page({"image": str(good), "boxes": [], "orientation": 0}, False, 0.3)
    assert shown[0].shape == (120, 160, 3) and shown[1] == [] and "Draw a box" in shown[4]
    # a zero-size box is one being drawn: the outputs stay as they are until the release
    boxes = [{"xmin": 25, "ymin": 15, "xmax": 85, "ymax": 65, "label": "ring"}]
    mid_draw = {"xmin": 40, "ymin": 40, "xmax": 40, "ymax": 40, "label": ""}
    skipped = page({"image": str(good), "boxes": [mid_draw, *boxes], "orientation": 0}, False, 0)
    assert all(o == gr.skip() for o in skipped)
    overlay, rows, json_path, png_path, status = page(
        {"image": str(good), "boxes": boxes, "orientation": 0}, False, 0.3)
    assert rows[0][1] == "ring" and len(rows) == 1 and status.startswith("**Done:**")
    assert Path(json_path).is_file() and Path(png_path).is_file()
    too_many = [{"xmin": 0, "ymin": 0, "xmax": 20 + i, "ymax": 20, "label": ""}
                for i in range(handlers.max_boxes + 1)]
    with pytest.warns(UserWarning, match="at most"):
        out = page({"image": str(good), "boxes": too_many, "orientation": 0}, False, 0.3)
    assert "at most" in out[4]
    auto = page({"image": str(good), "boxes": [], "orientation": 0}, True, 0.0)
    assert len(auto[1]) > 0 and "automatic" in auto[4]


def test_api_handler_raises_gradio_errors(handlers, tmp_path):
    import gradio as gr

    from app.ui import make_api_handler

    api = make_api_handler(handlers)
    good = tmp_path / "good.png"
    two_rect_image(good)
    overlay, coco, png = api(str(good), json.dumps(BOXES), "boxes", 0.3)
    assert overlay.shape == (120, 160, 3) and len(coco["annotations"]) == 2
    with pytest.raises(gr.Error, match="not valid JSON"):
        api(str(good), "[[1, 2", "boxes", 0.3)
    with pytest.raises(gr.Error, match="nothing uploaded"):
        api(None, "[]", "boxes", 0.3)


def test_serial_backends_get_a_lock(tiny_segmenter, tmp_path):
    from app.handlers import Handlers
    from serving import Segmenter

    class RenamedBackend:  # the torch backend posing as TensorRT, which is not thread-safe
        def __init__(self, inner):
            self.inner, self.name, self.device = inner, "tensorrt", inner.device

        def detect(self, *a):
            return self.inner.detect(*a)

        def segment_boxes(self, *a):
            return self.inner.segment_boxes(*a)

    seg = Segmenter(RenamedBackend(tiny_segmenter.backend), tiny_segmenter.class_names,
                    tiny_segmenter.cfg, tiny_segmenter.info)
    h = Handlers(seg, output_dir=tmp_path)
    assert h._lock is not None and Handlers(tiny_segmenter, output_dir=tmp_path)._lock is None
    assert len(h.segment(two_rect_image(), BOXES).rows) == 2
    assert "backend `tensorrt`" in h.model_markdown()


# ----------------------------------------------------------------- the model's own defaults
def test_default_threshold_and_out_of_domain_note_come_from_the_calibration(tmp_path):
    from sim_testing import make_tiny_checkpoint

    from app.handlers import Handlers
    from serving import Segmenter
    from serving.model.card import Calibration
    from serving.model.model_file import recalibrate_checkpoint

    model = make_tiny_checkpoint(tmp_path / "m.safetensors", detections=False)  # low scores
    image = two_rect_image()
    plain = Handlers(Segmenter.load(model, device="cpu"), output_dir=tmp_path / "a")
    assert plain.default_threshold == 0.05  # no calibration: the model's own threshold
    res = plain.segment(image, BOXES)
    assert "Warning" not in res.message
    scores = [row[2] for row in res.rows]
    assert max(scores) < 0.3
    recalibrate_checkpoint(model, Calibration(score_threshold=0.02, prompt_scores={"p50": 0.8},
                                              prompt_score=SCORE_VERSION))
    calibrated = Handlers(Segmenter.load(model, device="cpu"), output_dir=tmp_path / "b")
    assert calibrated.default_threshold == 0.02
    auto = calibrated.segment(image, None, mode="automatic")
    assert "scoring at least 0.02" in auto.message
    assert all(row[2] >= 0.02 for row in auto.rows)
    prompted = calibrated.segment(image, BOXES)
    assert "Warning: out of domain: the median box score is" in prompted.message
