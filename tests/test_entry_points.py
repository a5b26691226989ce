"""Every entry point gives the same instances for the same image, boxes and threshold: the
Python API, ``sim predict`` (results and pictures), ``sim label``, the HTTP server and the app's
handler, on a tiny random-weight model with a calibrated threshold. Box prompts carry more
boxes than one forward pass takes (``max_prompt_boxes`` 2), so every entry point also runs
them in passes."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from serving import Prediction, Segmenter

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

#: (x, y, w, h) COCO boxes of the one test image, with their categories (2 is not a model
#: class: the model predicts it, as label -1 / None does at the other entry points).
BOXES = [([8, 10, 41, 41], 1), ([60, 12, 41, 33], 2), ([20, 56, 61, 35], 3),
         ([4, 4, 30, 20], 1), ([70, 50, 50, 40], 3)]
NAMES = {1: "disc", 2: None, 3: "triangle"}


def tiny_model(path: Path) -> Path:
    """A random-weight checkpoint (as ``sim_testing.make_tiny_checkpoint``) whose forward pass
    takes at most two prompt boxes."""
    from sim_testing import TINY_CLASSES, tiny_model_config

    from serving import InferenceConfig, build_condinst
    from serving.model.model_file import new_card, save_checkpoint

    torch.manual_seed(0)
    cfg = tiny_model_config()
    model = build_condinst(cfg).eval()
    with torch.no_grad():
        model.head.cls_logits.bias.fill_(1.0)
    save_checkpoint(path, model, new_card(cfg, TINY_CLASSES, InferenceConfig(
        min_size=128, max_size=256, max_detections=20, max_prompt_boxes=2)))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The image (96 x 128 PNG), a COCO file of its boxes, and the model, its calibrated
    threshold set to the median automatic score (so 'calibrated' differs from 'all')."""
    from serving.model.card import Calibration
    from serving.model.model_file import recalibrate_checkpoint

    root = tmp_path_factory.mktemp("entry")
    (root / "images").mkdir()
    rng = np.random.default_rng(5)
    image = np.full((96, 128, 3), 40, np.uint8)
    image[10:51, 8:49] = rng.integers(80, 255, 3)
    image[56:91, 20:81] = rng.integers(80, 255, 3)
    Image.fromarray(image).save(root / "images" / "a.png")
    coco = {"images": [{"id": 7, "file_name": "a.png", "height": 96, "width": 128}],
            "categories": [{"id": 1, "name": "disc"}, {"id": 2, "name": "square"},
                           {"id": 3, "name": "triangle"}],
            "annotations": [{"id": i + 1, "image_id": 7, "category_id": c, "bbox": b,
                             "iscrowd": 0} for i, (b, c) in enumerate(BOXES)]}
    (root / "boxes.json").write_text(json.dumps(coco))
    model = tiny_model(root / "model.safetensors")
    scores = Segmenter.load(model, device="cpu").predict(image).scores
    recalibrate_checkpoint(model, Calibration(score_threshold=float(np.median(scores))))
    return root, image, model


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def coco_of(pred: Prediction) -> list[tuple]:
    """(box rounded, score rounded, RLE counts) per instance, as ``to_coco`` writes them."""
    return [(tuple(round(v, 2) for v in r["bbox"]), r["score"], r["segmentation"]["counts"])
            for r in pred.to_coco(0)]


def same(got: list[dict], want: Prediction) -> None:
    """COCO-style results ``got`` (``bbox``, ``score``, RLE ``segmentation``) equal ``want``."""
    assert [(tuple(round(v, 2) for v in r["bbox"]), round(r["score"], 5),
             r["segmentation"]["counts"]) for r in got] == coco_of(want)


