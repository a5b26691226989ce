"""``python -m serving serve``: the HTTP inference server (FastAPI + uvicorn).

Endpoints:

- ``POST /v1/segment``: an image (multipart field ``image``, or JSON ``{"image": base64}``),
  optional prompt boxes / labels / score threshold -> instances with COCO RLE masks and timing;
- ``GET /v1/model``: classes, backbone, backend, device, input rules and limits;
- ``GET /v1/stats``: batching counters; ``GET /healthz``: liveness;
  ``GET /readyz``: 200 once a warm-up forward pass has run, else 503 (also while stopping);
- ``GET /openapi.json``, ``/docs`` and ``/redoc``: the schema of all of the above (the pages
  work offline, :mod:`serving.server.app_docs`).
- with ``--label-studio``: ``/labelstudio/health``, ``/setup`` and ``/predict``, a Label Studio
  ML backend (:mod:`serving.server.labelstudio_backend`).

Concurrent requests are batched (:mod:`serving.server.batching`); bad input is rejected before
batching (:mod:`serving.server.requests`, limits in :mod:`serving.server.limits`). Listens on
127.0.0.1 unless told otherwise. FastAPI and uvicorn are imported only by this package
(``serving.__main__`` imports it lazily).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..backends.locate import MODEL_HELP
from ..cli.common import add_box_scale_option, add_image_size_option
from ..errors import SimError
from ..inference.images import IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE
from ..prompts import DEFAULT_MAX_REQUEST_BOXES, SHOWN_THRESHOLD
from ..segmenter import Segmenter
from .admission import (
    BODY_COPIES,
    BudgetBusy,
    Lease,
    MemoryBudget,
    OverBudget,
    budget_statement,
    resident_bytes,
    return_freed_memory,
)
from .app_docs import add_offline_docs
from .batching import BatcherBusy, BatcherClosed, DynamicBatcher
from .limits import ServerSettings
from .requests import (
    JSON_TYPE,
    MULTIPART_TYPE,
    ApiError,
    PlannedJob,
    build_response,
    decode_job,
    parse_segment_request,
    plan_job,
)
from .schemas import (
    Health,
    InputRules,
    Limits,
    ModelInfo,
    Readiness,
    SegmentResponse,
    Stats,
    error_responses,
    segment_request_body,
)

log = logging.getLogger("serving.server")
SETTINGS_ENV = "SIM_SERVE_CONFIG"  # JSON handed to worker processes when --workers > 1


def _error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _busy(message: str, retry_after_s: int) -> ApiError:
    return ApiError(503, "busy", message, headers={"Retry-After": str(retry_after_s)})


def _warm_up(segmenter: Segmenter) -> None:
    """One automatic and one prompted forward pass on a gray 4:3 image of the network's
    input size (so the first real request does not pay for allocation and kernel selection)."""
    h = int(segmenter.cfg.min_size)
    w = min(int(segmenter.cfg.max_size), h * 4 // 3)
    image = np.full((h, w, 3), 127, np.uint8)
    segmenter.predict(image)
    segmenter.predict(image, boxes=[[w / 4, h / 4, 3 * w / 4, 3 * h / 4]])


class _Lifecycle:
    """Readiness of one app: warming up, ready, failed or shutting down (``/readyz``)."""

    def __init__(self, segmenter: Segmenter, settings: ServerSettings,
                 batcher: DynamicBatcher) -> None:
        self.segmenter, self.settings, self.batcher = segmenter, settings, batcher
        self.status, self.detail = "warming_up", "warm-up pass not finished"

    def set(self, status: str, detail: str | None = None) -> None:
        self.status, self.detail = status, detail

    async def warm_up(self) -> None:
        try:
            if self.settings.warmup:
                await self.batcher.run_in_worker(_warm_up, self.segmenter)
            if self.status == "warming_up":
                self.set("ready")
        except Exception as exc:  # reported by /readyz; the server stays up
            log.error("warm-up failed: %s: %s", type(exc).__name__, exc)
            self.set("failed", f"warm-up failed: {type(exc).__name__}: {exc}")

    def begin_draining(self) -> None:
        """Readiness off (503) while requests are still served: the shutdown's first step."""
        self.set("shutting_down", "the server is stopping; send new requests to another "
                 "instance")

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        self.set("warming_up", "warm-up pass not finished")
        await self.batcher.start()
        if not self.settings.warmup:
            self.set("ready")
        task = asyncio.create_task(self.warm_up())
        try:
            yield
        finally:
            self.begin_draining()
            await task
            await self.batcher.close()  # finishes every queued and running job


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as ``{"error": {"code", "message", "field"}}`` with its status."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = f"{request.method} {request.url.path}: {exc.detail}"
        if exc.status_code in (404, 405):
            message += "; see /docs for the endpoints"
        return JSONResponse({"error": {"code": code, "message": message, "field": None}},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s: %s: %s", request.url.path, type(exc).__name__, exc)
        return _error_response(ApiError(500, "internal_error", f"internal error "
                                        f"({type(exc).__name__}); the server is still running"))


def _add_segment_route(app: FastAPI, segmenter: Segmenter, settings: ServerSettings,
                       batcher: DynamicBatcher, budget: MemoryBudget, max_boxes: int) -> None:
    @app.post("/v1/segment", response_model=SegmentResponse, summary="Segment one image",
              responses=error_responses(400, 408, 413, 415, 422, 500, 503),
              openapi_extra=segment_request_body(max_boxes))
    async def segment(request: Request) -> SegmentResponse:
        """Automatic instance segmentation, or one mask per prompt box (in order).

        Send ``multipart/form-data`` (file field ``image``; optional text fields ``boxes``,
        ``labels`` as JSON, ``score_threshold``) or ``application/json`` (``image`` as base64).
        """
        start = time.perf_counter()
        lease = budget.lease()
        try:
            return await _segment(request, lease, segmenter, settings, batcher, start)
        except BudgetBusy as exc:
            raise _busy(str(exc), exc.retry_after_s) from None
        finally:
            lease.release()


async def _admit(lease: Lease, plan: PlannedJob) -> None:
    """Hold the planned request's bytes in the budget (waiting), or 413 when it alone needs
    more than the whole budget."""
    try:
        await lease.grow_to(lease.held + plan.memory)
    except OverBudget as exc:
        assert plan.shape is not None
        h, w = plan.shape
        mode = "automatic mode" if plan.prompt is None else f"{len(plan.prompt)} prompt boxes"
        raise ApiError(413, "over_memory_budget", f"image: {w}x{h} in {mode} {exc} "
                       "(--memory-budget-mb); downscale it, send fewer or smaller prompt "
                       "boxes, or start the server with a larger --memory-budget-mb",
                       "image") from None


async def _segment(request: Request, lease: Lease, segmenter: Segmenter,
                   settings: ServerSettings, batcher: DynamicBatcher,
                   start: float) -> SegmentResponse:
    """One ``POST /v1/segment`` under ``lease``: read (bytes counted as they arrive), plan
    from the header, admit, decode, infer, answer."""
    raw = await parse_segment_request(request, settings.max_body_bytes, settings.body_timeout_s,
                                      on_bytes=lambda n: lease.take_now(n * BODY_COPIES))
    plan = await run_in_threadpool(plan_job, raw, segmenter, settings)
    await _admit(lease, plan)
    job = await run_in_threadpool(decode_job, plan, segmenter, settings)
    del raw, plan
    try:
        result = await batcher.submit(job)
    except BatcherClosed as exc:
        raise ApiError(503, "shutting_down", str(exc)) from None
    except BatcherBusy as exc:
        raise _busy(str(exc), 1) from None
    except SimError as exc:  # input the up-front checks could not see
        raise ApiError(422, "invalid_input", str(exc)) from None
    except Exception as exc:
        log.exception("inference failed for one request")
        raise ApiError(500, "inference_failed", f"inference failed ({type(exc).__name__}); "
                       "the server is still running; retry, or report the input") from None
    return await run_in_threadpool(
        build_response, job, result, (time.perf_counter() - start) * 1000.0)


def _model_info(segmenter: Segmenter, settings: ServerSettings, max_boxes: int) -> ModelInfo:
    info = segmenter.model_info
    return ModelInfo(
        classes=info["classes"], backbone=str(info["backbone"]), backend=info["backend"],
        device=str(info["device"]),
        score_threshold=float(segmenter.score_cut(SHOWN_THRESHOLD) or 0.0),
        input=InputRules(content_types=[MULTIPART_TYPE, JSON_TYPE],
                         image_formats=[e.lstrip(".") for e in IMAGE_EXTENSIONS],
                         min_image_side=MIN_IMAGE_SIDE, resize_min_size=info["min_size"],
                         resize_max_size=info["max_size"]),
        limits=Limits(max_body_bytes=settings.max_body_bytes, max_pixels=settings.max_pixels,
                      max_boxes=max_boxes, max_mask_pixels=settings.max_mask_pixels,
                      max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms,
                      max_queue=settings.max_queue, keep_alive_s=settings.keep_alive_s,
                      body_timeout_s=settings.body_timeout_s,
                      memory_budget_bytes=settings.memory_budget_bytes,
                      admission_wait_s=settings.admission_wait_s))


def _add_status_routes(app: FastAPI, info: ModelInfo, batcher: DynamicBatcher,
                       budget: MemoryBudget, lifecycle: _Lifecycle) -> None:
    @app.get("/v1/model", response_model=ModelInfo, summary="Model, input rules and limits")
    async def model_info() -> ModelInfo:
        return info

    @app.get("/v1/stats", response_model=Stats, summary="Batching counters since start")
    async def stats() -> Stats:
        s = batcher.stats
        return Stats(requests=s.jobs, batches=s.batches, failed=s.failed,
                     large_requests=s.large_jobs,
                     mean_batch_size=round(s.jobs / s.batches, 3) if s.batches else 0.0,
                     max_batch_size=s.max_batch_size, queued=batcher.queued,
                     batch_sizes={str(k): v for k, v in sorted(s.sizes.items())},
                     memory_in_use_bytes=budget.in_use, memory_peak_bytes=budget.peak,
                     waiting_for_memory=budget.waiting, refused_busy=budget.refused)

    @app.get("/healthz", response_model=Health, summary="Liveness")
    async def healthz() -> Health:
        return Health(status="ok")

    @app.get("/readyz", response_model=Readiness, summary="Readiness (model warmed up)",
             responses={503: {"model": Readiness, "description": "not ready yet, or stopping"}})
    async def readyz() -> Any:
        body = Readiness(ready=lifecycle.status == "ready", status=lifecycle.status,
                         detail=lifecycle.detail)
        return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


def create_app(segmenter: Segmenter, settings: ServerSettings | None = None,
               label_studio: Any = None) -> FastAPI:
    """The ASGI application serving ``segmenter`` (see the module docstring for endpoints);
    ``label_studio``: :class:`serving.server.labelstudio_images.LabelStudioSettings` to add
    the Label Studio ML backend (:mod:`serving.server.labelstudio_backend`)."""
    settings = settings or ServerSettings()
    max_boxes = settings.request_boxes
    batcher = DynamicBatcher(segmenter, settings.max_batch, settings.max_wait_ms,
                             settings.max_queue, max_batch_cost=settings.max_mask_pixels,
                             large_cost=settings.large_cost, large_boxes=settings.large_boxes)
    budget = MemoryBudget(settings.memory_budget_bytes, settings.max_queue,
                          settings.admission_wait_s)
    lifecycle = _Lifecycle(segmenter, settings, batcher)
    app = FastAPI(
        title="SIM box-supervised instance segmentation",
        version="1",
        description="Instance masks from images, automatically or from prompt boxes. Errors are "
                    '`{"error": {"code", "message", "field"}}`.',
        lifespan=lifecycle.lifespan,
        docs_url=None,
        redoc_url=None,
    )
    add_offline_docs(app)
    app.state.batcher = batcher
    app.state.budget = budget
    app.state.begin_draining = lifecycle.begin_draining
    app.state.segmenter = segmenter
    app.state.settings = settings
    _add_error_handlers(app)
    _add_segment_route(app, segmenter, settings, batcher, budget, max_boxes)
    _add_status_routes(app, _model_info(segmenter, settings, max_boxes), batcher, budget,
                       lifecycle)
    if label_studio is not None:
        from .labelstudio_backend import add_label_studio_routes

        add_label_studio_routes(app, segmenter, settings, batcher, label_studio)
    return app


def app_from_env() -> FastAPI:
    """uvicorn factory for ``--workers > 1``: each worker process loads its own model."""
    cfg = json.loads(os.environ[SETTINGS_ENV])
    return_freed_memory()
    segmenter = Segmenter.load(cfg["model"], device=cfg["device"],
                               image_size=cfg.get("image_size"), dtype=cfg.get("dtype"))
    if cfg.get("box_scale") == "off":
        segmenter = segmenter.with_box_scale(False)
    settings = ServerSettings(**cfg["settings"])
    label_studio = _label_studio_settings(cfg.get("label_studio"))
    if label_studio is None:
        return create_app(segmenter, settings)
    return create_app(segmenter, settings, label_studio)


def _parser(prog: str = "python -m serving serve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="HTTP inference server with dynamic batching.",
        epilog="examples:\n  sim serve --model model.onnx                 # 127.0.0.1:8000\n"
               "  sim serve --model model.safetensors --host 0.0.0.0 --max-batch 16\n"
               "  curl -s localhost:8000/v1/segment -F image=@a.png -F 'boxes=[[10,20,210,180]]'")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port, 1-65535 (default 8000)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    add_image_size_option(p)
    add_box_scale_option(p)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="checkpoints: bf16/fp16 autocast for the network (default fp32)")
    p.add_argument("--max-batch", type=int, default=8, help="images per forward pass")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long the first queued request waits for others")
    p.add_argument("--workers", type=int, default=1, help="processes, each with its own model")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body")
    p.add_argument("--max-pixels", type=int, default=ServerSettings.max_pixels,
                   help=f"largest image, width x height (at most {MAX_IMAGE_PIXELS})")
    p.add_argument("--max-boxes", type=int, default=None,
                   help="most prompt boxes one request may hold (default "
                        f"{DEFAULT_MAX_REQUEST_BOXES}); more than the model's max_prompt_boxes "
                        "run in several forward passes")
    p.add_argument("--max-mask-pixels", type=int, default=ServerSettings.max_mask_pixels,
                   help="pixels one request's masks may cover: prompt-box areas summed "
                        "(automatic mode: the image); bounds mask memory at a byte per pixel")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a batch, and for memory; more are answered 503 "
                        "busy")
    p.add_argument("--memory-budget-mb", type=float, default=ServerSettings.memory_budget_mb,
                   help="MB all requests in flight may hold together (bodies, decoding, "
                        "inference, masks), stated at start-up; requests over it wait, then "
                        "get 503 with Retry-After (default %(default)g)")
    p.add_argument("--admission-wait", type=float, default=ServerSettings.admission_wait_s,
                   help="seconds a request may wait for room in the memory budget (default "
                        "%(default)g)")
    p.add_argument("--timeout-keep-alive", type=float, default=ServerSettings.keep_alive_s,
                   help="seconds before an idle connection (no request under way) is closed")
    p.add_argument("--body-timeout", type=float, default=ServerSettings.body_timeout_s,
                   help="seconds for a request body to arrive (else 408)")
    p.add_argument("--shutdown-grace", type=float, default=ServerSettings.shutdown_grace_s,
                   help="on SIGTERM, seconds of /readyz 503 while still serving, before the "
                        "server stops accepting (with --workers 1)")
    p.add_argument("--graceful-timeout", type=int, default=30,
                   help="seconds to finish in-flight requests on shutdown")
    _add_label_studio_flags(p)
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    return p


