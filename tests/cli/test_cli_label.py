"""``python -m serving label``: box-only COCO in, masks out; --evaluate; polygons; bad boxes."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from cli_data import cache_model_loads, decode, one_torch_thread, rle, shapes_dataset

from serving import Segmenter
from serving.cli.label import labels_to_results, main, run_label
from serving.cli.label_report import is_empty
from serving.formats.cocoeval import evaluate_coco


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_torch_thread()


@pytest.fixture()
def dataset(tmp_path):
    """The shapes dataset plus: a crowd box, a reversed box and a NaN box."""
    path = shapes_dataset(tmp_path / "data", num_images=3)
    data = json.loads(path.read_text())
    square = np.zeros((96, 128), bool)
    square[60:70, 50:60] = True
    data["annotations"] += [
        {"id": 50, "image_id": 100, "category_id": 1, "bbox": [50, 60, 10, 10], "iscrowd": 1,
         "area": 100, "segmentation": rle(square)},
        {"id": 51, "image_id": 101, "category_id": 1, "bbox": [60, 60, -10, 10], "iscrowd": 0,
         "area": 100, "segmentation": rle(square)},
        {"id": 52, "image_id": 102, "category_id": 3, "bbox": [math.nan, 5, 10, 10],
         "iscrowd": 0, "area": 100, "segmentation": rle(square)},
    ]
    path.write_text(json.dumps(data))
    return path, data


def _box_only(data):
    out = copy.deepcopy(data)
    for ann in out["annotations"]:
        if not ann.get("iscrowd"):
            ann.pop("segmentation", None)
            ann.pop("area", None)
    return out


def test_label_box_only_dataset(tmp_path, tiny_checkpoint, dataset, capsys, monkeypatch):
    path, data = dataset
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps(_box_only(data)))
    out = tmp_path / "labels" / "labelled.json"
    code = main(["--model", str(tiny_checkpoint), "--annotations", str(boxes), "--images",
                 str(tmp_path / "data" / "images"), "--output", str(out), "--device", "cpu",
                 "--batch-size", "2", "--no-progress"])
    stdout, err = capsys.readouterr()
    assert code == 3  # two boxes were rejected
    rejected = [ln for ln in err.splitlines() if ln.startswith("rejected:")]
    assert len(rejected) == 2
    assert "annotation 51:" in rejected[0] and "reversed" in rejected[0]
    assert "annotation 52:" in rejected[1] and "NaN" in rejected[1]
    assert "9 annotations labelled, 2 rejected" in stdout

    result = json.loads(out.read_text())
    source = _box_only(data)
    assert result["images"] == source["images"] and result["categories"] == source["categories"]
    assert result["info"] == {"note": "kept", "sim_label": {  # what made the labels, recorded
        "model": str(tiny_checkpoint), "image_size": [128, 256], "box_scale": True,
        "empty_fraction": 0.05}}
    assert [a["id"] for a in result["annotations"]] == [a["id"] for a in source["annotations"]]
    by_id = {a["id"]: a for a in result["annotations"]}
    assert by_id[50] == source["annotations"][9]  # crowd: unchanged
    for ann_id in (51, 52):  # bad boxes: left as they were, without segmentation
        same = next(a for a in source["annotations"] if a["id"] == ann_id)
        assert json.dumps(by_id[ann_id]) == json.dumps(same)  # (NaN != NaN, so as text)
    for src in source["annotations"][:9]:
        ann = by_id[src["id"]]
        assert {k: ann[k] for k in src} == src  # every input field kept
        mask = decode(ann["segmentation"], 96, 128)
        assert isinstance(ann["segmentation"]["counts"], str)
        assert ann["area"] == int(mask.sum())
        assert 0.0 <= ann["score"] <= 1.0
        x, y, w, h = src["bbox"]
        inside = np.zeros_like(mask)
        inside[int(y):math.ceil(y + h), int(x):math.ceil(x + w)] = True
        assert not (mask & ~inside).any()  # the mask stays inside its box

    # a rerun resumes from the progress log: nothing recomputed, same output
    calls = []
    original = Segmenter.predict_batch
    monkeypatch.setattr(Segmenter, "predict_batch",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    before = out.read_text()
    assert main(["--model", str(tiny_checkpoint), "--annotations", str(boxes), "--images",
                 str(tmp_path / "data" / "images"), "--output", str(out), "--device", "cpu",
                 "--no-progress"]) == 3
    assert calls == [] and out.read_text() == before


def test_evaluate_uses_evaluate_coco_on_the_labels(tmp_path, tiny_checkpoint, dataset, capsys):
    path, data = dataset
    out = tmp_path / "labelled.json"
    code = main(["--model", str(tiny_checkpoint), "--annotations", str(path), "--images",
                 str(tmp_path / "data" / "images"), "--output", str(out), "--evaluate",
                 "--device", "cpu", "--no-progress"])
    stdout, _ = capsys.readouterr()
    assert code == 3
    printed = {ln.split()[0]: float(ln.split()[1]) for ln in stdout.splitlines()
               if ln.startswith("segm/")}
    assert set(printed) == {"segm/AP", "segm/AP50", "segm/AP75", "segm/APs", "segm/APm",
                            "segm/APl"}
    result = json.loads(out.read_text())
    labelled = {a["id"] for a in result["annotations"] if a["id"] <= 9}
    results = labels_to_results(result, labelled)
    assert len(results) == 9 and all(r["score"] == by["score"] for r, by in zip(
        results, result["annotations"][:9], strict=True))
    direct = evaluate_coco(path, results, iou_types=("segm",))
    for key, value in direct.items():
        assert printed[key] == pytest.approx(100 * value if value >= 0 else value, abs=0.05)

    # box-only input + withheld masks: the same labels, so the same numbers
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps(_box_only(data)))
    summary = run_label(str(tiny_checkpoint), str(boxes), str(tmp_path / "data" / "images"),
                        str(tmp_path / "from_boxes.json"), evaluate=str(path), device="cpu",
                        progress=False)
    assert summary.metrics == direct
    assert direct["segm/AP"] < 1.0  # a random model's masks are not the ground truth

    # the same path with perfect labels gives AP 1: the comparison really uses the masks
    perfect = [{**r, "segmentation": a["segmentation"]} for r, a in
               zip(results, data["annotations"][:9], strict=True)]
    gt = {**data, "annotations": data["annotations"][:9]}  # without the unlabelled bad boxes
    assert evaluate_coco(gt, perfect, iou_types=("segm",))["segm/AP"] == pytest.approx(1.0)


def test_polygon_format_matches_rle(tmp_path, tiny_checkpoint, dataset, monkeypatch):
    cache_model_loads(monkeypatch)
    path, data = dataset
    images = str(tmp_path / "data" / "images")
    rle = run_label(str(tiny_checkpoint), str(path), images, str(tmp_path / "rle.json"),
                    device="cpu", progress=False)
    poly = run_label(str(tiny_checkpoint), str(path), images, str(tmp_path / "poly.json"),
                     fmt="polygon", device="cpu", progress=False)
    assert rle.labelled == poly.labelled == 9
    a = {x["id"]: x for x in json.loads((tmp_path / "rle.json").read_text())["annotations"]}
    b = {x["id"]: x for x in json.loads((tmp_path / "poly.json").read_text())["annotations"]}
    for ann_id in range(1, 10):
        m_rle = decode(a[ann_id]["segmentation"], 96, 128)
        seg = b[ann_id]["segmentation"]
        if isinstance(seg, dict):  # no polygon possible: kept as RLE
            assert not m_rle.any() or m_rle.sum() < 10
            continue
        m_poly = decode(seg, 96, 128)
        union = (m_rle | m_poly).sum()
        if m_rle.sum() >= 50:
            assert (m_rle & m_poly).sum() / union > 0.8
        assert b[ann_id]["area"] == a[ann_id]["area"]  # area is the mask's pixel count


def test_label_errors_before_work(tmp_path, tiny_checkpoint, dataset, capsys, monkeypatch):
    path, data = dataset
    monkeypatch.setattr(Segmenter, "load", lambda *a, **k: pytest.fail("model loaded"))
    images = str(tmp_path / "data" / "images")
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps(_box_only(data)))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [
        (["--annotations", str(boxes), "--images", images, "--output", str(blocker / "o.json"),
          "--evaluate"], "not writable"),
        (["--annotations", str(boxes), "--images", images, "--output", str(tmp_path / "o.json"),
          "--evaluate"], "lacks masks"),
        (["--annotations", str(boxes), "--images", str(tmp_path / "nope"), "--output",
          str(tmp_path / "o.json")], "not a folder"),
        (["--annotations", str(blocker), "--images", images, "--output",
          str(tmp_path / "o.json")], "neither a COCO JSON"),
        (["--annotations", str(boxes), "--images", images, "--output", str(boxes)],
         "is the input annotations file"),
    ]
    for args, message in cases:
        code = main(["--model", str(tiny_checkpoint), *args, "--no-progress"])
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("error: ") and message in err, err
        assert err.count("\n") == 1
    assert not (tmp_path / "o.json").exists()


def test_label_bad_image_and_interrupted_run(tmp_path, tiny_checkpoint, dataset, capsys,
                                             monkeypatch):
    path, data = dataset
    data = _box_only(data)
    data["images"].append({"id": 103, "file_name": "broken.png", "height": 96, "width": 128})
    data["annotations"].append({"id": 60, "image_id": 103, "category_id": 1,
                                "bbox": [1, 1, 20, 20]})
    (tmp_path / "data" / "images" / "broken.png").write_text("not a png")
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps(data))
    cache_model_loads(monkeypatch)
    calls: list[int] = []
    original = Segmenter.predict_batch

    def counting(self, images, *args, **kwargs):
        calls.append(len(images))
        if crash and len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(Segmenter, "predict_batch", counting)
    out = tmp_path / "labels.json"
    args = ["--model", str(tiny_checkpoint), "--annotations", str(boxes), "--images",
            str(tmp_path / "data" / "images"), "--output", str(out), "--batch-size", "1",
            "--device", "cpu", "--no-progress"]
    crash = True
    assert main(args) == 130
    assert not out.exists() and "rerun the same command" in capsys.readouterr().err
    crash, calls[:] = False, []
    assert main(args) == 3
    stdout, err = capsys.readouterr()
    assert calls == [1, 1]  # images 101 and 102; image 100 was finished before the crash
    skipped = [ln for ln in err.splitlines() if ln.startswith("skipped:")]
    assert len(skipped) == 1 and "broken.png" in skipped[0] and "not a readable image" in \
        skipped[0]
    result = {a["id"]: a for a in json.loads(out.read_text())["annotations"]}
    assert "segmentation" not in result[60]  # on the unreadable image: left as it was
    assert all("segmentation" in result[i] for i in range(1, 10))
    assert "1 images failed" in stdout


def test_unknown_category_is_noted_and_a_string_bbox_rejected(tmp_path, tiny_checkpoint,
                                                              dataset, capsys):
    path, data = dataset
    data = _box_only(data)
    data["annotations"] += [
        {"id": 70, "image_id": 100, "category_id": 7, "bbox": [10, 10, 20, 20]},
        {"id": 71, "image_id": 100, "category_id": 1, "bbox": "1234"},
    ]
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps(data))
    out = tmp_path / "labels.json"
    code = main(["--model", str(tiny_checkpoint), "--annotations", str(boxes), "--images",
                 str(tmp_path / "data" / "images"), "--output", str(out), "--device", "cpu",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 3
    assert "note: 1 annotations have a category_id that is not in 'categories' (7)" in err
    assert "rejected: annotation 71: bbox '1234' is not [x, y, width, height]" in err
    result = {a["id"]: a for a in json.loads(out.read_text())["annotations"]}
    assert "segmentation" in result[70] and "segmentation" not in result[71]


def test_is_empty_counts_masks_under_five_percent_of_their_box():
    assert is_empty(0, [0, 0, 3, 3]) and not is_empty(1, [0, 0, 3, 3])  # at least one pixel
    assert is_empty(19, [0, 0, 20, 20]) and not is_empty(20, [0, 0, 20, 20])  # 5 % of 400


def test_tiny_boxes_get_empty_masks_reported_flagged_or_skipped(tmp_path, tiny_checkpoint,
                                                                 dataset, capsys, monkeypatch):
    """Boxes of 2-6 px whose masks come out empty: counted apart, flagged, or left out."""
    path, data = dataset
    data = _box_only(data)
    data["annotations"] = [a for a in data["annotations"] if a["id"] <= 9]
    for ann_id, *bbox in [(80, 2, 2, 2, 2), (81, 40, 70, 4, 3), (82, 90, 20, 6, 6)]:
        data["annotations"].append({"id": ann_id, "image_id": 101, "category_id": 1,
                                    "bbox": bbox, "iscrowd": 0})
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps(data))
    original = Segmenter.predict_batch

    def small_boxes_empty(self, images, boxes=None, labels=None, **kw):
        preds = original(self, images, boxes=boxes, labels=labels, **kw)
        for pred in preds:  # the model finds nothing in a box under 8 px
            small = (pred.boxes[:, 2] - pred.boxes[:, 0]) < 8
            pred.masks[small] = False
        return preds

    monkeypatch.setattr(Segmenter, "predict_batch", small_boxes_empty)
    args = ["--model", str(tiny_checkpoint), "--annotations", str(boxes), "--images",
            str(tmp_path / "data" / "images"), "--device", "cpu", "--no-progress"]
    assert main([*args, "--output", str(tmp_path / "a.json")]) == 0
    stdout = capsys.readouterr().out
    assert "label: 12 annotations labelled (3 of them empty or near-empty, flagged " \
           "sim_empty)" in stdout
    result = {a["id"]: a for a in json.loads((tmp_path / "a.json").read_text())["annotations"]}
    assert [i for i, a in result.items() if a.get("sim_empty")] == [80, 81, 82]
    assert all(result[i]["area"] == 0 for i in (80, 81, 82))
    report = json.loads((tmp_path / "a.report.json").read_text())
    assert report["empty_annotations"] == [80, 81, 82]
    assert report["classes"]["disc"]["empty"] == 3 and report["classes"]["disc"]["boxes"] == 6
    assert report["images"]["shapes_1.png"] == {"boxes": 6, "mean_score": pytest.approx(
        np.mean([result[i]["score"] for i in (4, 5, 6, 80, 81, 82)]), abs=1e-3), "empty": 3}
    assert "lowest mean score (inspect these labels first)" in stdout

    assert main([*args, "--output", str(tmp_path / "b.json"), "--skip-empty"]) == 0
    assert "label: 9 annotations labelled (3 empty or near-empty left out)" in \
        capsys.readouterr().out
    result = {a["id"]: a for a in json.loads((tmp_path / "b.json").read_text())["annotations"]}
    assert all("segmentation" not in result[i] for i in (80, 81, 82))


def test_a_fallback_mask_scoring_zero_is_flagged_empty(tmp_path, tiny_checkpoint, dataset,
                                                       monkeypatch):
    """The per-box scale's fallback (a mask the model left empty, regrown from its most likely
    pixels) scores exactly 0: ``label`` flags it ``sim_empty`` although it has pixels."""
    path, data = dataset
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps(_box_only(data)))
    original = Segmenter.predict_batch

    def first_box_fell_back(self, images, boxes=None, labels=None, **kw):
        preds = original(self, images, boxes=boxes, labels=labels, **kw)
        for pred in preds:
            pred.scores[0] = 0.0
            pred.masks[0] = False
            x1, y1, x2, y2 = pred.boxes[0].astype(int)
            pred.masks[0, y1:y2, x1:x2] = True  # a full mask, yet a fallback
        return preds

    monkeypatch.setattr(Segmenter, "predict_batch", first_box_fell_back)
    assert main(["--model", str(tiny_checkpoint), "--annotations", str(boxes), "--images",
                 str(tmp_path / "data" / "images"), "--device", "cpu", "--no-progress",
                 "--output", str(tmp_path / "a.json")]) == 3  # 2 bad boxes rejected
    result = json.loads((tmp_path / "a.json").read_text())["annotations"]
    flagged = [a for a in result if a.get("sim_empty")]
    assert flagged and all(a["score"] == 0 and a["area"] > 0 for a in flagged)
    assert all(a["score"] > 0 for a in result if "score" in a and not a.get("sim_empty"))
