"""Turning an HTTP request into a validated :class:`SegmentJob`, and a result into JSON.

Order of checks for ``POST /v1/segment`` (cheapest first, all before any batching):

1. ``Content-Type`` neither multipart/form-data nor application/json -> 415;
2. ``Content-Length`` over the body limit -> 413 before reading anything;
3. the body is read with a running count -> 413 as soon as it passes the limit;
   (its bytes count against the memory budget as they arrive: no room -> 503);
4. the body is parsed (400 if it is not JSON / multipart) and its fields validated (422);
5. the image header is read (nothing decoded): too many pixels -> 413;
6. the prompt is checked by ``Segmenter.check_prompt``: more boxes than ``--max-boxes``
   (a per-request cap, not the model's per-pass limit) -> 422, boxes checked and clipped
   (422 naming the box index), labels resolved (422), the pixels the masks may cover
   (:func:`mask_pixels`) over ``--max-mask-pixels`` -> 413;
7. automatic mode: the image's pixels over ``--max-mask-pixels`` -> 413;
8. the request waits for its bytes in the memory budget (:mod:`serving.server.admission`;
   503 with ``Retry-After`` when none come free in time), then the image is decoded (422 if
   it cannot be).

Every error is an :class:`ApiError` rendered as ``{"error": {"code", "message", "field"}}``.
Imported only by :mod:`serving.server.app`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from ..errors import BoxError, ImageError, InputError
from ..inference.images import load_image
from ..prompts import ALL, CALIBRATED, SHOWN_THRESHOLD, Prompt, PromptLimitError
from ..segmenter import Segmenter
from .admission import request_bytes
from .batching import JobResult, SegmentJob
from .limits import ImageHeader, ServerSettings, mask_pixels, read_header
from .schemas import (
    RLE,
    Instance,
    SegmentJSONRequest,
    SegmentOptions,
    SegmentResponse,
    Timing,
)

JSON_TYPE = "application/json"
MULTIPART_TYPE = "multipart/form-data"
FORM_FIELDS = ("image", "boxes", "labels", "score_threshold")
FIXES = {
    "image": "send the image file (JPEG, PNG, BMP, TIFF, WebP)",
    "boxes": "send a list of [x1, y1, x2, y2] pixel boxes, e.g. [[10, 20, 110, 140]]",
    "labels": "send one class name, class index or null per box",
    "score_threshold": "send a number between 0 and 1, 'calibrated' or 'all'",
}


class ApiError(Exception):
    """An HTTP error with a JSON body ``{"error": {"code", "message", "field"}}``."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.headers = headers
        self.status = status
        self.code = code
        self.message = message
        self.field = field

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "field": self.field}}


@dataclass(frozen=True)
class RawSegmentRequest:
    """A parsed, schema-valid request whose image is still encoded."""

    image: bytes
    options: SegmentOptions


# --------------------------------------------------------------------------- reading
def _too_large(size: str, limit: int) -> ApiError:
    return ApiError(413, "body_too_large",
                    f"body: {size} exceeds the limit of {limit} bytes; send a smaller image "
                    "(downscale or recompress it)", "body")


async def read_body(request: Request, max_bytes: int, timeout_s: float | None = None,
                    on_bytes: Callable[[int], None] | None = None) -> bytes:
    """The request body, refusing (413) from ``Content-Length`` or while reading, and (408)
    when it has not all arrived after ``timeout_s`` seconds. ``on_bytes(n)`` is called per
    chunk before it is kept (the memory budget: it may raise to refuse the request)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise _too_large(f"{int(length)} bytes", max_bytes)
    chunks: list[bytes] = []

    async def read() -> None:
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_bytes:
                raise _too_large(f"more than {total} bytes", max_bytes)
            if on_bytes is not None:
                on_bytes(len(chunk))
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, "body_timeout", f"body: not received within {timeout_s:g} s; send "
                       "the request at once (or raise the server's --body-timeout)",
                       "body") from None
    return b"".join(chunks)


def media_type(request: Request) -> str:
    """The request's Content-Type without parameters, lower case; 415 if unsupported."""
    value = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if value == MULTIPART_TYPE or value == JSON_TYPE or value.endswith("+json"):
        return value
    shown = value or "none"
    raise ApiError(415, "unsupported_media_type",
                   f"Content-Type {shown} is not accepted; send multipart/form-data with the "
                   "image file in field 'image', or application/json with a base64 'image'",
                   "Content-Type")


