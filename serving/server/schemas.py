"""Request and response models of the HTTP server (pydantic), and its OpenAPI request body.

``POST /v1/segment`` takes either ``multipart/form-data`` (:class:`SegmentForm`) or
``application/json`` (:class:`SegmentJSONRequest`); the server parses the body itself (it
must enforce size limits while reading), so :func:`segment_request_body` writes both into the
OpenAPI schema by hand, from the same models the server validates with.

Imported only by :mod:`serving.server.app` (pydantic comes with FastAPI).
"""

from __future__ import annotations

import base64
import io
from typing import Annotated, Any, Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

Coordinate = StrictFloat  # strict: "12" (a string) is not a coordinate; 12 (an int) is
Box = Annotated[list[Coordinate], Field(min_length=4, max_length=4,
                                        description="[x1, y1, x2, y2] in original-image pixels")]
Label = Optional[Union[StrictInt, StrictStr]]

BOXES_DOC = ("Prompt boxes, XYXY in original-image pixels: one mask per box, in order. Boxes "
             "partly outside the image are clipped. Omit (or null) for automatic mode.")
LABELS_DOC = "One class per box: a class name, a class index, or null to let the model predict it."
THRESHOLD_DOC = ("Automatic mode only: a number in 0..1 (drop instances scoring below it), "
                 "'calibrated' (the model's F1-best threshold, score_threshold in GET "
                 "/v1/model) or 'all' (every instance); default 'calibrated'.")
Fraction = Annotated[StrictFloat, Field(ge=0.0, le=1.0)]
#: Automatic mode's threshold choice (``serving.prompts.ScoreThreshold``).
Threshold = Optional[Union[Fraction, Literal["calibrated", "all"]]]


# --------------------------------------------------------------------------- requests
class SegmentOptions(BaseModel):
    """Everything of a segment request except the image."""

    model_config = ConfigDict(extra="forbid")

    boxes: Optional[list[Box]] = Field(None, description=BOXES_DOC)
    labels: Optional[list[Label]] = Field(None, description=LABELS_DOC)
    score_threshold: Threshold = Field(None, description=THRESHOLD_DOC)


class SegmentJSONRequest(SegmentOptions):
    """``application/json`` body of ``POST /v1/segment``."""

    image: str = Field(description="The image file (JPEG, PNG, BMP, TIFF, WebP) as base64 text; "
                                   "a data URL prefix 'data:image/...;base64,' is accepted.")


class SegmentForm(BaseModel):
    """``multipart/form-data`` body of ``POST /v1/segment`` (documentation only)."""

    model_config = ConfigDict(extra="forbid")

    image: bytes = Field(description="The image file (JPEG, PNG, BMP, TIFF, WebP).")
    boxes: Optional[str] = Field(None, description="JSON text: " + BOXES_DOC,
                                 examples=["[[10, 20, 110, 140]]"])
    labels: Optional[str] = Field(None, description="JSON text: " + LABELS_DOC,
                                  examples=['["disc"]'])
    score_threshold: Optional[str] = Field(None, description=THRESHOLD_DOC,
                                           examples=["0.3", "calibrated", "all"])


# --------------------------------------------------------------------------- responses
class RLE(BaseModel):
    """COCO run-length encoding of a mask (``pycocotools.mask.decode`` reads it)."""

    size: list[int] = Field(min_length=2, max_length=2, description="[height, width]")
    counts: str = Field(description="compressed COCO RLE counts")


class Instance(BaseModel):
    """One instance (automatic mode) or the answer to one prompt box (prompt mode, in order)."""

    box: list[float] = Field(min_length=4, max_length=4,
                             description="[x1, y1, x2, y2], original-image pixels")
    score: float
    label: int = Field(description="class index")
    label_name: str
    area: int = Field(description="mask area in pixels")
    segmentation: RLE


class Timing(BaseModel):
    """Milliseconds: waiting for a batch, the batch's inference, and the whole request."""

    queue: float
    inference: float
    total: float


