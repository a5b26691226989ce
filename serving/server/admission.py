"""The server's memory budget: requests are admitted by the bytes they may hold, not by count.

Every ``POST /v1/segment`` holds a *lease* on one :class:`MemoryBudget` from the first byte of
its body to its answer: the body's bytes as they arrive, then, once the image header is read
(nothing decoded yet), :func:`request_bytes` for the decoding, the network's input, the masks
and the answer. Decoding, preprocessing and inference therefore all count against the same
limit, so the bytes of all requests in flight never exceed the budget, whatever the number of
clients. A request that does not fit waits in line (first come, first served) for at most
``wait_s`` seconds; when the line is full or the wait runs out it gets 503 with
``Retry-After``. A request that alone needs more than the whole budget gets 413 naming the
budget (``sim serve --memory-budget-mb``).

Pure asyncio (one event loop): no locks, no web framework.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass

#: Peak bytes per image pixel of decoding and preprocessing one request, by the file's
#: Pillow mode (known from its header): 8-bit images (Pillow's 4-byte pixels, an EXIF
#: rotation's copy, the RGB conversion, the uint8 array, one float channel of the resize);
#: with alpha (composited on black: three more 4-byte copies); 16/32-bit (float64 rescaling).
IMAGE_BYTES_PER_PIXEL = 20
ALPHA_BYTES_PER_PIXEL = 32
WIDE_BYTES_PER_PIXEL = 44
_WIDE_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "P", "RGBa", "La"})
#: Bytes held per body byte: the chunks, their join, and the decoded image file (multipart
#: part or base64).
BODY_COPIES = 3
#: Peak bytes per pixel one mask may cover: its boolean crop and the tightened copy made while
#: the crops are collected (measured: 20 image-sized masks of a 4000x4000 image peak at 43
#: bytes per image pixel in all, the image's 3 and decoding's 18 included).
MASK_BYTES_PER_PIXEL = 2
#: Resident memory allowed for above the start-up figure: the warm-up pass, threads,
#: connections and the allocator's bookkeeping.
RUNTIME_HEADROOM = 256 << 20
#: Allocations above this many bytes get their own pages, returned to the system when freed
#: (:func:`return_freed_memory`), so the resident size follows the bytes in use.
MMAP_THRESHOLD = 4 << 20
#: Default ``--memory-budget-mb``.
DEFAULT_MEMORY_BUDGET_MB = 4096
#: Seconds a request may wait for room before it is answered 503 (default).
DEFAULT_ADMISSION_WAIT_S = 30.0


class BudgetBusy(RuntimeError):
    """No room in the budget now (or within the wait): answer 503 with ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class OverBudget(ValueError):
    """One request needs more than the whole budget: it can never be admitted (413)."""


def decode_bytes_per_pixel(mode: str) -> int:
    """Peak bytes per pixel of decoding an image of Pillow ``mode`` into RGB uint8."""
    if mode in _WIDE_MODES:
        return WIDE_BYTES_PER_PIXEL
    return ALPHA_BYTES_PER_PIXEL if mode in _ALPHA_MODES else IMAGE_BYTES_PER_PIXEL


def request_bytes(image_pixels: int, mask_pixels: int, mode: str = "RGB") -> int:
    """The bytes one request may hold at its peak (its body not included).

    Args:
        image_pixels: width x height of the image.
        mode: the image file's Pillow mode (see :func:`decode_bytes_per_pixel`).
        mask_pixels: the pixels its masks may cover, summed over masks: prompted, the clipped
            box areas (:func:`serving.server.limits.mask_pixels`); automatic, the image times
            the model's ``max_detections`` (every kept detection could span the image).
    """
    return (int(image_pixels) * decode_bytes_per_pixel(mode)
            + int(mask_pixels) * MASK_BYTES_PER_PIXEL)


def megabytes(n: int) -> str:
    """``n`` bytes as whole MB (2**20) for messages."""
    return f"{math.ceil(n / (1 << 20))} MB"


@dataclass
class _Waiter:
    need: int
    future: asyncio.Future


