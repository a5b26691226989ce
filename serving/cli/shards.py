"""Splitting ``predict`` / ``label`` between processes started by ``accelerate launch``.

``accelerate launch --num_processes N -m serving label ...`` (``--multi_gpu`` on a machine
without GPUs, which starts the processes through torchrun) runs N copies of the command. Each
learns its rank from Accelerate's :class:`~accelerate.PartialState` (which also gives it its
own GPU), takes every N-th image of the work left (:func:`take_share`), and writes its own
progress log; process 0 then waits for every process's end mark and merges the logs into the
outputs a single process writes. Accelerate is imported only when several processes run.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

#: Environment variables that launchers (torchrun, MPI) set for every process.
_WORLD_VARS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


@dataclass(frozen=True)
class Shard:
    """This process's place in the job: ``rank`` of ``world`` processes, the run's id (the
    same in every process) and the device the launcher gave it (``None``: the user's)."""

    rank: int = 0
    world: int = 1
    run: str = ""
    device: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    """How many processes the launcher started (1 when run directly)."""
    for name in _WORLD_VARS:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


def multi_process_cpu() -> bool:
    """True when several processes were launched on a machine without an accelerator: then
    the process group must be formed on the CPU (gloo), which Accelerate does only when
    told (``cpu=True``)."""
    import torch

    has_accelerator = getattr(torch, "accelerator", None)
    available = has_accelerator.is_available() if has_accelerator else torch.cuda.is_available()
    return launched_world_size() > 1 and not available


def current_shard(device: str = "auto") -> Shard:
    """This process's :class:`Shard`: one process unless a launcher started several.

    With several processes, the run id is made by process 0 and broadcast, and ``device``
    ``"auto"`` becomes the process's own device (``cuda:<local rank>`` on a GPU machine).
    """
    if launched_world_size() <= 1:
        return Shard(run=uuid.uuid4().hex)
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState(cpu=multi_process_cpu())
    token = [uuid.uuid4().hex if state.is_main_process else None]
    broadcast_object_list(token, from_process=0)
    own = str(state.device) if device == "auto" else None
    return Shard(state.process_index, state.num_processes, str(token[0]), own)


def take_share(items: Sequence[T], shard: Shard) -> list[T]:
    """Every ``world``-th item starting at ``rank``: interleaved shares, so images of one
    folder (often similar in size) are spread over all processes."""
    return list(items[shard.rank::shard.world])


def barrier(shard: Shard) -> None:
    """Wait until every process reaches this point (no-op in one process)."""
    if shard.world > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()
