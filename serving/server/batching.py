"""Dynamic batching for the HTTP server: concurrent requests share one forward pass.

Requests are validated (image decoded, boxes checked) *before* they reach the batcher, so a
batch only ever holds well-formed jobs. The batcher groups queued jobs into one
:meth:`serving.Segmenter.predict_batch` call of up to ``max_batch`` images (and a bounded
total cost), waiting at most ``max_wait_ms`` after the oldest queued job arrived. Large jobs
take a second lane and run alone, so they never hold up small ones. Inference runs in
dedicated worker threads, one per lane (the event loop never blocks). If a batch raises, its
jobs are retried one by one so only the job that fails gets the error.

Pure asyncio + numpy: no web framework is imported here.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..isolation import run_isolated
from ..prediction import Prediction
from ..prompts import Prompt
from ..segmenter import Segmenter

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
        prompt: the checked prompt (``Segmenter.check_prompt``) for this image; ``None`` =
            automatic mode.
        score_threshold: automatic mode: drop instances scoring below it (``None``: keep
            every instance; the request's choice is resolved by ``Segmenter.score_cut``).
        cost: what the job's masks may cover, in pixels (see ``requests.mask_pixels``):
            bounds its memory, and decides its batch and lane.
    """

    image: np.ndarray
    prompt: Prompt | None = None
    score_threshold: float | None = None
    cost: int = 0  # mask pixels: summed prompt-box areas (automatic mode: image pixels)


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
    large_jobs: int = 0
    retried_batches: int = 0
    max_batch_size: int = 0
    sizes: dict[int, int] = field(default_factory=dict)


#: Backends whose ``Segmenter`` may run in two threads at once (TensorRT contexts may not).
CONCURRENT_BACKENDS = frozenset({"torch", "onnxruntime"})


@dataclass
class _Lane:
    """A queue of jobs and the thread that runs its batches."""

    name: str
    max_batch: int
    pending: deque[_Entry] = field(default_factory=deque)
    wakeup: asyncio.Event | None = None
    executor: ThreadPoolExecutor | None = None
    task: asyncio.Task | None = None


