"""One run per output: a lock file naming the run that writes it, and process liveness.

``sim predict`` / ``sim label`` take ``<output>.lock`` (``predict``: ``<folder>/.sim.lock``)
before any work and remove it when they end. A second run on the same output is refused with
one line naming the first (its pid, command and start time). A lock left by a run that was
killed (its pid gone, or reused by another process: the start time differs) is stale and
taken over. With ``--processes N`` the parent takes the lock; the processes it launches find
it held by their parent (:data:`LOCK_OWNER_ENV`) and go on.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from ..errors import InputError

#: Set by a run for the processes it launches: the pid that holds the output's lock.
LOCK_OWNER_ENV = "SIM_JOB_LOCK_OWNER"


def process_start(pid: int) -> str | None:
    """A token of when process ``pid`` started (Linux: field 22 of ``/proc/<pid>/stat``),
    ``None`` where unknown; tells a reused pid from the original."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int, started: str | None = None) -> bool:
    """Whether process ``pid`` runs (zombies count as gone); when ``started`` is given, also
    that it is the process that started then (not a reuse of its pid)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            return False
        return started is None or fields[19] == started
    except (OSError, IndexError):
        return True


def lock_path(command: str, output: str | os.PathLike) -> Path:
    """The lock of a run's output: ``<folder>/.sim.lock`` for ``predict`` (its output is a
    folder), ``<output>.lock`` otherwise."""
    out = Path(output)
    return out / ".sim.lock" if command == "predict" else out.with_name(out.name + ".lock")


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _holder_alive(info: dict[str, Any]) -> bool:
    pid = info.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool):
        return False
    if info.get("host") not in (None, socket.gethostname()):
        return True  # another machine's run (shared folder): cannot tell, respect it
    started = info.get("started_token")
    return pid_alive(pid, started if isinstance(started, str) else None)


class OutputLock:
    """The lock of one output (see the module docstring); a context manager."""

    def __init__(self, command: str, output: str | os.PathLike) -> None:
        self.output = Path(output)
        self.path = lock_path(command, output)
        self.command = command
        self.held = False

    def acquire(self) -> OutputLock:
        """Create the lock file, or refuse (:class:`InputError`) while its run is alive."""
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "started_token": process_start(os.getpid())}
        folder = self.path.parent
        if folder.exists() and not folder.is_dir():
            raise InputError(f"output {self.output}: {folder} is a file, not a folder: not "
                             "writable there; choose a folder path you can write to")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"output {self.output}: not writable ({exc.strerror or exc}); "
                             "choose a path you can write to") from None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                info = _read(self.path)
                if _holder_alive(info):
                    who = f"sim {info.get('command', '?')}, pid {info.get('pid')}"
                    raise InputError(
                        f"output {self.output}: in use by another run ({who}, started "
                        f"{info.get('started', '?')}); wait for it "
                        "to end or stop it, or choose another output (if that run is gone, "
                        f"delete {self.path})") from None
                self.path.unlink(missing_ok=True)  # stale: its run was killed
                continue
            except OSError as exc:
                raise InputError(f"output {self.output}: not writable "
                                 f"({exc.strerror or exc}); choose a path you can write to"
                                 ) from None
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(me, fh)
            self.held = True
            return self
        raise InputError(f"output lock {self.path}: could not be taken; delete it and rerun")

    def release(self) -> None:
        """Remove the lock file if this process still holds it."""
        if self.held and _read(self.path).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> OutputLock:
        return self if self.held else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
