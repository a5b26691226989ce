"""Running a batch command's jobs in one or many processes, resumably.

:class:`JobRunner` owns the progress logs and the progress bar of a ``predict`` / ``label``
run: it works out what is left to do from every process's log, hands this process its share
(:func:`serving.sharding.shards.take_share`), appends a record per finished image, and on
process 0 waits for every process's end mark while showing one bar for the whole job. The
commands merge the records into their outputs. A job is anything with a ``key`` and a
``fingerprint`` (:class:`WorkItem`; the commands' is :class:`serving.cli.jobs.Job`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from .progress import LogTail, ProgressLog, WorkRecords
from .shards import Shard, barrier, take_share


class WorkItem(Protocol):
    """What the runner needs of a job: a ``key`` unique in the run, and a ``fingerprint`` of
    what its result depends on (:mod:`.progress`)."""

    @property
    def key(self) -> str: ...

    @property
    def fingerprint(self) -> str: ...


Job = TypeVar("Job", bound=WorkItem)

#: Seconds between process 0's looks at the other processes' logs while it waits for them.
POLL_S = 0.5


@dataclass
class RunPlan(Generic[Job]):
    """What a command asks the runner to do.

    ``jobs``: every image of the input, in output order. ``is_done(job, record)``: whether a
    valid record finishes the job (``predict`` also wants its pictures to exist).
    """

    folder: Path
    stem: str
    signature: dict[str, Any]
    jobs: list[Job]
    is_done: Callable[[Job, dict[str, Any]], bool] = lambda job, record: True


class JobRunner(Generic[Job]):
    """See the module docstring. Use :meth:`start`, then :meth:`record` per outcome, then
    :meth:`finish` (or :meth:`close` after an interruption)."""

    def __init__(self, plan: RunPlan[Job], shard: Shard, progress: bool = True,
                 desc: str = "images") -> None:
        self.plan = plan
        self.shard = shard
        self.log = ProgressLog(plan.folder, plan.stem, plan.signature, shard.rank)
        self.records = WorkRecords({job.key: job.fingerprint for job in plan.jobs},
                                   run=shard.run)
        self.tail = LogTail(self.log, self.records)
        self.show = progress and shard.is_main
        self.desc = desc
        self.done_before = 0
        self.bar: Any = None

    def clear(self, remove_outputs: Callable[[ProgressLog], None]) -> None:
        """``--overwrite``: process 0 removes what an earlier run wrote (``remove_outputs``
        gets the log to find it), then every process goes on."""
        if self.shard.is_main:
            remove_outputs(self.log)
            self.log.remove_all()
        barrier(self.shard)

    def start(self) -> list[Job]:
        """Read every log, and return this process's share of the jobs left to do.

        Raises :class:`~serving.errors.InputError` if the folder holds another run's work.
        """
        self.log.check()
        self.tail.poll()
        todo = [job for job in self.plan.jobs if not self._finished(job)]
        self.done_before = len(self.plan.jobs) - len(todo)
        barrier(self.shard)  # nobody appends before every process has read the logs
        self.log.open()
        if self.show:
            from tqdm import tqdm

            self.bar = tqdm(total=len(self.plan.jobs), initial=self.done_before, unit="img",
                            desc=self.desc, file=sys.stderr, dynamic_ncols=True)
        return take_share(todo, self.shard)

    def _finished(self, job: Job) -> bool:
        record = self.records.results.get(job.key)
        return record is not None and self.plan.is_done(job, record)

    def record(self, job: Job, entry: dict[str, Any]) -> None:
        """Durably note that ``job`` finished (``entry`` holds its result) or failed (an
        ``"error"`` key); process 0 also takes in what the others appended."""
        self.log.append({"key": job.key, "fingerprint": job.fingerprint,
                         "run": self.shard.run, **entry})
        if self.shard.is_main:
            self.tail.poll()
            self._show()

    def _show(self) -> None:
        if self.bar is not None:
            self.bar.n = self.done_before + self.records.this_run()
            self.bar.refresh()

    def finish(self) -> WorkRecords:
        """Mark this process's share done; process 0 waits for every process's mark and
        returns the records of the whole job (other processes return what they read at the
        start: they write no outputs)."""
        self.log.append({"done": self.shard.run, "rank": self.shard.rank})
        if self.shard.is_main:
            while True:
                self.tail.poll()
                self._show()
                if len(self.records.done_ranks) >= self.shard.world:
                    break
                time.sleep(POLL_S)
        self.close()
        return self.records

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