class DynamicBatcher:
    """Queue :class:`SegmentJob` s and run them in batches on worker threads.

    Use from a running event loop: ``await start()``, ``await submit(job)``, ``await close()``.
    At most ``max_queue`` jobs wait at once; more are refused with :class:`BatcherBusy`.

    Cost-aware: a batch holds at most ``max_batch`` jobs and (beyond its first job) at most
    ``max_batch_cost`` of summed :attr:`SegmentJob.cost`. Jobs costing more than
    ``large_cost`` or with more than ``large_boxes`` prompt boxes go to a second lane with
    its own thread and run alone, one at a time, so a small request submitted after a large
    one is answered without waiting for it (the lanes run the model at the same time when
    its backend is in :data:`CONCURRENT_BACKENDS`, else they take turns, batch by batch).
    """

    def __init__(self, segmenter: Segmenter, max_batch: int = 8, max_wait_ms: float = 10.0,
                 max_queue: int = 64, max_batch_cost: int | None = None,
                 large_cost: int | None = None, large_boxes: int | None = None,
                 concurrent: bool | None = None) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch={max_batch} and max_queue={max_queue} must be >= 1")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms={max_wait_ms} must be >= 0")
        self.segmenter = segmenter
        self.max_batch = int(max_batch)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.max_queue = int(max_queue)
        self.max_batch_cost = max_batch_cost
        self.large_cost = large_cost
        self.large_boxes = large_boxes
        if concurrent is None:
            backend = getattr(segmenter, "backend", None)
            concurrent = backend is None or getattr(backend, "name", "") in CONCURRENT_BACKENDS
        self._model_lock = None if concurrent else threading.Lock()
        self.stats = BatcherStats()
        self._small = _Lane("small", self.max_batch)
        self._large = _Lane("large", 1)
        self._lanes = (self._small, self._large)
        self._closing = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start the worker threads and the collecting tasks on the running loop."""
        if self._small.task is not None:
            return
        self._closing = False
        loop = asyncio.get_running_loop()
        for lane in self._lanes:
            lane.wakeup = asyncio.Event()
            lane.executor = ThreadPoolExecutor(max_workers=1,
                                               thread_name_prefix=f"inference-{lane.name}")
            lane.task = loop.create_task(self._collect(lane))

    async def close(self) -> None:
        """Stop taking jobs, finish every queued and running one, then stop the workers."""
        self._closing = True
        for lane in self._lanes:
            if lane.wakeup is not None:
                lane.wakeup.set()
        for lane in self._lanes:
            if lane.task is not None:
                await lane.task
                lane.task = None
            if lane.executor is not None:
                lane.executor.shutdown(wait=True)
                lane.executor = None

    @property
    def queued(self) -> int:
        """Jobs waiting for a batch (both lanes)."""
        return len(self._small.pending) + len(self._large.pending)

    def is_large(self, job: SegmentJob) -> bool:
        """Whether ``job`` runs alone in the large lane (see the class docstring)."""
        boxes = 0 if job.prompt is None else len(job.prompt)
        return ((self.large_cost is not None and job.cost > self.large_cost)
                or (self.large_boxes is not None and boxes > self.large_boxes))

    # ------------------------------------------------------------------ submitting
    async def submit(self, job: SegmentJob) -> JobResult:
        """Queue ``job`` and wait for its own result (or its own exception).

        Raises:
            BatcherClosed: after :meth:`close`.
            BatcherBusy: ``max_queue`` jobs are already waiting (bounded memory under overload).
        """
        lane = self._large if self.is_large(job) else self._small
        if self._closing or lane.task is None or lane.wakeup is None:
            raise BatcherClosed("the server is shutting down; retry on another instance")
        if self.queued >= self.max_queue:
            raise BatcherBusy(f"the server is busy ({self.queued} requests queued); "
                              "retry in a moment")
        loop = asyncio.get_running_loop()
        entry = _Entry(job, loop.create_future(), loop.time())
        lane.pending.append(entry)
        lane.wakeup.set()
        return await entry.future

    async def run_in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the (small lane's) inference thread, e.g. a warm-up pass."""
        if self._small.executor is None:
            raise BatcherClosed("the batcher is not running")
        return await asyncio.get_running_loop().run_in_executor(self._small.executor, fn, *args)

    # ------------------------------------------------------------------ collecting
    def _take(self, lane: _Lane) -> list[_Entry]:
        """Cut the next batch from the front of ``lane``: at most its ``max_batch`` jobs and,
        beyond the first, at most ``max_batch_cost`` in total."""
        entries = [lane.pending.popleft()]
        total = entries[0].job.cost
        while lane.pending and len(entries) < lane.max_batch:
            cost = lane.pending[0].job.cost
            if self.max_batch_cost is not None and total + cost > self.max_batch_cost:
                break
            entries.append(lane.pending.popleft())
            total += cost
        return [e for e in entries if not e.future.done()]  # client went away

    async def _collect(self, lane: _Lane) -> None:
        assert lane.wakeup is not None
        while True:
            while not lane.pending:
                if self._closing:
                    return
                lane.wakeup.clear()
                await lane.wakeup.wait()
            await self._wait_for_more(lane)
            entries = self._take(lane)
            if entries:
                await self._dispatch(lane, entries)

    async def _wait_for_more(self, lane: _Lane) -> None:
        """Wait until ``max_batch`` jobs are queued or the oldest has waited ``max_wait``."""
        assert lane.wakeup is not None
        loop = asyncio.get_running_loop()
        deadline = lane.pending[0].enqueued + self.max_wait
        while len(lane.pending) < lane.max_batch and not self._closing:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            lane.wakeup.clear()
            try:
                await asyncio.wait_for(lane.wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return

    async def _dispatch(self, lane: _Lane, entries: list[_Entry]) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        jobs = [e.job for e in entries]
        try:
            outcomes = await loop.run_in_executor(lane.executor, self._run, jobs)
        except Exception as exc:  # the executor itself failed: every job gets the error
            outcomes = [exc] * len(entries)
        end = loop.time()
        self._count(len(entries), outcomes, lane is self._large)
        for entry, outcome in zip(entries, outcomes, strict=True):
            if entry.future.done():
                continue
            if isinstance(outcome, BaseException):
                entry.future.set_exception(outcome)
            else:
                entry.future.set_result(JobResult(
                    prediction=outcome, queue_ms=(start - entry.enqueued) * 1000.0,
                    inference_ms=(end - start) * 1000.0, batch_size=len(entries)))

    def _count(self, size: int, outcomes: list[Prediction | BaseException],
               large: bool = False) -> None:
        stats = self.stats
        stats.batches += 1
        stats.jobs += size
        stats.large_jobs += size if large else 0
        stats.failed += sum(isinstance(o, BaseException) for o in outcomes)
        stats.max_batch_size = max(stats.max_batch_size, size)
        stats.sizes[size] = stats.sizes.get(size, 0) + 1

    def _run(self, jobs: list[SegmentJob]) -> list[Prediction | BaseException]:
        """:meth:`_execute` on a lane's thread, taking turns on the model when it must."""
        if self._model_lock is None:
            return self._execute(jobs)
        with self._model_lock:
            return self._execute(jobs)

    # ------------------------------------------------------------------ worker thread
    def _predict(self, jobs: list[SegmentJob]) -> list[Prediction]:
        return self.segmenter.predict_batch(
            [j.image for j in jobs], boxes=[j.prompt for j in jobs], batch_size=len(jobs),
            score_threshold=[j.score_threshold for j in jobs])

    def _execute(self, jobs: list[SegmentJob]) -> list[Prediction | BaseException]:
        """Run a batch; on failure retry each job alone so only the bad one errors."""
        def note_retry(exc: Exception) -> None:
            self.stats.retried_batches += 1
            log.warning("batch of %d failed (%s: %s); retrying its jobs one by one",
                        len(jobs), type(exc).__name__, exc)

        return list(run_isolated(self._predict, jobs, on_retry=note_retry))
