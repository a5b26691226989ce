"""Dynamic batching for the HTTP server: concurrent requests share one forward pass.

Requests are validated (image decoded, boxes checked) *before* they reach the batcher, so a
batch only ever holds well-formed jobs. The batcher groups queued jobs into one
:meth:`serving.Segmenter.predict_batch` call of up to ``max_batch`` images, waiting at most
``max_wait_ms`` after the oldest queued job arrived. Inference runs in one dedicated worker
thread (the event loop never blocks, and the model is never used by two threads at once). If a
batch raises, its jobs are retried one by one so only the job that fails gets the error.

Pure asyncio + numpy: no web framework is imported here.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..prediction import Prediction
from ..segmenter import Segmenter, run_isolated

log = logging.getLogger("serving.server")


class BatcherClosed(RuntimeError):
    """The batcher is shutting down and takes no new jobs."""


class BatcherBusy(RuntimeError):
    """The queue is full (``max_queue`` jobs waiting): the caller should retry later."""


@dataclass
class SegmentJob:
    """One validated request.

    Attributes:
        image: (H, W, 3) uint8 RGB, already decoded.
        boxes: (M, 4) float32 XYXY original pixels, validated and clipped; ``None`` = automatic.
        labels: (M,) int64 class indices, -1 = predict; ``None`` when ``boxes`` is ``None``.
        score_threshold: automatic mode: drop instances scoring below it (``None`` = model's).
    """

    image: np.ndarray
    boxes: np.ndarray | None = None
    labels: np.ndarray | None = None
    score_threshold: float | None = None


@dataclass(frozen=True)
class JobResult:
    """A job's prediction and where its time went (milliseconds)."""

    prediction: Prediction
    queue_ms: float
    inference_ms: float
    batch_size: int


@dataclass
class _Entry:
    job: SegmentJob
    future: asyncio.Future
    enqueued: float  # loop.time() seconds


@dataclass
class BatcherStats:
    """Counters since start: jobs answered, batches run, failures and the largest batch."""

    jobs: int = 0
    batches: int = 0
    failed: int = 0
    retried_batches: int = 0
    max_batch_size: int = 0
    sizes: dict[int, int] = field(default_factory=dict)


class DynamicBatcher:
    """Queue :class:`SegmentJob` s and run them in batches on one worker thread.

    Use from a running event loop: ``await start()``, ``await submit(job)``, ``await close()``.
    At most ``max_queue`` jobs wait at once; more are refused with :class:`BatcherBusy`.
    """

    def __init__(self, segmenter: Segmenter, max_batch: int = 8, max_wait_ms: float = 10.0,
                 max_queue: int = 64) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch={max_batch} and max_queue={max_queue} must be >= 1")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms={max_wait_ms} must be >= 0")
        self.segmenter = segmenter
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.max_queue = int(max_queue)
        self.stats = BatcherStats()
        self._pending: deque[_Entry] = deque()
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task | None = None
        self._wakeup: asyncio.Event | None = None
        self._closing = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start the worker thread and the collecting task on the running loop."""
        if self._task is not None:
            return
        self._closing = False
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._task = asyncio.get_running_loop().create_task(self._collect())

    async def close(self) -> None:
        """Stop taking jobs, finish every queued and running one, then stop the worker."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    @property
    def queued(self) -> int:
        """Jobs waiting for a batch."""
        return len(self._pending)

    # ------------------------------------------------------------------ submitting
    async def submit(self, job: SegmentJob) -> JobResult:
        """Queue ``job`` and wait for its own result (or its own exception).

        Raises:
            BatcherClosed: after :meth:`close`.
            BatcherBusy: ``max_queue`` jobs are already waiting (bounded memory under overload).
        """
        if self._closing or self._task is None or self._wakeup is None:
            raise BatcherClosed("the server is shutting down; retry on another instance")
        if len(self._pending) >= self.max_queue:
            raise BatcherBusy(f"the server is busy ({len(self._pending)} requests queued); "
                              "retry in a moment")
        loop = asyncio.get_running_loop()
        entry = _Entry(job, loop.create_future(), loop.time())
        self._pending.append(entry)
        self._wakeup.set()
        return await entry.future

    async def run_in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the inference thread (for example a warm-up pass)."""
        if self._executor is None:
            raise BatcherClosed("the batcher is not running")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ------------------------------------------------------------------ collecting
    async def _collect(self) -> None:
        assert self._wakeup is not None
        while True:
            while not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._wait_for_more()
            count = min(self.max_batch, len(self._pending))
            entries = [self._pending.popleft() for _ in range(count)]
            entries = [e for e in entries if not e.future.done()]  # client went away
            if entries:
                await self._dispatch(entries)

    async def _wait_for_more(self) -> None:
        """Wait until ``max_batch`` jobs are queued or the oldest has waited ``max_wait``."""
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        deadline = self._pending[0].enqueued + self.max_wait
        while len(self._pending) < self.max_batch and not self._closing:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return

    async def _dispatch(self, entries: list[_Entry]) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        jobs = [e.job for e in entries]
        try:
            outcomes = await loop.run_in_executor(self._executor, self._execute, jobs)
        except Exception as exc:  # the executor itself failed: every job gets the error
            outcomes = [exc] * len(entries)
        end = loop.time()
        self._count(len(entries), outcomes)
        for entry, outcome in zip(entries, outcomes, strict=True):
            if entry.future.done():
                continue
            if isinstance(outcome, BaseException):
                entry.future.set_exception(outcome)
            else:
                entry.future.set_result(JobResult(
                    prediction=outcome, queue_ms=(start - entry.enqueued) * 1000.0,
                    inference_ms=(end - start) * 1000.0, batch_size=len(entries)))

    def _count(self, size: int, outcomes: list[Prediction | BaseException]) -> None:
        stats = self.stats
        stats.batches += 1
        stats.jobs += size
        stats.failed += sum(isinstance(o, BaseException) for o in outcomes)
        stats.max_batch_size = max(stats.max_batch_size, size)
        stats.sizes[size] = stats.sizes.get(size, 0) + 1

    # ------------------------------------------------------------------ worker thread
    def _predict(self, jobs: list[SegmentJob]) -> list[Prediction]:
        return self.segmenter.predict_batch(
            [j.image for j in jobs], boxes=[j.boxes for j in jobs],
            labels=[j.labels for j in jobs], batch_size=len(jobs),
            score_threshold=[j.score_threshold for j in jobs])

    def _execute(self, jobs: list[SegmentJob]) -> list[Prediction | BaseException]:
        """Run a batch; on failure retry each job alone so only the bad one errors."""
        def note_retry(exc: Exception) -> None:
            self.stats.retried_batches += 1
            log.warning("batch of %d failed (%s: %s); retrying its jobs one by one",
                        len(jobs), type(exc).__name__, exc)

        return list(run_isolated(self._predict, jobs, on_retry=note_retry))
