"""A Label Studio ML backend on the inference server (``sim serve --label-studio``).

Routes, under ``/labelstudio`` (the URL to give Label Studio is ``http://HOST:PORT/labelstudio``):

- ``GET /health``: ``{"status": "UP", "model_class", "model_version"}``;
- ``POST /setup``: Label Studio connects; ``schema`` (the labelling config) is kept, the
  answer is ``{"model_version"}``;
- ``POST /predict``: ``{"tasks": [...], "label_config", "params": {"context"}}`` ->
  ``{"results": [one prediction per task], "model_version"}``. Without ``context`` (batch
  pre-annotation) each task's boxes are the ``rectanglelabels`` of its latest annotation;
  with ``context`` (interactive labelling) they are the rectangles the annotator just drew
  (``context.result``). Each box gets one mask with its label, as a ``brushlabels`` result in
  Label Studio's brush RLE when the config has ``BrushLabels`` (else ``polygonlabels`` when
  it has ``PolygonLabels``), in percent coordinates, named after the config's tags.

Each task runs like a ``/v1/segment`` request: the server's pixel, box, mask-pixel and body
limits and its memory budget (:mod:`serving.server.admission`) apply, labels follow the
Segmenter's prompt rules (a label that is not a model class lets the model predict it), and
the work goes through the same batcher. A task that cannot be read or refuses its boxes gets
``{"result": [], "error": "<one line>"}`` and the batch goes on; only a malformed request
body is an HTTP error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from ..errors import InputError, SimError
from ..formats.labelstudio import (
    box_results,
    brush_result,
    image_ref,
    polygon_result,
    rectangle_box,
    rectangle_label,
    result_names,
)
from ..inference.images import load_image
from ..segmenter import Segmenter
from .admission import BODY_COPIES, BudgetBusy, MemoryBudget, OverBudget, request_bytes
from .batching import BatcherBusy, BatcherClosed, DynamicBatcher, SegmentJob
from .labelstudio_images import ImageSource, LabelStudioSettings, same_origin
from .limits import ServerSettings, mask_pixels
from .requests import ApiError, check_header, prompt_error, read_body

log = logging.getLogger("serving.server.labelstudio_backend")
PREFIX = "/labelstudio"


def model_version(segmenter: Segmenter) -> str:
    """The ``model_version`` Label Studio shows: ``sim-`` and the model file's name."""
    return "sim-" + (Path(str(segmenter.info.get("path", "model"))).name or "model")


def output_kind(label_config: str | None) -> str:
    """``brush`` when the config has ``BrushLabels``, else ``polygon`` when it has
    ``PolygonLabels``, else ``brush``."""
    if label_config and "<BrushLabels" not in label_config and "<PolygonLabels" in label_config:
        return "polygon"
    return "brush"