def test_every_entry_point_gives_the_same_instances(setup, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from app.handlers import Handlers
    from serving.cli import label, predict
    from serving.server.app import create_app
    from serving.server.limits import ServerSettings

    root, image, model = setup
    seg = Segmenter.load(model, device="cpu")
    assert seg.cfg.max_prompt_boxes == 2  # five boxes: three passes
    xyxy = [[x, y, x + w, y + h] for (x, y, w, h), _ in BOXES]
    names = [NAMES[c] for _, c in BOXES]
    prompted = seg.predict(image, boxes=xyxy, labels=names)  # the Python API
    shown = seg.predict(image, score_threshold="calibrated")
    everything = seg.predict(image, score_threshold="all")
    assert len(prompted) == 5 and 0 < len(shown) < len(everything)

    # the HTTP server: prompted, and automatic with its default threshold
    with TestClient(create_app(seg, ServerSettings(max_wait_ms=0))) as client:
        data = base64.b64encode((root / "images" / "a.png").read_bytes()).decode()
        for body, want in (({"boxes": xyxy, "labels": names}, prompted), ({}, shown)):
            answer = client.post("/v1/segment", json={"image": data, **body}).json()
            same([{"bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": i["score"],
                   "segmentation": i["segmentation"]} for i in answer["instances"]
                  for b in [i["box"]]], want)

    # the app's handler: drawn boxes, and automatic mode with its default threshold
    handlers = Handlers(seg, output_dir=tmp_path / "app")
    drawn = [{"box": b, "label": n or "auto"} for b, n in zip(xyxy, names)]
    same(handlers.segment(root / "images" / "a.png", drawn).coco["annotations"], prompted)
    same(handlers.segment(root / "images" / "a.png", None, mode="automatic").coco["annotations"],
         shown)

    # sim predict: prompted results; automatic results at 'calibrated'; pictures by default
    drawn_preds: list[Prediction] = []
    import serving.formats.visualize as visualize

    real_draw = visualize.draw_predictions
    monkeypatch.setattr(visualize, "draw_predictions",
                        lambda img, pred, **kw: drawn_preds.append(pred) or real_draw(img, pred,
                                                                                      **kw))
    base = ["--model", str(model), "--input", str(root / "images"), "--device", "cpu",
            "--no-progress"]
    assert predict.main([*base, "--output", str(tmp_path / "p"), "--boxes",
                         str(root / "boxes.json")]) == 0
    same(json.loads((tmp_path / "p" / "results.json").read_text()), prompted)
    assert predict.main([*base, "--output", str(tmp_path / "a"), "--score-threshold",
                         "calibrated"]) == 0
    same(json.loads((tmp_path / "a" / "results.json").read_text()), shown)
    assert predict.main([*base, "--output", str(tmp_path / "v"), "--save-vis"]) == 0
    same(json.loads((tmp_path / "v" / "results.json").read_text()), everything)
    assert coco_of(drawn_preds[-1]) == coco_of(shown)  # the picture shows the calibrated cut

    # sim label: the boxes' masks and scores written into the COCO file
    out = tmp_path / "labelled.json"
    assert label.main(["--model", str(model), "--annotations", str(root / "boxes.json"),
                       "--images", str(root / "images"), "--output", str(out), "--device",
                       "cpu", "--no-progress"]) == 0
    same(json.loads(out.read_text())["annotations"], prompted)


def test_the_shown_default_is_the_same_everywhere():
    """One name for the default of what people see, used by the app, the server and the
    pictures of ``sim predict``."""
    import argparse

    from serving.cli.predict import build_parser
    from serving.prompts import CALIBRATED, SHOWN_THRESHOLD
    from serving.server.requests import SHOWN_THRESHOLD as server_default

    assert SHOWN_THRESHOLD == CALIBRATED and server_default is SHOWN_THRESHOLD
    args = build_parser().parse_args(["--model", "m", "--input", "i", "--output", "o"])
    assert isinstance(args, argparse.Namespace) and args.vis_threshold == SHOWN_THRESHOLD
    assert args.score_threshold == "all"  # COCO results keep every instance
