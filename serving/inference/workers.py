"""A process-wide thread pool for the numpy work after the network.

numpy releases the interpreter lock in its array loops, so independent pieces of one image's
post-processing (chunks of masks, :func:`serving.inference.paste.mask_crops`) can run side by
side on the cores the network used. The pools are shared by every caller (the server's lanes
included), made under a lock, dropped in a forked child (whose copy has none of the threads),
and a call from inside a pool's thread runs its work there (waiting on the same pool could
deadlock).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

#: The most threads one piece of post-processing uses.
MAX_THREADS = 4
_PREFIX = "sim-post"
_POOLS: dict[int, ThreadPoolExecutor] = {}
_LOCK = threading.Lock()
os.register_at_fork(after_in_child=_POOLS.clear)


def budget() -> int:
    """Threads for one piece of post-processing: ``torch.get_num_threads()`` (the process's
    setting for the network), at most ``MAX_THREADS``; 1 inside a pool's own thread."""
    if threading.current_thread().name.startswith(_PREFIX):
        return 1
    return max(1, min(torch.get_num_threads(), MAX_THREADS))


def pool(workers: int) -> ThreadPoolExecutor:
    """The process-wide pool of ``workers`` threads."""
    with _LOCK:
        if workers not in _POOLS:
            _POOLS[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=_PREFIX)
        return _POOLS[workers]
