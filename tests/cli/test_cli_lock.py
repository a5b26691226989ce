"""One run per output: the lock file, stale locks after a kill, and the --processes checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from cli_data import shapes_dataset

from serving.cli.label import main
from serving.errors import InputError
from serving.sharding import shards
from serving.sharding.lock import OutputLock, lock_path, pid_alive


def _gone_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_pid_alive_tells_running_from_gone_and_reused() -> None:
    assert pid_alive(os.getpid()) and not pid_alive(_gone_pid()) and not pid_alive(0)
    assert not pid_alive(os.getpid(), started="not-my-start-time")


def test_a_live_lock_refuses_a_second_run_with_one_line(tmp_path) -> None:
    out = tmp_path / "labels.json"
    with OutputLock("label", out):
        assert lock_path("label", out).is_file()
        with pytest.raises(InputError) as refused:
            OutputLock("label", out).acquire()
        message = str(refused.value)
        assert f"pid {os.getpid()}" in message and "in use by another run (sim label" in message
        assert "\n" not in message and str(lock_path("label", out)) in message
    assert not lock_path("label", out).exists()  # released


def test_an_output_folder_that_is_a_file_is_named(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="is a file, not a folder: not writable"):
        OutputLock("predict", blocker).acquire()


def test_a_stale_lock_after_a_kill_is_taken_over(tmp_path) -> None:
    out = tmp_path / "pred"
    path = lock_path("predict", out)
    path.parent.mkdir()
    path.write_text(json.dumps({"pid": _gone_pid(), "command": "predict"}))
    with OutputLock("predict", out):
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_label_refuses_an_output_in_use_before_loading_anything(tmp_path, tiny_checkpoint,
                                                                capsys) -> None:
    boxes = shapes_dataset(tmp_path / "data", num_images=1)
    out = tmp_path / "labels.json"
    lock_path("label", out).write_text(json.dumps({"pid": os.getpid(), "command": "label",
                                                   "started": "earlier"}))
    code = main(["--model", str(tiny_checkpoint), "--annotations", str(boxes), "--images",
                 str(tmp_path / "data" / "images"), "--output", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "in use by another run" in err, err
    assert not out.exists()


def test_processes_beyond_the_available_memory_are_refused_once(tmp_path, tiny_checkpoint,
                                                                monkeypatch, capsys) -> None:
    monkeypatch.setattr(shards, "available_memory", lambda: 4 * shards.PROCESS_BYTES + 1)
    monkeypatch.setattr(shards, "launch", lambda *a: pytest.fail("launched"))
    boxes = shapes_dataset(tmp_path / "data", num_images=1)
    code = main(["--model", str(tiny_checkpoint), "--annotations", str(boxes), "--images",
                 str(tmp_path / "data" / "images"), "--output", str(tmp_path / "o.json"),
                 "--processes", "5"])
    err = capsys.readouterr().err
    assert code == 1 and err == ("error: --processes 5: each process needs about 1.5 GB and "
                                 "6.0 GB are available; use --processes 4 or fewer\n")
    assert not lock_path("label", tmp_path / "o.json").exists()


def test_a_full_disk_is_one_line_and_the_rerun_resumes(tmp_path, tiny_checkpoint, capsys,
                                                       monkeypatch):
    from serving.sharding.progress import ProgressLog

    boxes = shapes_dataset(tmp_path / "data", num_images=3)
    args = ["--model", str(tiny_checkpoint), "--annotations", str(boxes), "--images",
            str(tmp_path / "data" / "images"), "--output", str(tmp_path / "o.json"),
            "--batch-size", "1", "--device", "cpu", "--no-progress"]
    real, lines = ProgressLog.append, []

    def filling(self, entry):
        if len(lines) == 2:
            raise OSError(28, "No space left on device", str(self.path))
        lines.append(entry)
        real(self, entry)

    monkeypatch.setattr(ProgressLog, "append", filling)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "rerun" in err
    monkeypatch.setattr(ProgressLog, "append", real)
    from serving import Segmenter

    calls, predict = [], Segmenter.predict_batch
    monkeypatch.setattr(Segmenter, "predict_batch",
                        lambda self, images, *a, **k: calls.append(len(images))
                        or predict(self, images, *a, **k))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "annotations labelled" in out and (tmp_path / "o.json").is_file()
    assert sum(calls) == 1  # two of the three images were kept from the first run
