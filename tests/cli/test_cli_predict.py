"""``python -m serving predict``: mixed good/bad images, COCO output, resume, prompts, errors."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from cli_data import (
    BAD_IMAGES,
    GOOD_IMAGES,
    cache_model_loads,
    decode,
    mixed_folder,
    one_torch_thread,
    plain_folder,
)
from PIL import Image

from serving import Segmenter
from serving.cli import predict as cli_predict
from serving.cli.predict import main
from serving.formats.cocoeval import evaluate_coco


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_torch_thread()


def _run(capsys, *args):
    code = main([*map(str, args), "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def _load(path):
    return json.loads(path.read_text())


def test_mixed_folder_good_images_valid_coco_bad_ones_reported(tmp_path, tiny_checkpoint,
                                                                capsys):
    from pycocotools.coco import COCO

    src = mixed_folder(tmp_path / "in")
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, "--model", tiny_checkpoint, "--input", src, "--output",
                             out, "--save-vis", "--save-masks", "png", "--batch-size", "2",
                             "--device", "cpu", "--workers", "2")
    assert code == 3
    lines = [ln for ln in err.splitlines() if ln.startswith("skipped:")]
    assert len(lines) == len(BAD_IMAGES)
    for bad in BAD_IMAGES:
        assert sum(bad in ln for ln in lines) == 1
    assert "truncated" in next(ln for ln in lines if "truncated.jpg" in ln)
    assert "0 bytes" in next(ln for ln in lines if "zero.jpg" in ln)
    assert "not a readable image" in next(ln for ln in lines if "text.png" in ln)
    assert "6 images segmented now" in stdout and "3 failed" in stdout

    images = _load(out / "images.json")
    by_name = {img["file_name"]: img for img in images["images"]}
    assert set(by_name) == set(GOOD_IMAGES)
    for name, (h, w) in GOOD_IMAGES.items():  # EXIF rotation applied: 96x64 not 64x96
        assert (by_name[name]["height"], by_name[name]["width"]) == (h, w)
    assert [c["name"] for c in images["categories"]] == ["disc", "ring", "triangle"]

    # a ground truth for the good images, built independently: one box per image
    gt = {"images": [{"id": by_name[n]["id"], "file_name": n, "height": h, "width": w}
                     for n, (h, w) in GOOD_IMAGES.items()],
          "annotations": [{"id": i + 1, "image_id": by_name[n]["id"], "category_id": 1,
                           "bbox": [2, 2, 20, 20], "area": 400, "iscrowd": 0}
                          for i, n in enumerate(GOOD_IMAGES)],
          "categories": [{"id": 1, "name": "disc"}, {"id": 2, "name": "ring"},
                         {"id": 3, "name": "triangle"}]}
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(gt))
    results = _load(out / "results.json")
    assert results, "the tiny checkpoint finds instances on every image"
    coco_dt = COCO(str(gt_path)).loadRes(str(out / "results.json"))
    assert len(coco_dt.getAnnIds()) == len(results)
    assert 0.0 <= evaluate_coco(gt_path, results, iou_types=("bbox",))["bbox/AP"] <= 1.0

    sizes = {img["id"]: (img["height"], img["width"]) for img in images["images"]}
    per_image: dict[int, list] = {}
    for r in results:
        assert r["segmentation"]["size"] == list(sizes[r["image_id"]])
        assert isinstance(r["segmentation"]["counts"], str)
        per_image.setdefault(r["image_id"], []).append(r)
    for name, img in by_name.items():
        stem = name.rsplit(".", 1)[0]
        vis = Image.open(out / "vis" / f"{stem}.jpg")
        assert vis.size == (img["width"], img["height"])
        mine = per_image.get(img["id"], [])
        masks = sorted((out / "masks").glob(f"{stem}_*.png"))
        assert len(masks) == len(mine)
        if mine:
            png = np.asarray(Image.open(out / "masks" / f"{stem}_0.png")) > 0
            np.testing.assert_array_equal(png, decode(mine[0]["segmentation"], *sizes[img["id"]]))
    for bad in BAD_IMAGES:
        assert not (out / "vis" / bad.replace(".png", ".jpg")).exists()


def test_interrupted_run_resumes_without_recomputing(tmp_path, tiny_checkpoint, capsys,
                                                     monkeypatch):
    src = plain_folder(tmp_path / "in", 5)
    calls: list[int] = []
    seen: list[list] = []
    original = Segmenter.predict_batch

    def counting(self, images, *args, **kwargs):
        calls.append(len(images))
        if crash_on is not None and len(calls) == crash_on:
            # results.json is rewritten periodically (every batch here), not only at the end
            seen.append(_load(tmp_path / "out" / "images.json")["images"])
            raise KeyboardInterrupt
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(Segmenter, "predict_batch", counting)
    monkeypatch.setattr(cli_predict, "WRITE_EVERY_S", 0.0)
    cache_model_loads(monkeypatch)
    args = ["--model", tiny_checkpoint, "--input", src, "--batch-size", "2", "--device", "cpu"]
    crash_on = 3
    code, _, err = _run(capsys, *args, "--output", tmp_path / "out")
    assert code == 130 and "rerun the same command" in err
    assert calls == [2, 2, 1]
    assert [img["id"] for img in seen[0]] == [1, 2, 3, 4]
    partial = _load(tmp_path / "out" / "images.json")["images"]
    assert [img["file_name"] for img in partial] == [f"img_{i:02d}.png" for i in range(4)]
    assert {r["image_id"] for r in _load(tmp_path / "out" / "results.json")} <= {1, 2, 3, 4}

    crash_on, calls[:] = None, []
    code, stdout, _ = _run(capsys, *args, "--output", tmp_path / "out")
    assert code == 0 and calls == [1]  # only image 4 is computed
    assert "1 images segmented now, 4 earlier" in stdout
    code, stdout, _ = _run(capsys, *args, "--output", tmp_path / "out")
    assert code == 0 and calls == [1] and "0 images segmented now, 5 earlier" in stdout

    calls[:] = []
    assert _run(capsys, *args, "--output", tmp_path / "fresh")[0] == 0  # one uninterrupted run
    assert calls == [2, 2, 1]
    resumed = _load(tmp_path / "out" / "results.json")
    fresh = _load(tmp_path / "fresh" / "results.json")
    assert _load(tmp_path / "out" / "images.json") == _load(tmp_path / "fresh" / "images.json")
    assert len(resumed) == len(fresh)  # every image exactly once
    assert [(r["image_id"], r["category_id"]) for r in resumed] == [
        (r["image_id"], r["category_id"]) for r in fresh]
    np.testing.assert_allclose([r["score"] for r in resumed], [r["score"] for r in fresh],
                               atol=1e-4)



def test_overwrite_and_changed_settings(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    src = plain_folder(tmp_path / "in", 1)
    calls: list[int] = []
    original = Segmenter.predict_batch

    def counting(self, images, *args, **kwargs):
        calls.append(len(images))
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(Segmenter, "predict_batch", counting)
    cache_model_loads(monkeypatch)
    args = ["--model", tiny_checkpoint, "--input", src, "--device", "cpu", "--output",
            tmp_path / "out"]
    assert _run(capsys, *args, "--save-masks", "png")[0] == 0
    first = sorted(p.name for p in (tmp_path / "out" / "masks").iterdir())
    assert calls == [1] and len(first) == len(_load(tmp_path / "out" / "results.json"))
    assert _run(capsys, *args)[0] == 0 and calls == [1]  # done, nothing recomputed
    assert _run(capsys, *args, "--save-vis")[0] == 0 and calls == [1, 1]  # vis was missing
    assert (tmp_path / "out" / "vis" / "img_00.jpg").is_file()
    assert _run(capsys, *args, "--overwrite", "--score-threshold", "0.99")[0] == 0
    assert calls == [1, 1, 1]
    assert not (tmp_path / "out" / "masks").exists() or not any(
        (tmp_path / "out" / "masks").iterdir())  # the earlier run's masks were removed
    assert _load(tmp_path / "out" / "results.json") == []  # the random model scores < 0.99
    # a different setting cannot silently mix into the same output
    code, _, err = _run(capsys, *args)
    assert code == 1 and "differs in score_threshold" in err and len(err.splitlines()) == 1


def test_box_prompted_predict(tmp_path, tiny_checkpoint, capsys):
    src = plain_folder(tmp_path / "in", 4)  # 64x80 images; img_02 is not in the JSON
    anns = [
        (1, 0, 1, [5, 5, 30, 25]), (2, 0, 2, [40, 20, 30, 30]),  # good: disc, ring
        (3, 0, 4, [-10, 30, 30, 20]),  # partly outside: clipped; category not a model class
        (4, 0, 1, [50, 10, -20, 10]),  # reversed
        (5, 1, 1, [math.nan, 5, 10, 10]),  # NaN
        (6, 1, 2, [200, 200, 10, 10]),  # outside the image
        (7, 1, 3, [10, 10, 0, 10]),  # zero width
        (8, 1, 3, [20, 12, 30, 30]),  # good: triangle
    ]
    coco = {"images": [{"id": 10, "file_name": "img_00.png", "height": 64, "width": 80},
                       {"id": 11, "file_name": "other/img_01.png"},
                       {"id": 13, "file_name": "img_03.png", "height": 80, "width": 64}],
            "annotations": [{"id": a, "image_id": 10 + i, "category_id": c, "bbox": b}
                            for a, i, c, b in anns]
            + [{"id": 9, "image_id": 10, "category_id": 1, "bbox": [0, 0, 10, 10],
                "iscrowd": 1}],
            "categories": [{"id": 1, "name": "disc"}, {"id": 2, "name": "ring"},
                           {"id": 3, "name": "triangle"}, {"id": 4, "name": "person"}]}
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps(coco))  # json writes NaN, as Python's reader accepts
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, "--model", tiny_checkpoint, "--input", src, "--output",
                             out, "--boxes", boxes, "--device", "cpu", "--save-vis")
    assert code == 3
    assert "1 images have no entry" in err
    skipped = [ln for ln in err.splitlines() if ln.startswith("skipped:")]
    assert len(skipped) == 1 and "img_03.png" in skipped[0] and "JSON's 64x80" in skipped[0]
    rejected = [ln for ln in err.splitlines() if ln.startswith("rejected:")]
    assert len(rejected) == 4
    for ann_id in (4, 5, 6, 7):
        assert sum(f"annotation {ann_id}:" in ln for ln in rejected) == 1
    results = _load(out / "results.json")
    assert [r["prompt_id"] for r in results] == [1, 2, 3, 8]
    assert [r["image_id"] for r in results] == [10, 10, 10, 11]
    # every result keeps its box's category, as label does (4 "person" is not a model class)
    assert [r["category_id"] for r in results] == [1, 2, 4, 3]
    assert results[0]["bbox"] == [5, 5, 30, 25]
    assert results[2]["bbox"] == [0, 30, 20, 20]  # clipped at x = 0
    for r in results:
        m = decode(r["segmentation"], 64, 80)
        x, y, w, h = r["bbox"]
        inside = np.zeros_like(m)
        inside[int(y):math.ceil(y + h), int(x):math.ceil(x + w)] = True
        assert not (m & ~inside).any()  # masks stay inside their prompt box
    assert sorted(p.name for p in (out / "vis").iterdir()) == ["img_00.jpg", "img_01.jpg"]


def test_errors_before_any_work(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    src = plain_folder(tmp_path / "in", 1)

    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(Segmenter, "load", no_load)
    base = ["--model", tiny_checkpoint, "--input", src]
    if os.geteuid() == 0:  # root ignores permission bits: a path below a file cannot be made
        blocker = tmp_path / "a_file"
        blocker.write_text("x")
        unwritable = blocker / "out"
    else:
        unwritable = tmp_path / "locked"
        unwritable.mkdir()
        unwritable.chmod(0o500)
    cases = [
        ([*base, "--output", unwritable], "not writable"),
        (["--model", tmp_path / "missing.safetensors", "--input", src, "--output",
          tmp_path / "o1"], "missing.safetensors: file not found"),
        (["--model", tiny_checkpoint, "--input", tmp_path / "o1", "--output", tmp_path / "o2"],
         "no images found"),
        ([*base, "--output", tmp_path / "o3", "--boxes", tmp_path / "none.json"],
         "none.json: file not found"),
    ]
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"images": [')
    cases.append(([*base, "--output", tmp_path / "o4", "--boxes", bad_json], "not valid JSON"))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"images": [{"id": 1, "file_name": "elsewhere.png"}]}))
    cases.append(([*base, "--output", tmp_path / "o5", "--boxes", other], "no input image"))
    for args, message in cases:
        code, stdout, err = _run(capsys, *args)
        assert code == 1, (args, err)
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    if os.geteuid() != 0:
        unwritable.chmod(0o700)
    assert not list(unwritable.parent.glob("o*/results.json"))
    with pytest.raises(SystemExit) as exc:
        main(["--model", "m"])  # argparse: missing required options
    assert exc.value.code == 2
    from serving.__main__ import main as serving_main  # python -m serving predict ...

    assert serving_main(["predict", "--model", str(tmp_path / "x.onnx"), "--input", str(src),
                         "--output", str(tmp_path / "o6"), "--no-progress"]) == 1
    assert "x.onnx: file not found" in capsys.readouterr().err