def _pydantic_error(exc: ValidationError) -> ApiError:
    err = exc.errors()[0]
    loc = list(err.get("loc", ()))
    field = str(loc[0]) if loc else "body"
    field += "".join(f"[{p}]" for p in loc[1:] if isinstance(p, int))
    root = str(loc[0]) if loc else "body"
    fix = FIXES.get(root, "remove it; accepted fields are " + ", ".join(FORM_FIELDS))
    if err.get("type") == "missing":
        return ApiError(422, "missing_field", f"{field}: required; {fix}", field)
    return ApiError(422, "invalid_field", f"{field}: {err.get('msg', 'invalid')}; {fix}", field)


def _decode_base64(text: str) -> bytes:
    if text.startswith("data:") and ";base64," in text[:100]:
        text = text.split(";base64,", 1)[1]
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid_base64", "image: not valid base64 text; encode the image "
                       "file with base64 (for example `base64 -w0 image.jpg`)", "image") from None


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook``: a JSON object whose key appears twice is refused (which one
    counts would be the parser's choice, not the client's)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _parse_json(body: bytes) -> RawSegmentRequest:
    try:
        data = json.loads(body, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise ApiError(422, "duplicate_field", f"{exc}: sent more than once; send it once",
                       str(exc)[:40]) from None
    except ValueError as exc:
        raise ApiError(400, "malformed_body", f"body: not valid JSON ({exc}); send a JSON object "
                       "like {\"image\": \"<base64>\"}", "body") from None
    except RecursionError:
        raise ApiError(400, "malformed_body", "body: JSON nested too deeply; send a JSON object "
                       "like {\"image\": \"<base64>\", \"boxes\": [[x1, y1, x2, y2]]}",
                       "body") from None
    try:
        req = SegmentJSONRequest.model_validate(data)
    except ValidationError as exc:
        raise _pydantic_error(exc) from None
    options = SegmentOptions(boxes=req.boxes, labels=req.labels,
                             score_threshold=req.score_threshold)
    return RawSegmentRequest(_decode_base64(req.image), options)


def _form_json(name: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ApiError(422, "malformed_json", f"{name}: not valid JSON ({exc}); {FIXES[name]}",
                       name) from None
    except RecursionError:
        raise ApiError(422, "malformed_json", f"{name}: JSON nested too deeply; {FIXES[name]}",
                       name) from None


async def _read_form(request: Request, body: bytes) -> Any:
    """The multipart form of an already-read ``body`` (400 if it is not multipart)."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        return await Request(request.scope, replay).form(max_files=len(FORM_FIELDS),
                                                         max_fields=8)
    except HTTPException as exc:
        raise ApiError(400, "malformed_body", f"body: malformed multipart ({exc.detail}); send "
                       "multipart/form-data with the image file in field 'image'", "body") from None
    except Exception as exc:  # python-multipart raises several types on garbage
        raise ApiError(400, "malformed_body", f"body: malformed multipart ({type(exc).__name__});"
                       " send multipart/form-data with the image in field 'image'",
                       "body") from None


def _check_form_keys(form: Any) -> None:
    """Only the known fields, each once; the options as text, not files (422 otherwise)."""
    for key in form.keys():
        if key not in FORM_FIELDS:
            raise ApiError(422, "unknown_field", f"{key}: unknown field; accepted fields are "
                           + ", ".join(FORM_FIELDS), key)
        if len(form.getlist(key)) > 1:
            raise ApiError(422, "duplicate_field", f"{key}: sent more than once; send it once",
                           key)
    for name in ("boxes", "labels", "score_threshold"):
        if isinstance(form.get(name), UploadFile):
            raise ApiError(422, "invalid_field", f"{name}: sent as a file; send it as a plain "
                           "form field", name)


def _form_options(form: Any) -> dict[str, Any]:
    """``boxes`` and ``labels`` (JSON text) and ``score_threshold`` (a number) of the form."""
    fields: dict[str, Any] = {}
    for name in ("boxes", "labels"):
        value = form.get(name)
        if isinstance(value, str) and value.strip():
            fields[name] = _form_json(name, value)
    threshold = form.get("score_threshold")
    if isinstance(threshold, str) and threshold.strip():
        try:
            word = threshold.strip()
            fields["score_threshold"] = word if word in (CALIBRATED, ALL) else float(word)
        except ValueError:
            raise ApiError(422, "invalid_field", f"score_threshold: '{threshold[:20]}' is not "
                           f"a number; {FIXES['score_threshold']}", "score_threshold") from None
    return fields


async def _parse_multipart(request: Request, body: bytes) -> RawSegmentRequest:
    form = await _read_form(request, body)
    try:
        _check_form_keys(form)
        image = form.get("image")
        if image is None:
            raise ApiError(422, "missing_field", f"image: required; {FIXES['image']} in "
                           "multipart field 'image'", "image")
        data = await image.read() if isinstance(image, UploadFile) else image.encode("utf-8")
        fields = _form_options(form)
    finally:
        await form.close()
    try:
        options = SegmentOptions.model_validate(fields)
    except ValidationError as exc:
        raise _pydantic_error(exc) from None
    return RawSegmentRequest(data, options)


async def parse_segment_request(request: Request, max_bytes: int,
                                timeout_s: float | None = None,
                                on_bytes: Callable[[int], None] | None = None,
                                ) -> RawSegmentRequest:
    """Read and parse a ``POST /v1/segment`` body (multipart or JSON); see module docstring
    (``on_bytes``: see :func:`read_body`)."""
    kind = media_type(request)
    body = await read_body(request, max_bytes, timeout_s, on_bytes)
    if kind == MULTIPART_TYPE:
        return await _parse_multipart(request, body)
    return _parse_json(body)


# --------------------------------------------------------------------------- validating
def _indexed_field(message: str, word: str, name: str) -> str:
    match = re.match(rf"{word} (\d+):", message)
    return f"{name}[{match.group(1)}]" if match else name


def check_header(data: bytes, max_pixels: int) -> ImageHeader | None:
    """The image's header (``None``: unreadable, the decoder says why); 413 if it declares
    more than ``max_pixels``. Nothing is decoded."""
    from PIL import Image

    try:
        header = read_header(data)
    except Image.DecompressionBombError:
        raise ApiError(413, "image_too_large", "image: larger than the decoder's "
                       f"decompression-bomb limit; the limit is {max_pixels} pixels, "
                       "downscale it", "image") from None
    if header is not None and header.pixels > max_pixels:
        w, h = header.width, header.height
        raise ApiError(413, "image_too_large", f"image: {w}x{h} = {w * h} pixels exceeds the "
                       f"limit of {max_pixels} pixels; downscale it", "image")
    return header


def _mask_pixels_error(cost: int, boxes: int | None, shape: tuple[int, int],
                       limit: int) -> ApiError:
    """The 413 for ``cost`` mask pixels (of ``boxes`` prompt boxes; ``None``: automatic mode)
    over ``limit`` (``--max-mask-pixels``)."""
    h, w = shape
    if boxes is None:
        return ApiError(413, "masks_too_large", f"image: {w}x{h} = {cost} pixels exceeds "
                        f"this server's mask limit of {limit} pixels per request "
                        "(--max-mask-pixels); downscale it", "image")
    return ApiError(413, "masks_too_large", f"boxes: the {boxes} boxes cover "
                    f"{cost} pixels of the {w}x{h} image in total (box areas summed), over "
                    f"this server's limit of {limit} pixels per request (--max-mask-pixels); "
                    "send fewer or smaller boxes per request (split them over several "
                    "requests) or a downscaled image", "boxes")


def prompt_error(exc: InputError, shape: tuple[int, int]) -> ApiError:
    """The HTTP error for a prompt ``Segmenter.check_prompt`` refused for an image of
    ``shape``: over ``--max-boxes`` 422, over ``--max-mask-pixels`` 413, a bad box or label
    422 naming its index (``boxes[i]``, ``labels[i]``)."""
    if isinstance(exc, PromptLimitError):
        if exc.what == "max_boxes":
            return ApiError(422, "too_many_boxes", str(exc), "boxes")
        return _mask_pixels_error(exc.value, exc.boxes, shape, exc.limit)
    if isinstance(exc, BoxError):
        return ApiError(422, "invalid_boxes", str(exc), _indexed_field(str(exc), "box", "boxes"))
    return ApiError(422, "invalid_labels", str(exc),
                    _indexed_field(str(exc), "label", "labels"))


@dataclass
class PlannedJob:
    """A request checked against its image header, not yet decoded.

    Attributes:
        shape: (H, W) the header declares (EXIF rotation applied); ``None``: unreadable.
        prompt: the prompt ``Segmenter.check_prompt`` checked for ``shape``; ``None``:
            automatic mode. threshold: automatic mode's resolved score threshold.
        memory: the bytes it may hold once admitted (:func:`admission.request_bytes`).
    """

    raw: RawSegmentRequest
    shape: tuple[int, int] | None
    prompt: Prompt | None
    threshold: float | None
    cost: int
    memory: int


def _check_options(opts: SegmentOptions, shape: tuple[int, int], segmenter: Segmenter,
                   settings: ServerSettings) -> tuple[Prompt | None, float | None, int]:
    """The checked prompt (``Segmenter.check_prompt``), threshold and mask cost of ``opts``
    for an image of ``shape`` (422/413)."""
    if opts.boxes is None:
        if opts.labels is not None:
            raise ApiError(422, "invalid_labels", "labels: given without boxes; send one label "
                           "per box in 'boxes', or drop 'labels' for automatic mode", "labels")
        threshold = segmenter.score_cut(SHOWN_THRESHOLD if opts.score_threshold is None
                                        else opts.score_threshold)
        cost = mask_pixels(None, shape)
        if cost > settings.max_mask_pixels:
            raise _mask_pixels_error(cost, None, shape, settings.max_mask_pixels)
        return None, threshold, cost
    try:
        prompt = segmenter.check_prompt(opts.boxes, opts.labels, shape,
                                        max_boxes=settings.request_boxes,
                                        max_mask_pixels=settings.max_mask_pixels)
    except InputError as exc:
        raise prompt_error(exc, shape) from None
    return prompt, None, prompt.mask_pixels


def plan_job(raw: RawSegmentRequest, segmenter: Segmenter,
             settings: ServerSettings) -> PlannedJob:
    """Every check that needs only the image header (413/422), and the bytes the request may
    hold: automatic masks are counted as ``max_detections`` layers of the image."""
    header = check_header(raw.image, settings.max_pixels)
    if header is None:  # unreadable: decoding reports why (Pillow fails at the header)
        return PlannedJob(raw, None, None, None, 0, 0)
    shape = (header.height, header.width)
    prompt, threshold, cost = _check_options(raw.options, shape, segmenter, settings)
    layers = cost if prompt is not None else header.pixels * int(segmenter.cfg.max_detections)
    return PlannedJob(raw, shape, prompt, threshold, cost,
                      request_bytes(header.pixels, layers, header.mode))


def decode_job(plan: PlannedJob, segmenter: Segmenter, settings: ServerSettings) -> SegmentJob:
    """Decode the planned request's image (422 if it cannot be): a job that cannot poison a
    batch. Runs in a thread, after the request's memory is admitted."""
    try:
        image = load_image(plan.raw.image)
    except ImageError as exc:
        raise ApiError(422, "invalid_image", str(exc), "image") from None
    except Exception as exc:  # a decoder bug on hostile bytes is still a bad image
        raise ApiError(422, "invalid_image", f"image: cannot decode ({type(exc).__name__}); "
                       "re-export it as PNG or JPEG", "image") from None
    shape = tuple(image.shape[:2])
    if shape == plan.shape:
        return SegmentJob(image, plan.prompt, plan.threshold, plan.cost)
    # the header was unreadable by the planner, or declared another orientation
    prompt, threshold, cost = _check_options(plan.raw.options, shape,  # type: ignore[arg-type]
                                             segmenter, settings)
    return SegmentJob(image, prompt, threshold, cost)


def prepare_job(raw: RawSegmentRequest, segmenter: Segmenter,
                settings: ServerSettings) -> SegmentJob:
    """:func:`plan_job` then :func:`decode_job`, without admission (tests, scripts)."""
    return decode_job(plan_job(raw, segmenter, settings), segmenter, settings)


# --------------------------------------------------------------------------- answering
def build_response(job: SegmentJob, result: JobResult, total_ms: float) -> SegmentResponse:
    """JSON answer: one :class:`Instance` per prediction, masks as COCO RLE."""
    pred = result.prediction
    h, w = job.image.shape[:2]
    coco = pred.to_coco(image_id=0)
    areas = pred.areas
    names = pred.label_names
    instances = [
        Instance(box=[float(v) for v in pred.boxes[i]], score=float(pred.scores[i]),
                 label=int(pred.labels[i]), label_name=names[i], area=int(areas[i]),
                 segmentation=RLE(size=[h, w], counts=coco[i]["segmentation"]["counts"]))
        for i in range(len(pred))
    ]
    return SegmentResponse(
        instances=instances, image_size=[h, w],
        mode="auto" if job.prompt is None else "prompt",
        timing_ms=Timing(queue=round(result.queue_ms, 3), inference=round(result.inference_ms, 3),
                         total=round(total_ms, 3)))
