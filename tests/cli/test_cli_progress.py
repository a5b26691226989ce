"""Progress logs of the batch commands: torn lines, signatures, fingerprints, several logs."""

from __future__ import annotations

import json

import pytest

from serving.errors import InputError
from serving.sharding.progress import (
    LogTail,
    ProgressLog,
    WorkRecords,
    file_stamp,
    fingerprint,
    log_path,
    log_paths,
)

SIG = {"model": "a", "t": 0.5}


def _records(fps, run="r2"):
    return WorkRecords(dict(fps), run=run)


def test_one_log_survives_a_torn_line_and_refuses_another_signature(tmp_path):
    log = ProgressLog(tmp_path, ".progress", SIG)
    log.open()
    log.append({"key": "x", "fingerprint": "1", "run": "r1", "v": 1})
    log.append({"key": "y", "fingerprint": "2", "run": "r1", "v": 2})
    with open(log.path, "a") as fh:
        fh.write('{"key": "z", "v"')  # a crash in the middle of a line
    records = _records({"x": "1", "y": "2", "z": "3"})
    ProgressLog(tmp_path, ".progress", SIG).read_all(records)
    assert set(records.results) == {"x", "y"}
    again = ProgressLog(tmp_path, ".progress", SIG)
    again.open()  # drops the torn line so appends start on a fresh line
    assert log.path.read_text().endswith("\n") and '"z"' not in log.path.read_text()
    again.append({"key": "z", "fingerprint": "3", "run": "r2", "v": 3})
    records = _records({"x": "1", "y": "2", "z": "3"})
    again.read_all(records)
    assert records.results["z"]["v"] == 3 and records.this_run() == 1
    with pytest.raises(InputError, match=r"differs in model\); pass --overwrite"):
        ProgressLog(tmp_path, ".progress", {**SIG, "model": "b"}).check()
    lines = [json.loads(x) for x in log.path.read_text().splitlines()]
    assert lines[0] == {"signature": SIG}


def test_a_record_counts_only_while_its_fingerprint_matches(tmp_path):
    records = _records({"x": "new", "y": "same"})
    records.add({"key": "x", "fingerprint": "old", "run": "r1", "v": 1})  # input changed
    records.add({"key": "y", "fingerprint": "same", "run": "r1", "v": 2})
    records.add({"key": "gone", "fingerprint": "f", "run": "r1"})  # no longer an input
    assert set(records.results) == {"y"}
    # a failure of this run counts until a result replaces it; older failures are retried
    records.add({"key": "x", "fingerprint": "new", "run": "r1", "error": "old failure"})
    records.add({"key": "x", "fingerprint": "new", "run": "r2", "error": "bad file"})
    assert list(records.failures) == ["x"] and records.this_run() == 1
    records.add({"key": "x", "fingerprint": "new", "run": "r2", "v": 3})
    assert records.failures == {} and records.results["x"]["v"] == 3


def test_fingerprints_and_file_stamps():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert len(fingerprint("x")) == 16
    assert file_stamp("/no/such/file") == [-1, -1]


def test_every_process_has_its_own_log_and_the_tail_reads_them_all(tmp_path):
    logs = [ProgressLog(tmp_path, ".p", SIG, rank=r) for r in range(3)]
    assert [log.path.name for log in logs] == [".p.jsonl", ".p.1.jsonl", ".p.2.jsonl"]
    assert log_path(tmp_path, ".p", 10).name == ".p.10.jsonl"
    for log in logs:
        log.open()
    ProgressLog(tmp_path, ".other", SIG).open()  # another output's log is not ours
    assert [p.name for p in log_paths(tmp_path, ".p")] == [".p.jsonl", ".p.1.jsonl",
                                                           ".p.2.jsonl"]
    records = _records({"a": "1", "b": "1", "c": "1"}, run="now")
    tail = LogTail(logs[0], records)
    assert tail.poll() == 3  # the three signature lines
    logs[2].append({"key": "c", "fingerprint": "1", "run": "now"})
    logs[1].append({"done": "earlier", "rank": 1})  # an end mark of another run
    logs[1].append({"done": "now", "rank": 1})
    assert tail.poll() == 3 and tail.poll() == 0  # only new lines are read
    assert set(records.results) == {"c"} and records.done_ranks == {1}
    logs[1].remove_all()
    assert log_paths(tmp_path, ".p") == []
