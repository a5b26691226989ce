"""Writing files safely: atomic replacement (temp file + rename), JSON with the permissions a
plain ``open()`` would give, and checking an output folder or file is writable before any work."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import InputError


def atomic_write(path: str | os.PathLike, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename the temp file onto ``path`` (same folder), with the
    permissions a plain ``open()`` would give (0644 under umask 022; the temp file alone would
    be private, 0600, and a server running as another user could not read it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: The process's file-creation mask, read once at import (reading it means setting it, which
#: must not happen while other threads create files).
UMASK = _read_umask()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (:func:`atomic_write`)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh)

    atomic_write(path, write)


def check_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and prove a file can be written in it (before any work)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out}: exists and is not a folder; choose a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(
            f"output {out}: not writable ({exc.strerror or exc}); choose a folder you can write to"
        ) from None
    return out


def check_writable_file(path: str | os.PathLike) -> Path:
    """Check that ``path`` can be (re)written: not a folder, and its folder is writable."""
    out = Path(path)
    if out.is_dir():
        raise InputError(f"output {out}: is a folder; give a file name such as labels.json")
    try:
        check_writable_dir(out.parent)
    except InputError:
        raise InputError(
            f"output {out}: its folder is not writable; choose a path you can write to"
        ) from None
    return out