class MemoryBudget:
    """Bytes in flight, at most ``capacity`` (see the module docstring).

    ``max_waiting`` requests may wait for room at once (more: 503 at once); each waits at most
    ``wait_s`` seconds. ``in_use`` and ``peak`` are bytes; ``refused`` counts 503s.
    """

    def __init__(self, capacity: int, max_waiting: int = 64,
                 wait_s: float = DEFAULT_ADMISSION_WAIT_S) -> None:
        if capacity < 1 or max_waiting < 0 or not wait_s >= 0:
            raise ValueError(f"capacity={capacity} must be >= 1, max_waiting={max_waiting} "
                             f">= 0 and wait_s={wait_s} >= 0")
        self.capacity = int(capacity)
        self.max_waiting = int(max_waiting)
        self.wait_s = float(wait_s)
        self.in_use = 0
        self.peak = 0
        self.refused = 0
        self._waiters: deque[_Waiter] = deque()

    @property
    def waiting(self) -> int:
        """Requests waiting for room."""
        return len(self._waiters)

    def _grant(self, n: int) -> None:
        self.in_use += n
        self.peak = max(self.peak, self.in_use)

    def _busy(self, why: str) -> BudgetBusy:
        self.refused += 1
        retry = max(1, min(60, math.ceil(self.wait_s / 4) or 1))
        return BudgetBusy(f"the server is busy: {why} (memory budget {megabytes(self.capacity)}"
                          f", {megabytes(self.in_use)} in use); retry in {retry} s", retry)

    def try_take(self, n: int) -> None:
        """Take ``n`` bytes now or raise :class:`BudgetBusy` (no waiting: request bodies)."""
        if self.in_use + n > self.capacity:
            raise self._busy("no room for the request body")
        self._grant(n)

    async def take(self, n: int) -> None:
        """Take ``n`` bytes, waiting in line up to ``wait_s``.

        Raises:
            OverBudget: ``n`` alone is more than the capacity.
            BudgetBusy: the line is full, or no room came within ``wait_s``.
        """
        if n > self.capacity:
            raise OverBudget(f"needs {megabytes(n)}, more than this server's whole memory "
                             f"budget of {megabytes(self.capacity)}")
        if not self._waiters and self.in_use + n <= self.capacity:
            self._grant(n)
            return
        if len(self._waiters) >= self.max_waiting:
            raise self._busy(f"{len(self._waiters)} requests are waiting for memory")
        waiter = _Waiter(n, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), self.wait_s)
        except asyncio.TimeoutError:
            if waiter.future.done():  # granted just as the wait ran out: keep it
                return
            self._waiters.remove(waiter)
            self._wake()
            raise self._busy(f"no memory came free within {self.wait_s:g} s") from None
        except BaseException:  # cancelled (client gone): give back what was granted
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            elif waiter.future.done() and not waiter.future.cancelled():
                self.give(n)
            self._wake()
            raise

    def give(self, n: int) -> None:
        """Return ``n`` bytes and admit the waiters that now fit, in order."""
        self.in_use -= n
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_use + self._waiters[0].need <= self.capacity:
            waiter = self._waiters.popleft()
            self._grant(waiter.need)
            waiter.future.set_result(None)

    def lease(self) -> Lease:
        """A :class:`Lease` of this budget for one request."""
        return Lease(self)


class Lease:
    """The bytes one request holds; :meth:`release` gives them all back (call it once, in a
    ``finally``)."""

    def __init__(self, budget: MemoryBudget) -> None:
        self.budget = budget
        self.held = 0

    def take_now(self, n: int) -> None:
        """:meth:`MemoryBudget.try_take` on behalf of this request."""
        self.budget.try_take(n)
        self.held += n

    async def grow_to(self, total: int) -> None:
        """Hold ``total`` bytes in all (waiting for the difference); never shrinks."""
        extra = total - self.held
        if extra > 0:
            await self.budget.take(extra)
            self.held += extra

    def release(self) -> None:
        if self.held:
            self.budget.give(self.held)
            self.held = 0


def resident_bytes() -> int:
    """This process's resident memory now (Linux ``/proc``; peak RSS elsewhere), in bytes."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            import os

            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)


def return_freed_memory(threshold: int = MMAP_THRESHOLD) -> bool:
    """Ask glibc's allocator to serve blocks above ``threshold`` bytes from their own pages
    (``mallopt(M_MMAP_THRESHOLD)``): freed, they go back to the system at once instead of
    staying in the arena of the thread that freed them (decoding, inference and the answer run
    on different threads). Returns whether it took effect (False off glibc)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def budget_statement(capacity: int, resident: int, max_detections: int,
                     workers: int = 1) -> str:
    """What ``sim serve`` states at start-up: the budget, the memory the process holds before
    any request (plus :data:`RUNTIME_HEADROOM`), their sum, and the largest 8-bit image one
    automatic request may send."""
    auto_px = capacity // (IMAGE_BYTES_PER_PIXEL + MASK_BYTES_PER_PIXEL * max_detections)
    prompt_px = capacity // (IMAGE_BYTES_PER_PIXEL + MASK_BYTES_PER_PIXEL)
    each = " in each worker process" if workers > 1 else ""
    base = resident + RUNTIME_HEADROOM
    return (f"memory budget{each}: requests in flight hold at most {megabytes(capacity)} "
            f"together (--memory-budget-mb), on top of the {megabytes(resident)} the model and "
            f"runtime hold now (+{megabytes(RUNTIME_HEADROOM)} for the warm-up, threads and "
            f"connections): at most about {megabytes(capacity + base)} resident; "
            f"largest request: {auto_px / 1e6:.1f} megapixels in automatic mode (up to "
            f"{max_detections} masks), {prompt_px / 1e6:.1f} with one image-sized prompt box; "
            "requests over the free budget wait, then get 503 with Retry-After")
