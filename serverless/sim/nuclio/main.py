"""CVAT serverless function (nuclio): one SIM mask for the box the annotator draws.

CVAT runs it as an *interactor* that starts with a box (``function.yaml``). Each call's body
is CVAT's interactor payload::

    {"image": "<base64 image>", "obj_bbox": [[x1, y1], [x2, y2]],
     "pos_points": [[x, y], ...], "neg_points": [[x, y], ...], "threshold": 0.5}

``obj_bbox`` is the box in image pixels (without it, the extent of ``pos_points``); the
points are not used (the model takes a box). ``threshold``, when given, is the mask
probability threshold (default: the model's own). The answer is ``{"mask": [[0, 1, ...],
...]}``, the full-image mask CVAT turns into a mask shape. Bad input answers 400 with a
one-line message. The model file is ``$SIM_MODEL`` (default ``/opt/nuclio/model.safetensors``,
an ``.onnx`` works too).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import os
from typing import Any

MODEL_ENV = "SIM_MODEL"
DEFAULT_MODEL = "/opt/nuclio/model.safetensors"


def init_context(context: Any) -> None:
    """Load the model once per worker."""
    from serving import Segmenter

    path = os.environ.get(MODEL_ENV, DEFAULT_MODEL)
    context.logger.info(f"loading {path}")
    context.user_data.model = Segmenter.load(path, device=os.environ.get("SIM_DEVICE", "auto"))


def _box(body: dict[str, Any]) -> list[float]:
    """XYXY pixels from ``obj_bbox`` ([[x1, y1], [x2, y2]] or [x1, y1, x2, y2]) or from the
    extent of ``pos_points``; ValueError (one line) otherwise."""
    raw = body.get("obj_bbox") or body.get("pos_points")
    try:
        points = [[float(v) for v in p] for p in raw] if raw and isinstance(raw[0], list) \
            else [[float(raw[0]), float(raw[1])], [float(raw[2]), float(raw[3])]]
    except (TypeError, ValueError, IndexError):
        raise ValueError("obj_bbox: give the box as [[x1, y1], [x2, y2]] in image pixels") \
            from None
    if len(points) < 2 or any(len(p) != 2 for p in points):
        raise ValueError("obj_bbox: give the box as [[x1, y1], [x2, y2]] in image pixels")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return [min(xs), min(ys), max(xs), max(ys)]


def segment(model: Any, body: dict[str, Any]) -> dict[str, Any]:
    """The answer to one CVAT payload (see the module docstring); ValueError or
    ``serving.SimError`` (one line) for bad input."""
    try:
        data = base64.b64decode(str(body.get("image") or ""), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image: not valid base64; CVAT sends the frame base64-encoded") \
            from None
    if not data:
        raise ValueError("image: missing; CVAT sends the frame as base64 in 'image'")
    box = _box(body)
    threshold = body.get("threshold")
    if threshold is not None:
        t = float(threshold)
        if not 0.0 < t < 1.0:
            raise ValueError(f"threshold {threshold}: give a mask probability in (0, 1)")
        model = type(model)(model.backend, model.class_names,
                            dataclasses.replace(model.cfg, mask_threshold=t), model.info,
                            model.box_scale, card=model.card)
    pred = model.predict(data, boxes=[box])
    return {"mask": pred.mask(0).astype("uint8").tolist()}


def handler(context: Any, event: Any) -> Any:
    """nuclio entry point: CVAT's payload in ``event.body``, the mask (or a 400) out."""
    from serving.errors import SimError

    body = event.body
    try:
        if isinstance(body, (bytes, str)):
            body = json.loads(body)
        if not isinstance(body, dict):
            raise ValueError("body: send CVAT's interactor JSON object")
        answer, status = segment(context.user_data.model, body), 200
    except (ValueError, SimError) as exc:
        answer, status = {"error": str(exc).splitlines()[0]}, 400
    return context.Response(body=json.dumps(answer), headers={},
                            content_type="application/json", status_code=status)