class SegmentResponse(BaseModel):
    instances: list[Instance]
    image_size: list[int] = Field(min_length=2, max_length=2, description="[height, width]")
    mode: Literal["auto", "prompt"]
    timing_ms: Timing


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable reason, e.g. invalid_image, too_many_boxes")
    message: str = Field(description="one line naming the input and the fix")
    field: Optional[str] = Field(None, description="the request field at fault, e.g. boxes[2]")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Limits(BaseModel):
    max_body_bytes: int
    max_pixels: int = Field(description="largest image, width x height")
    max_boxes: int = Field(description="prompt boxes per request")
    max_mask_pixels: int = Field(description="pixels one request's masks may cover: prompt "
                                 "box areas summed (automatic mode: the image)")
    max_batch: int
    max_wait_ms: float
    max_queue: int
    keep_alive_s: float = Field(description="idle connections are closed after this")
    body_timeout_s: float = Field(description="a request body must arrive within this")
    memory_budget_bytes: int = Field(description="bytes all requests in flight may hold "
                                     "together (bodies, decoding, inference, masks)")
    admission_wait_s: float = Field(description="longest wait for room in that budget, "
                                    "then 503 with Retry-After")


class InputRules(BaseModel):
    content_types: list[str]
    image_formats: list[str]
    min_image_side: int
    resize_min_size: int = Field(description="shorter side is resized to this for the network")
    resize_max_size: int = Field(description="longer side is capped at this for the network")


class ModelInfo(BaseModel):
    classes: list[str]
    backbone: str
    backend: str
    device: str
    score_threshold: float = Field(description="automatic mode's default threshold: the one "
                                   "that maximised F1 on the model's validation split, else the "
                                   "model's candidate threshold")
    input: InputRules
    limits: Limits


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    status: Literal["ready", "warming_up", "failed", "shutting_down"]
    detail: Optional[str] = None


class Stats(BaseModel):
    requests: int = Field(description="jobs answered by the batcher")
    batches: int
    mean_batch_size: float
    max_batch_size: int
    failed: int
    large_requests: int = Field(description="requests run alone in the large-request lane")
    queued: int
    batch_sizes: dict[str, int] = Field(description="batch size -> how many batches had it")
    memory_in_use_bytes: int = Field(description="bytes the requests in flight hold now")
    memory_peak_bytes: int = Field(description="most bytes held at once since start")
    waiting_for_memory: int = Field(description="requests waiting for room in the budget")
    refused_busy: int = Field(description="requests answered 503 for want of memory")


ERROR_STATUSES = {
    400: "The body is not valid JSON or multipart.",
    408: "The body did not arrive within the server's body timeout.",
    413: "The body, the image or the area the masks cover is over the server's limit.",
    415: "Unsupported Content-Type (use multipart/form-data or application/json).",
    422: "An input is invalid (image, boxes, labels, score_threshold); see error.field.",
    500: "Inference failed for this request (the server keeps serving).",
    503: "The server is busy (queue full) or shutting down; retry later.",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the given error statuses."""
    return {s: {"model": ErrorResponse, "description": ERROR_STATUSES[s]} for s in statuses}


def _example_image_b64() -> str:
    """A small valid PNG (32x48 gradient), base64: the request example of the schema."""
    from PIL import Image

    yy, xx = np.mgrid[0:32, 0:48]
    rgb = np.stack([xx * 5, yy * 7, (xx + yy) * 3], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _limit_boxes(schema: dict[str, Any], max_boxes: int) -> dict[str, Any]:
    for branch in schema["properties"]["boxes"].get("anyOf", []):
        if branch.get("type") == "array":
            branch["maxItems"] = max_boxes
    return schema


def segment_request_body(max_boxes: int) -> dict[str, Any]:
    """``openapi_extra`` for ``POST /v1/segment``: both content types, the box limit, and a
    working JSON example."""
    json_schema = _limit_boxes(SegmentJSONRequest.model_json_schema(), max_boxes)
    form_schema = SegmentForm.model_json_schema()
    form_schema["properties"]["image"] = {"type": "string", "format": "binary",
                                          "description": form_schema["properties"]["image"]
                                          .get("description", "")}
    example = {"image": _example_image_b64(), "boxes": [[4, 4, 30, 28]], "labels": [None]}
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": form_schema},
        "application/json": {"schema": json_schema, "examples": {
            "prompted": {"summary": "one prompt box", "value": example},
            "automatic": {"summary": "automatic mode",
                          "value": {"image": example["image"], "score_threshold": 0.3}},
        }},
    }}}
