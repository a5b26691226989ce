"""``sim label`` across formats: the same boxes given as COCO, a YOLO folder and a Label
Studio export get the same masks (IoU >= 0.99 after each format's rounding) written back as
YOLO segmentation lines and Label Studio brush / polygon predictions; bad YOLO lines are
skipped by name and counted while the rest is labelled."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_data import cache_model_loads, decode, one_torch_thread, shapes_dataset

from serving.cli.label import main
from serving.cli.predict import main as predict_main

NAMES = ("disc", "square", "triangle")
CONFIG = ('<View><Image name="img" value="$image"/><RectangleLabels name="box" toName="img">'
          '<Label value="disc"/></RectangleLabels><BrushLabels name="tag" toName="img">'
          '<Label value="disc"/></BrushLabels></View>')


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_torch_thread()


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


@pytest.fixture()
def sources(tmp_path):
    """The shapes dataset's boxes as COCO, a YOLO folder and a Label Studio export."""
    coco = json.loads(shapes_dataset(tmp_path / "data", num_images=2).read_text())
    images = tmp_path / "data" / "images"
    for ann in coco["annotations"]:
        ann.pop("segmentation"), ann.pop("area")
    (tmp_path / "boxes.json").write_text(json.dumps(coco))
    sizes = {img["id"]: (img["width"], img["height"], img["file_name"])
             for img in coco["images"]}
    yolo = tmp_path / "yolo"
    (yolo / "labels").mkdir(parents=True)
    (yolo / "classes.txt").write_text("\n".join(NAMES) + "\n")
    tasks = {img["id"]: {"id": img["id"], "data": {"image": f"/data/upload/1/0123abcd-"
                                                   f"{img['file_name']}"},
                         "annotations": [{"result": []}]} for img in coco["images"]}
    for ann in coco["annotations"]:
        w, h, name = sizes[ann["image_id"]]
        x, y, bw, bh = ann["bbox"]
        with (yolo / "labels" / name.replace(".png", ".txt")).open("a") as fh:
            fh.write(f"{ann['category_id'] - 1} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} "
                     f"{bw / w:.6f} {bh / h:.6f}\n")
        tasks[ann["image_id"]]["annotations"][0]["result"].append({
            "id": f"r{ann['id']}", "type": "rectanglelabels", "from_name": "box",
            "to_name": "img", "original_width": w, "original_height": h,
            "value": {"x": x / w * 100, "y": y / h * 100, "width": bw / w * 100,
                      "height": bh / h * 100, "rotation": 0,
                      "rectanglelabels": [NAMES[ann["category_id"] - 1]]}})
    (tmp_path / "export.json").write_text(json.dumps(list(tasks.values())))
    (tmp_path / "config.xml").write_text(CONFIG)
    return tmp_path, images, coco


def _label(model, annotations, images, output, *extra):
    return main(["--model", str(model), "--annotations", str(annotations), "--images",
                 str(images), "--output", str(output), "--device", "cpu", "--no-progress",
                 "--workers", "0", *extra])


def test_coco_yolo_and_labelstudio_paths_agree(tiny_checkpoint, sources, monkeypatch, capsys):
    cache_model_loads(monkeypatch)
    root, images, coco = sources
    assert _label(tiny_checkpoint, root / "boxes.json", images, root / "rle.json") == 0
    assert _label(tiny_checkpoint, root / "boxes.json", images, root / "poly.json",
                  "--format", "polygon") == 0
    assert _label(tiny_checkpoint, root / "yolo", images, root / "yolo_seg") == 0
    assert _label(tiny_checkpoint, root / "export.json", images, root / "ls.json",
                  "--label-config", str(root / "config.xml")) == 0
    assert _label(tiny_checkpoint, root / "export.json", images, root / "ls_poly.json",
                  "--format", "labelstudio-polygon") == 0
    from serving.formats.labelstudio import ls_rle_to_mask
    from serving.formats.polygons import largest_polygon

    rle = json.loads((root / "rle.json").read_text())["annotations"]
    poly = json.loads((root / "poly.json").read_text())["annotations"]
    ls = json.loads((root / "ls.json").read_text())
    ls_poly = json.loads((root / "ls_poly.json").read_text())
    sizes = {img["id"]: (img["height"], img["width"], img["file_name"])
             for img in coco["images"]}
    ls_results = [r for task in ls for r in task["predictions"][0]["result"]]
    ls_polys = [r for task in ls_poly for r in task["predictions"][0]["result"]]
    lines = {name: (root / "yolo_seg" / "labels" / name.replace(".png", ".txt")).read_text()
             .splitlines() for _, _, name in sizes.values()}
    assert len(ls_results) == len(rle) == 6 and all(len(v) == 3 for v in lines.values())
    for i, (a, b) in enumerate(zip(rle, poly)):
        h, w, name = sizes[a["image_id"]]
        mask = decode(a["segmentation"], h, w)
        part = decode([largest_polygon(b["segmentation"])], h, w)
        # Label Studio brush: lossless, the same mask as COCO RLE
        result = ls_results[i]
        assert (result["from_name"], result["to_name"]) == ("tag", "img")
        assert result["value"]["brushlabels"] == [NAMES[a["category_id"] - 1]]
        assert _iou(ls_rle_to_mask(result["value"]["rle"], h, w), mask) >= 0.99
        assert result["score"] == pytest.approx(a["score"], abs=1e-4)
        # YOLO-seg: the largest polygon, normalised; same class index as the input line
        cls, *coords = lines[name][i % 3].split()
        assert int(cls) == a["category_id"] - 1
        xy = [float(v) * (w if k % 2 == 0 else h) for k, v in enumerate(coords)]
        assert _iou(decode([xy], h, w), part) >= 0.99
        # Label Studio polygons: percent of the image
        pts = ls_polys[i]["value"]["points"]
        back = [v for x, y in pts for v in (x / 100 * w, y / 100 * h)]
        assert _iou(decode([back], h, w), part) >= 0.99
    data_yaml = (root / "yolo_seg" / "data.yaml").read_text()
    assert "triangle" in data_yaml and (root / "yolo_seg" / "images").resolve() == images
    assert ls[0]["data"]["image"].startswith("/data/upload/1/")
    assert ls[0]["annotations"][0]["result"][0]["type"] == "rectanglelabels"
    assert ls[0]["predictions"][0]["model_version"] == tiny_checkpoint.name
    assert "id" not in ls[0]


