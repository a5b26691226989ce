"""The CVAT nuclio function in process: CVAT's interactor payloads (base64 frame, the box as
two corner points, the threshold) in, the Segmenter's own mask out, 400 for bad input."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from PIL import Image

from serving import Segmenter

FUNCTION = Path(__file__).resolve().parents[2] / "serverless" / "sim" / "nuclio"


class _Logger:
    def info(self, message: str) -> None:
        pass


class _Response:
    def __init__(self, body, headers, content_type, status_code):
        self.body, self.content_type, self.status_code = body, content_type, status_code


@pytest.fixture(scope="module")
def function(tiny_checkpoint):
    spec = importlib.util.spec_from_file_location("sim_nuclio_main", FUNCTION / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    context = SimpleNamespace(logger=_Logger(), user_data=SimpleNamespace(),
                              Response=_Response)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SIM_MODEL", str(tiny_checkpoint))
        mp.setenv("SIM_DEVICE", "cpu")
        module.init_context(context)
    return module, context


def _png(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _call(function, body):
    module, context = function
    response = module.handler(context, SimpleNamespace(body=body))
    return response.status_code, json.loads(response.body)


def test_interactor_payload_gives_the_segmenters_mask(function, sample_image, tiny_checkpoint):
    seg = Segmenter.load(tiny_checkpoint, device="cpu")
    want = seg.predict(sample_image, boxes=[[30, 20, 80, 60]]).mask(0)
    body = {"image": _png(sample_image), "obj_bbox": [[80, 60], [30, 20]], "pos_points": [],
            "neg_points": []}
    status, answer = _call(function, body)
    assert status == 200
    assert np.array_equal(np.array(answer["mask"], bool), want)
    status, as_bytes = _call(function, json.dumps(body).encode())  # raw JSON body
    assert status == 200 and as_bytes == answer
    low = np.array(_call(function, dict(body, threshold=0.2))[1]["mask"], bool)
    high = np.array(_call(function, dict(body, threshold=0.8))[1]["mask"], bool)
    assert (high <= low).all() and high.sum() <= want.sum() <= low.sum()


def test_bad_payloads_answer_400(function, sample_image):
    image = _png(sample_image)
    cases = [({"obj_bbox": [[1, 1], [9, 9]]}, "image: missing"),
             ({"image": "%%%", "obj_bbox": [[1, 1], [9, 9]]}, "not valid base64"),
             ({"image": image, "obj_bbox": [[1, 1]]}, "obj_bbox"),
             ({"image": image, "obj_bbox": [[1, 1], [9, 9]], "threshold": 2}, "threshold 2"),
             ({"image": image, "obj_bbox": [[500, 500], [600, 600]]}, "box 0"),
             ([1, 2], "body")]
    for body, message in cases:
        status, answer = _call(function, body)
        assert status == 400 and message in answer["error"], answer


def test_function_yaml_declares_a_box_interactor():
    spec = yaml.safe_load((FUNCTION / "function.yaml").read_text())
    annotations = spec["metadata"]["annotations"]
    assert annotations["type"] == "interactor" and annotations["startswith_box"] is True
    assert spec["spec"]["handler"] == "main:handler"