def _settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ServerSettings:
    """The checked flags as :class:`ServerSettings` (bad values: a usage error, exit 2)."""
    for name in ("max_batch", "workers", "max_pixels", "max_queue", "max_mask_pixels"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_wait_ms < 0 or args.max_body_mb <= 0:
        parser.error("--max-wait-ms must be >= 0 and --max-body-mb > 0")
    if args.max_boxes is not None and args.max_boxes < 1:
        parser.error("--max-boxes must be at least 1")
    if args.max_pixels > MAX_IMAGE_PIXELS:
        parser.error(f"--max-pixels {args.max_pixels} is above the image decoder's ceiling of "
                     f"{MAX_IMAGE_PIXELS} pixels; use at most {MAX_IMAGE_PIXELS}")
    if not (args.timeout_keep_alive > 0 and args.body_timeout > 0 and args.shutdown_grace >= 0
            and math.isfinite(args.timeout_keep_alive + args.body_timeout
                              + args.shutdown_grace)):
        parser.error("--timeout-keep-alive and --body-timeout must be finite numbers > 0, "
                     "--shutdown-grace >= 0")
    if not (0 < args.port < 65536):
        parser.error(f"--port {args.port}: must be 1-65535")
    if not (args.memory_budget_mb >= 16 and math.isfinite(args.memory_budget_mb)):
        parser.error(f"--memory-budget-mb {args.memory_budget_mb:g}: must be a number of MB, "
                     "at least 16")
    if not (0 <= args.admission_wait <= 3600):
        parser.error(f"--admission-wait {args.admission_wait:g}: must be 0-3600 seconds")
    if not (math.isfinite(args.max_wait_ms) and math.isfinite(args.max_body_mb)):
        parser.error("--max-wait-ms and --max-body-mb must be finite numbers")
    return ServerSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                          max_body_mb=args.max_body_mb, max_pixels=args.max_pixels,
                          max_boxes=args.max_boxes, max_queue=args.max_queue,
                          max_mask_pixels=args.max_mask_pixels,
                          keep_alive_s=args.timeout_keep_alive, body_timeout_s=args.body_timeout,
                          shutdown_grace_s=args.shutdown_grace,
                          memory_budget_mb=args.memory_budget_mb,
                          admission_wait_s=args.admission_wait)


