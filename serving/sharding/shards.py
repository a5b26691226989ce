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
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

#: Environment variables that launchers (torchrun, MPI) set for every process.
_WORLD_VARS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
#: Where process 0 of a job started by :func:`launch` leaves the job's exit code (the
#: launcher reports any non-zero exit as its own failure, so the code travels by file).
EXIT_CODE_ENV = "SIM_JOB_EXIT_CODE_FILE"
#: The pid of the ``sim`` process that launched a job: its processes stop when it is gone.
PARENT_PID_ENV = "SIM_JOB_PARENT_PID"
#: Seconds between a launched process's looks at whether its job's parent still runs.
WATCH_S = 1.0
#: Exit code of a process other than 0 whose writes failed (the launcher then stops the job).
EXIT_WRITE_FAILED = 74
#: Memory one process of a ``--processes N`` job takes, about (measured: 4 processes 6 GB).
PROCESS_BYTES = 3 << 29
#: Signals the parent of a launched job passes on to it (then exits by them).
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass(frozen=True)
class Shard:
    """This process's place in the job: ``rank`` of ``world`` processes, the run's id (the
    same in every process) and the device the launcher gave it (``None``: the user's).
    ``sync`` waits for every process (default: Accelerate's barrier when launched; tests that
    run shares side by side in threads give a ``threading.Barrier``'s ``wait``)."""

    rank: int = 0
    world: int = 1
    run: str = ""
    device: str | None = None
    sync: Callable[[], object] | None = None

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
    watch_parent()
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
    if shard.sync is not None:
        shard.sync()
    elif shard.world > 1 and launched_world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def _die_with_parent() -> None:
    """In the launcher's child, before it runs: SIGTERM when the parent dies, even by SIGKILL
    (Linux ``prctl(PR_SET_PDEATHSIG)``; a no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def watch_parent(interval: float = WATCH_S) -> threading.Thread | None:
    """In a process of a :func:`launch`-ed job: a daemon thread that ends this process
    (SIGTERM to itself, then exit 143) once the job's ``sim`` parent is gone or this process
    was orphaned, so a killed job never leaves workers running. ``None`` outside such jobs."""
    from .lock import pid_alive, process_start

    text = os.environ.get(PARENT_PID_ENV, "")
    if not text.isdigit():
        return None
    parent, started, ppid = int(text), process_start(int(text)), os.getppid()

    def watch() -> None:
        while pid_alive(parent, started) and os.getppid() == ppid:
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5.0)
        os._exit(143)

    thread = threading.Thread(target=watch, name="sim-parent-watch", daemon=True)
    thread.start()
    return thread


def _launcher_env(code_file: str, gpus: int) -> dict[str, str]:
    from .lock import LOCK_OWNER_ENV

    env = {**os.environ, EXIT_CODE_ENV: code_file, PARENT_PID_ENV: str(os.getpid()),
           LOCK_OWNER_ENV: str(os.getpid())}
    if not gpus:
        env.setdefault("OMP_NUM_THREADS", "1")  # processes share the cores
    return env


def _run_forwarding(cmd: list[str], env: dict[str, str]) -> tuple[int, int | None]:
    """Run the launcher in its own session, passing SIGINT/SIGTERM/SIGHUP on to it (it stops
    its processes), and SIGTERM if this process dies; returns (its status, the first signal
    received or None)."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                            preexec_fn=_die_with_parent)  # noqa: PLW1509
    received: list[int] = []

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    main_thread = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, forward) for s in FORWARDED} if main_thread else {}
    try:
        status = proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return status, (received[0] if received else None)


def launch(command: str, argv: Sequence[str], processes: int) -> int:
    """Run ``sim <command> argv`` in ``processes`` processes through ``accelerate launch``
    (torchrun: one process per GPU, or gloo processes on a machine without GPUs) and return
    the job's exit code (that of process 0, which merges the outputs).

    A signal to this process (SIGINT, SIGTERM, SIGHUP) stops every process of the job (their
    progress is kept, so a rerun resumes), and so does this process's death by SIGKILL (the
    launcher gets SIGTERM; each process also watches this one, :func:`watch_parent`)."""
    import torch

    from ..errors import InputError

    gpus = torch.cuda.device_count()
    if gpus and processes > gpus:
        raise InputError(f"--processes {processes}: this machine has {gpus} GPUs; use at most "
                         "one process per GPU")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes",
                str(processes), "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", "0", "--multi_gpu"]
    fd, code_file = tempfile.mkstemp(prefix="sim-exit-", suffix=".txt")
    os.close(fd)
    try:
        status, signum = _run_forwarding([*launcher, "-m", "serving", command, *argv],
                                         _launcher_env(code_file, gpus))
        text = open(code_file, encoding="utf-8").read().strip()
    finally:
        os.unlink(code_file)
    if signum is not None:
        print(f"{command}: stopped by signal {signal.Signals(signum).name}; every process "
              "ended; rerun the same command to continue", file=sys.stderr)
        return 130 if signum == signal.SIGINT else 128 + int(signum)
    return int(text) if text.isdigit() else (status or 1)


