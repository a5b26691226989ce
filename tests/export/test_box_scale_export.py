"""The per-box scale of box prompts over ONNX Runtime: the same masks and scores as PyTorch,
and an export made before the option existed loads with it on and runs (the option is a
setting of the ``Segmenter``, so export files are unchanged; the test rewrites the sidecar
exactly as the last release wrote it). Uses the session's export (slow)."""

from __future__ import annotations

import json
import shutil

import numpy as np
from export_images import random_image

from export.verify import mask_iou
from serving import Segmenter
from serving.inference import refine

CALIBRATION = {"object_sizes": {"p10": 40.0, "p50": 60.0, "p90": 90.0}}


def _calibrated(seg: Segmenter) -> Segmenter:
    seg.info["calibration"] = CALIBRATION  # the trained size the per-box scale aims at
    return seg


def test_torch_and_onnx_agree_on_the_per_box_path(export_checkpoint, tiny_export,
                                                   monkeypatch):
    ref = _calibrated(Segmenter.from_checkpoint(export_checkpoint, device="cpu"))
    ort = _calibrated(Segmenter.from_onnx(tiny_export.sidecar, device="cpu"))
    assert ref.box_scale and ort.box_scale and ref.refine and ort.refine
    image = random_image(300, 420, 7)
    boxes = np.array([[10, 20, 200, 180], [300, 50, 310, 58], [0, 0, 420, 300],
                      [150, 150, 230, 260]], np.float32)
    filtered = []  # the full-resolution refinement runs after either backend alike
    real = refine.guided_coefficients
    monkeypatch.setattr(refine, "guided_coefficients",
                        lambda *a: filtered.append(1) or real(*a))
    got, want = ort.predict(image, boxes=boxes), ref.predict(image, boxes=boxes)
    assert len(filtered) == 2 * 3  # the boxes of 24 px or more, in each backend
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-4, rtol=0)
    assert min(mask_iou(a, b) for a, b in zip(want.masks, got.masks)) >= 0.99
    # and the per-box path differs from the whole-image one (it is what ran)
    whole = ort.with_box_scale(False).predict(image, boxes=boxes)
    assert not np.allclose(whole.scores, got.scores)


def test_an_export_from_before_the_per_box_scale_loads_and_runs(tiny_export, tmp_path):
    for path in tiny_export.graphs.values():
        shutil.copy(path, tmp_path / path.name)
    sidecar = json.loads(tiny_export.sidecar.read_text())
    assert "box_scale" not in json.dumps(sidecar)  # nothing new in the export's files
    (tmp_path / tiny_export.sidecar.name).write_text(json.dumps(sidecar))
    model = tmp_path / tiny_export.graphs["prompt"].name
    seg = Segmenter.load(model, device="cpu")
    assert seg.box_scale
    pred = seg.predict(random_image(120, 160, 3), boxes=[[10, 10, 60, 50], [70, 40, 150, 110]])
    assert len(pred) == 2 and pred.masks.shape == (2, 120, 160)
    assert np.all((pred.scores >= 0) & (pred.scores <= 1))
    off = Segmenter.load(model, device="cpu", box_scale=False)
    assert not off.box_scale