def _add_label_studio_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--label-studio", action="store_true",
                   help="also serve a Label Studio ML backend at /labelstudio (docs/"
                        "labelling_tools.md)")
    p.add_argument("--label-studio-url", default=os.environ.get("LABEL_STUDIO_URL"),
                   help="Label Studio's URL; task images are fetched from there only "
                        "(default: $LABEL_STUDIO_URL)")
    p.add_argument("--label-studio-token", default=os.environ.get("LABEL_STUDIO_API_KEY"),
                   help="its API token (default: $LABEL_STUDIO_API_KEY, else the one Label "
                        "Studio sends at setup)")
    p.add_argument("--label-studio-root", default=None, metavar="DIR",
                   help="read tasks' local image paths below DIR (default: none)")


def _ls_flags(args: argparse.Namespace) -> dict[str, Any] | None:
    if not args.label_studio:
        return None
    return {"url": args.label_studio_url, "token": args.label_studio_token,
            "local_root": args.label_studio_root}


def _label_studio_settings(flags: dict[str, Any] | None) -> Any:
    """:class:`LabelStudioSettings` from the ``--label-studio*`` flags, or ``None``."""
    if flags is None:
        return None
    from pathlib import Path

    from .labelstudio_images import LabelStudioSettings

    root = flags.get("local_root")
    return LabelStudioSettings(url=flags.get("url"), token=flags.get("token"),
                               local_root=Path(root) if root else None)