def test_bad_yolo_lines_are_skipped_and_counted(tiny_checkpoint, sources, monkeypatch,
                                                capsys):
    cache_model_loads(monkeypatch)
    root, images, _ = sources
    txt = root / "yolo" / "labels" / "shapes_0.txt"
    good = txt.read_text()
    txt.write_text(good + "0 0.5 0.5 0.2\n7 0.5 0.5 0.1 0.1\n0 0.5 1.5 0.1 0.1\n")
    code = _label(tiny_checkpoint, root / "yolo", images, root / "out")
    out, err = capsys.readouterr()
    assert code == 3
    assert f"skipped: {txt} line 4: 4 fields" in err
    assert f"skipped: {txt} line 5: class index 7" in err
    assert f"skipped: {txt} line 6: coordinates" in err
    assert "label: 6 annotations labelled" in out and "3 rejected" in out
    assert len((root / "out" / "labels" / "shapes_0.txt").read_text().splitlines()) == 3


def test_bad_labelstudio_tasks_are_skipped_and_counted(tiny_checkpoint, sources, monkeypatch,
                                                       capsys):
    cache_model_loads(monkeypatch)
    root, images, _ = sources
    tasks = json.loads((root / "export.json").read_text())
    tasks[0]["annotations"][0]["result"][0]["value"]["width"] = 0
    tasks.append({"id": 99, "data": {"caption": "no image"}})
    (root / "export.json").write_text(json.dumps(tasks))
    code = _label(tiny_checkpoint, root / "export.json", images, root / "out.json",
                  "--format", "labelstudio-polygon")
    out, err = capsys.readouterr()
    assert code == 3
    assert f"task {tasks[0]['id']} result r1: zero width" in err and "task 99: no image" in err
    assert "label: 5 annotations labelled" in out and "2 rejected" in out
    written = json.loads((root / "out.json").read_text())
    assert [len(t["predictions"][0]["result"]) for t in written] == [2, 3]


def test_predict_takes_yolo_boxes_and_writes_yolo_labels(tiny_checkpoint, sources,
                                                        monkeypatch, capsys):
    """``predict --boxes YOLO --format yolo`` writes the same YOLO-seg lines as ``label``."""
    cache_model_loads(monkeypatch)
    root, images, coco = sources
    code = predict_main(["--model", str(tiny_checkpoint), "--input", str(images), "--output",
                         str(root / "pred"), "--boxes", str(root / "yolo"), "--device", "cpu",
                         "--no-progress", "--workers", "0", "--format", "yolo"])
    assert code == 0, capsys.readouterr().err
    assert _label(tiny_checkpoint, root / "yolo", images, root / "seg") == 0
    results = json.loads((root / "pred" / "results.json").read_text())
    assert len(results) == len(coco["annotations"])
    for name in ("shapes_0.txt", "shapes_1.txt"):
        assert (root / "pred" / "yolo" / "labels" / name).read_text() == \
            (root / "seg" / "labels" / name).read_text()
    code = predict_main(["--model", str(tiny_checkpoint), "--input", str(images), "--output",
                         str(root / "pred2"), "--device", "cpu", "--no-progress",
                         "--format", "labelstudio"])
    assert code == 1 and "add --boxes" in capsys.readouterr().err


def test_format_errors_before_work(tiny_checkpoint, sources, monkeypatch, capsys):
    from serving import Segmenter

    monkeypatch.setattr(Segmenter, "load", lambda *a, **k: pytest.fail("model loaded"))
    root, images, _ = sources
    (root / "bad.xml").write_text("<View>")
    (root / "notes.xml").write_text("<annotation/>")
    cases = [
        ([root / "export.json", "--label-config", root / "missing.xml"], "cannot be read"),
        ([root / "export.json", "--label-config", root / "bad.xml"], "not valid XML"),
        ([root / "notes.xml"], "neither a COCO JSON"),
        ([root / "yolo", "--output", root / "export.json"], "not a folder"),
        ([root / "yolo", "--input-format", "labelstudio"], "annotations"),
    ]
    for (source, *extra), message in cases:
        code = _label(tiny_checkpoint, source, images, root / "o.json", *map(str, extra))
        assert code == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (root / "o.json").exists()