def exit_code(code: int, shard: Shard) -> int:
    """The exit code a process of a :func:`launch`-ed job returns: process 0 writes the job's
    code where the parent reads it and exits 0 (so the launcher does not report it as a
    crash); other processes exit 0 unless interrupted. Outside a launched job: ``code``."""
    path = os.environ.get(EXIT_CODE_ENV)
    if not path or shard.world <= 1:
        return code
    if shard.is_main:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(str(code))
        return 0
    return code if code in (130, EXIT_WRITE_FAILED) else 0


def run_sharded(command: str, argv: Sequence[str], processes: int, device: str,
                body: Callable[[Shard], int]) -> int:
    """A batch command's entry: with ``--processes N`` (N > 1) relaunch it in N processes;
    otherwise run ``body(shard)`` for this process and return its exit code (see
    :func:`exit_code`)."""
    if processes > 1 and launched_world_size() <= 1:
        return launch(command, argv, processes)
    shard = current_shard(device)
    try:
        return exit_code(body(shard), shard)
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Close the process group of a launched job before the interpreter exits (left to the
    exit, its destructor may abort with ``terminate called without an active exception``)."""
    if launched_world_size() <= 1:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def available_memory() -> int | None:
    """Bytes of memory available for new processes (Linux ``MemAvailable``), else ``None``."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_processes(processes: int) -> None:
    """``--processes N`` against the machine: at least 1, and N processes of about
    :data:`PROCESS_BYTES` each must fit in the available memory (:class:`InputError`)."""
    from ..errors import InputError

    if processes < 1:
        raise InputError(f"--processes {processes}: must be at least 1")
    free = available_memory()
    if processes > 1 and free is not None and processes * PROCESS_BYTES > free:
        most = max(1, free // PROCESS_BYTES)
        raise InputError(f"--processes {processes}: each process needs about "
                         f"{PROCESS_BYTES / 2**30:.1f} GB and {free / 2**30:.1f} GB are "
                         f"available; use --processes {most} or fewer")


def _lock(command: str, args: Any) -> Any:
    """The output's :class:`~serving.sharding.lock.OutputLock`, taken here unless a parent that
    launched this process holds it (or this is not process 0 of a launched job)."""
    from contextlib import nullcontext

    from .lock import LOCK_OWNER_ENV, OutputLock

    if os.environ.get(LOCK_OWNER_ENV) or os.environ.get("RANK", "0") != "0":
        return nullcontext()
    return OutputLock(command, args.output).acquire()


def batch_command(command: str, argv: Sequence[str] | None, parser: Any,
                  run: Callable[[Any, Shard], Any], show: Callable[[Any], None]) -> int:
    """The entry of ``sim predict`` / ``sim label``: parse ``argv``, take the output's lock,
    relaunch in several processes for ``--processes N``, run ``run(args, shard)`` (a summary
    with ``exit_code``, ``interrupted`` and ``merged``) and let process 0 ``show`` it. Bad
    input before any work is one ``error:`` line from process 0 (exit 1); Ctrl-C before the
    first image exits 130."""
    from ..errors import SimError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)

    def body(shard: Shard) -> int:
        try:
            summary = run(args, shard)
        except SimError as exc:
            if shard.is_main:  # the same pre-work error in every process: say it once
                print(f"error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # before the first image (while loading the model, ...)
            if shard.is_main:
                print("interrupted before any image was finished", file=sys.stderr)
            return 130
        except OSError as exc:  # a write failed: disk full, folder removed, permissions
            where = f" {exc.filename}" if exc.filename else ""
            print(f"error: writing{where} failed ({exc.strerror or exc}); free space or fix "
                  "the output folder, then rerun the same command: finished images are kept "
                  "and skipped", file=sys.stderr)
            return 1 if shard.is_main else EXIT_WRITE_FAILED  # the launcher stops the job
        if summary.merged and not summary.interrupted:
            show(summary)
        return int(summary.exit_code)

    try:
        if launched_world_size() <= 1:
            check_processes(args.processes)
        lock = _lock(command, args)
    except SimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    with lock:
        return run_sharded(command, argv, args.processes, args.device, body)