def main(argv: Sequence[str] | None = None, prog: str = "python -m serving serve") -> int:
    """Run the server until interrupted. SIGTERM: readiness off for ``--shutdown-grace``
    seconds while still serving, then in-flight requests finish; Ctrl-C skips the grace."""
    parser = _parser(prog)
    args = parser.parse_args(argv)
    settings = _settings(parser, args)
    import uvicorn

    from .app_runtime import DrainingServer, IdleTimeoutH11Protocol

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: the API has no authentication; put it "
              "behind a proxy that adds it", file=sys.stderr)
    return_freed_memory()  # the resident size follows the budget's bytes (glibc)
    # bad model or unsupported --dtype: error before binding
    segmenter = Segmenter.load(args.model, device=args.device, image_size=args.image_size,
                               dtype=args.dtype)
    if args.box_scale == "off":
        segmenter = segmenter.with_box_scale(False)
    print(budget_statement(settings.memory_budget_bytes, resident_bytes(),
                           int(segmenter.cfg.max_detections), args.workers), file=sys.stderr,
          flush=True)
    common = dict(host=args.host, port=args.port, log_level=args.log_level,
                  timeout_graceful_shutdown=args.graceful_timeout, http=IdleTimeoutH11Protocol,
                  timeout_keep_alive=settings.keep_alive_s)
    if args.workers == 1:
        app = create_app(segmenter, settings, _label_studio_settings(_ls_flags(args)))
        server = DrainingServer(uvicorn.Config(app, **common), app.state.begin_draining,
                                settings.shutdown_grace_s)
        try:
            server.run()  # SIGTERM: grace, drains, then re-raises (exit by SIGTERM)
        except KeyboardInterrupt:  # Ctrl-C, after the same graceful shutdown
            return 130
        return 0
    del segmenter  # only checked that it loads; each worker loads its own
    os.environ[SETTINGS_ENV] = json.dumps(
        {"model": str(args.model), "device": args.device, "image_size": args.image_size,
         "dtype": args.dtype, "box_scale": args.box_scale, "label_studio": _ls_flags(args),
         "settings": asdict(settings)})
    uvicorn.run("serving.server.app:app_from_env", factory=True, workers=args.workers, **common)
    return 0