class _Backend:
    """The state and the per-task work behind the routes."""

    def __init__(self, segmenter: Segmenter, settings: ServerSettings,
                 batcher: DynamicBatcher, ls: LabelStudioSettings,
                 budget: MemoryBudget | None = None) -> None:
        self.segmenter, self.settings, self.batcher, self.ls = segmenter, settings, batcher, ls
        self.budget = budget or MemoryBudget(settings.memory_budget_bytes, settings.max_queue,
                                             settings.admission_wait_s)
        self.source = ImageSource(ls, settings.max_body_bytes)
        self.version = model_version(segmenter)
        self.label_config: str | None = None
        self.slots = asyncio.Semaphore(max(settings.max_batch, 1))

    def setup(self, body: dict[str, Any]) -> None:
        if isinstance(body.get("schema"), str):
            self.label_config = body["schema"]
        token, host = body.get("access_token"), body.get("hostname")
        if (isinstance(token, str) and token and self.ls.url and isinstance(host, str)
                and same_origin(host, self.ls.url)):
            self.source.setup_token = token  # only ever sent back to the configured host

    def _job(self, data: bytes, rects: list[dict[str, Any]]) -> tuple[SegmentJob, list[str]]:
        """Decode and check one task's image and boxes (in a thread); the job and each box's
        label. Raises :class:`SimError`/:class:`ApiError` with the reason."""
        check_header(data, self.settings.max_pixels)
        image = load_image(data)
        h, w = image.shape[:2]
        boxes, names = [], []
        for r in rects:
            x, y, bw, bh = rectangle_box(r, (w, h))
            boxes.append([x, y, x + bw, y + bh])
            names.append(rectangle_label(r))
        classes = self.segmenter.class_names  # a name the model lacks: the model predicts it
        labels = [n if n in classes else None for n in names]
        try:
            prompt = self.segmenter.check_prompt(boxes, labels, (h, w),
                                                 max_boxes=self.settings.request_boxes,
                                                 max_mask_pixels=self.settings.max_mask_pixels)
        except InputError as exc:
            raise prompt_error(exc, (h, w)) from None
        return SegmentJob(image, prompt, None, prompt.mask_pixels), names

    async def task(self, task: Any, config: str | None, context: Any) -> dict[str, Any]:
        """One task's prediction, or its error result (never raises)."""
        tid = task.get("id") if isinstance(task, dict) else None
        try:
            async with self.slots:
                return await self._task(task, config, context)
        except (SimError, ApiError) as exc:
            message = exc.message if isinstance(exc, ApiError) else str(exc)
        except (BatcherBusy, BatcherClosed, BudgetBusy) as exc:
            message = f"{exc}; retry the task"
        except OverBudget as exc:
            message = f"the image {exc} (--memory-budget-mb); downscale it or raise the budget"
        except Exception as exc:  # noqa: BLE001 - one task's failure must not fail the batch
            log.exception("Label Studio task %s failed", tid)
            message = f"internal error ({type(exc).__name__}); the server is still running"
        return {"result": [], "score": 0.0, "model_version": self.version,
                "error": f"task {tid}: {message}"}

    async def _task(self, task: Any, config: str | None, context: Any) -> dict[str, Any]:
        data = task.get("data") if isinstance(task, dict) else None
        ref = image_ref(data) if isinstance(data, dict) else None
        if ref is None:
            raise InputError("no image in its data (expected data.image)")
        rects = _context_rects(context) if context else box_results(task)
        if not rects:
            return {"result": [], "score": 0.0, "model_version": self.version}
        raw = await run_in_threadpool(self.source.read, ref)
        lease = self.budget.lease()  # the same memory budget as /v1/segment
        try:
            lease.take_now(len(raw) * BODY_COPIES)
            await lease.grow_to(lease.held + await run_in_threadpool(self._memory, raw, rects))
            job, names = await run_in_threadpool(self._job, raw, rects)
            pred = (await self.batcher.submit(job)).prediction
            return await run_in_threadpool(self._results, pred, names, rects, config)
        finally:
            lease.release()

    def _memory(self, data: bytes, rects: list[dict[str, Any]]) -> int:
        """The bytes a task may hold once decoded (from its image header, nothing decoded):
        :func:`serving.server.admission.request_bytes` of the image and its boxes."""
        header = check_header(data, self.settings.max_pixels)
        if header is None:
            return 0  # unreadable: decoding says why
        size = (header.width, header.height)
        try:
            boxes = np.array([rectangle_box(r, size) for r in rects], np.float64)
            boxes[:, 2:] += boxes[:, :2]  # XYWH -> XYXY
            boxes[:, 0::2] = boxes[:, 0::2].clip(0, header.width)
            boxes[:, 1::2] = boxes[:, 1::2].clip(0, header.height)
            masks = mask_pixels(boxes, (header.height, header.width),
                                bool(self.segmenter.cfg.clip_to_box))
        except (SimError, ValueError, TypeError, IndexError):  # _job reports the bad box
            masks = header.pixels
        return request_bytes(header.pixels, masks, header.mode)

    def _results(self, pred: Any, names: list[str], rects: list[dict[str, Any]],
                 config: str | None) -> dict[str, Any]:
        kind = output_kind(config)
        from_name, to_name = result_names(config, kind)
        results = []
        for i in range(len(pred)):
            target = to_name or rects[i].get("to_name") or "image"
            rid = uuid.uuid4().hex[:10]
            score = float(pred.scores[i])
            mask = pred.mask(i)
            if kind == "brush":
                results.append(brush_result(mask, names[i], score, from_name, target, rid))
                continue
            from ..formats.polygons import mask_to_polygons

            h, w = mask.shape
            result = polygon_result(mask_to_polygons(mask), (w, h), names[i], score,
                                    from_name, target, rid)
            if result is not None:
                results.append(result)
        scores = [r["score"] for r in results]
        return {"result": results, "score": round(float(np.mean(scores)), 5) if scores else 0.0,
                "model_version": self.version}


def _context_rects(context: Any) -> list[dict[str, Any]]:
    """The rectangles an annotator drew, from an interactive request's ``context``."""
    items = context.get("result") if isinstance(context, dict) else None
    return [r for r in items or [] if isinstance(r, dict)
            and r.get("type") in ("rectanglelabels", "rectangle")]


async def _json_object(request: Request, settings: ServerSettings) -> dict[str, Any]:
    body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
    try:
        data = json.loads(body or b"{}")
    except (ValueError, RecursionError):
        raise ApiError(400, "malformed_body", "body: not valid JSON; Label Studio sends a JSON "
                       "object", "body") from None
    if not isinstance(data, dict):
        raise ApiError(422, "invalid_field", "body: not a JSON object", "body")
    return data


def add_label_studio_routes(app: FastAPI, segmenter: Segmenter, settings: ServerSettings,
                            batcher: DynamicBatcher, ls: LabelStudioSettings) -> None:
    """Register the ML backend routes (see the module docstring) on ``app``."""
    backend = _Backend(segmenter, settings, batcher, ls, getattr(app.state, "budget", None))
    app.state.label_studio = backend

    @app.get(PREFIX + "/health", summary="Label Studio ML backend: health")
    async def ls_health() -> dict[str, Any]:
        return {"status": "UP", "model_class": "SIM", "model_version": backend.version}

    @app.post(PREFIX + "/setup", summary="Label Studio ML backend: connect a project")
    async def ls_setup(request: Request) -> dict[str, Any]:
        backend.setup(await _json_object(request, settings))
        return {"model_version": backend.version}

    @app.post(PREFIX + "/predict", summary="Label Studio ML backend: one mask per box")
    async def ls_predict(request: Request) -> dict[str, Any]:
        body = await _json_object(request, settings)
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            raise ApiError(422, "invalid_field", "tasks: required, a list of Label Studio "
                           "tasks", "tasks")
        config = body.get("label_config") if isinstance(body.get("label_config"), str) \
            else backend.label_config
        params = body.get("params") if isinstance(body.get("params"), dict) else {}
        results = await asyncio.gather(*(backend.task(t, config, params.get("context"))
                                         for t in tasks))
        return {"results": list(results), "model_version": backend.version}
