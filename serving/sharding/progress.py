"""The record of finished work that lets ``predict`` and ``label`` resume, in one or many
processes.

Each process appends to its own JSON-lines log in the output folder (``<stem>.jsonl`` for
process 0, ``<stem>.<rank>.jsonl`` for the others), so processes never write the same file.
A log's first line is ``{"signature": ...}``: what produced the records (command, model,
inputs, options). Every further line is one of

- a result ``{"key", "fingerprint", "run", ...}``: one image finished;
- a failure ``{"key", "fingerprint", "run", "error"}``: the image could not be processed (it
  is retried by the next run);
- an end mark ``{"done": run, "rank": r}``: process ``r`` finished its share of run ``run``.

A record counts only while its ``fingerprint`` (a hash of what produced it: the image file's
size and modification time, its annotations) matches the input's current one, so an edited
image or annotation is redone and an unchanged one is skipped. Lines are appended with flush +
fsync; a line cut short by a crash is ignored when read back.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..files import UMASK, atomic_write


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable ``parts`` (dict keys sorted)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def file_stamp(path: str | os.PathLike) -> list[int]:
    """``[size, mtime_ns]`` of a file (``[-1, -1]`` when it cannot be read): part of the
    fingerprint of everything computed from it."""
    try:
        st = os.stat(path)
    except OSError:
        return [-1, -1]
    return [st.st_size, st.st_mtime_ns]


def log_path(folder: Path, stem: str, rank: int) -> Path:
    """The log of process ``rank``: ``<stem>.jsonl`` for rank 0, ``<stem>.<rank>.jsonl``."""
    return folder / (f"{stem}.jsonl" if rank == 0 else f"{stem}.{rank}.jsonl")


def log_paths(folder: Path, stem: str) -> list[Path]:
    """Every process's log of ``stem`` in ``folder``, rank 0 first."""
    found = [p for p in folder.glob(f"{stem}.*jsonl") if p.is_file()]
    rank0 = log_path(folder, stem, 0)
    return sorted(found, key=lambda p: (p != rank0, len(p.name), p.name))


def read_lines(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Complete JSON lines of ``path`` from byte ``offset``; returns them and the offset after
    the last complete line (a torn last line is left for a later read)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    entries = []
    for line in data[:end].splitlines():
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries, offset + end


def _differs(a: dict[str, Any], b: dict[str, Any]) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(keys) or "format"


@dataclass
class WorkRecords:
    """What the logs of a folder say: the valid result of each key, and this run's failures
    and end marks. Fed incrementally with :meth:`add`."""

    fingerprints: dict[str, str]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: dict[str, dict[str, Any]] = field(default_factory=dict)
    done_ranks: set[int] = field(default_factory=set)
    run: str | None = None

    def add(self, entry: dict[str, Any]) -> None:
        if "done" in entry:
            if entry["done"] == self.run:
                self.done_ranks.add(int(entry.get("rank", 0)))
            return
        if "key" not in entry:
            return  # the signature line
        key = str(entry["key"])
        if self.fingerprints.get(key) != entry.get("fingerprint"):
            return  # work on an input that has changed since, or is no longer an input
        if "error" in entry:
            if self.run is not None and entry.get("run") == self.run and key not in self.results:
                self.failures[key] = entry
        else:
            self.results[key] = entry
            self.failures.pop(key, None)

    def this_run(self) -> int:
        """Keys finished or failed by the current run."""
        done = sum(1 for r in self.results.values() if r.get("run") == self.run)
        return done + len(self.failures)


class ProgressLog:
    """One process's log (see the module docstring).

    ``signature``: JSON-serialisable description of what produces the records; a folder whose
    logs carry another signature is refused, so two different runs never mix.
    """

    def __init__(self, folder: str | os.PathLike, stem: str, signature: dict[str, Any],
                 rank: int = 0) -> None:
        self.folder = Path(folder)
        self.stem = stem
        self.rank = rank
        self.path = log_path(self.folder, stem, rank)
        self.signature = json.loads(json.dumps(signature))  # as it will read back

    def check(self) -> None:
        """Raise :class:`InputError` if any log of the folder has another signature."""
        for path in log_paths(self.folder, self.stem):
            entries, _ = read_lines(path)
            header = next((e["signature"] for e in entries if "signature" in e), None)
            if header is not None and header != self.signature:
                raise InputError(
                    f"output {self.folder}: holds work from a different run ({path.name} "
                    f"differs in {_differs(header, self.signature)}); pass --overwrite or "
                    "choose another output")

    def read_all(self, records: WorkRecords) -> None:
        """Feed every log of the folder into ``records``."""
        for path in log_paths(self.folder, self.stem):
            for entry in read_lines(path)[0]:
                records.add(entry)

    def open(self) -> None:
        """Make sure this process's log exists, holds the signature and ends with a newline
        (a torn last line from a crash is dropped)."""
        entries, end = read_lines(self.path)
        size = self.path.stat().st_size if self.path.exists() else 0
        if size and end == size and entries and "signature" in entries[0]:
            return
        body = [{"signature": self.signature}] + [e for e in entries if "signature" not in e]

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(e) + "\n" for e in body)
            os.chmod(tmp, 0o666 & ~UMASK)

        atomic_write(self.path, write)

    def append(self, entry: dict[str, Any]) -> None:
        """Durably add one line (a result, a failure or an end mark)."""
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def every_record(self) -> Iterator[dict[str, Any]]:
        """Results and failures of every log, whatever run wrote them (for ``--overwrite``)."""
        for path in log_paths(self.folder, self.stem):
            yield from (e for e in read_lines(path)[0] if "key" in e)

    def remove_all(self) -> None:
        """Delete every process's log of this folder (``--overwrite``)."""
        for path in log_paths(self.folder, self.stem):
            path.unlink(missing_ok=True)


class LogTail:
    """Reads what every process has appended to the folder's logs since the last call."""

    def __init__(self, log: ProgressLog, records: WorkRecords) -> None:
        self.log = log
        self.records = records
        self.offsets: dict[Path, int] = {}

    def poll(self) -> int:
        """Feed new complete lines into the records; returns how many were read."""
        count = 0
        for path in log_paths(self.log.folder, self.log.stem):
            entries, self.offsets[path] = read_lines(path, self.offsets.get(path, 0))
            for entry in entries:
                self.records.add(entry)
            count += len(entries)
        return count
