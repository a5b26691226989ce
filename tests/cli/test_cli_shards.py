"""Batch commands split between processes, and resuming after edits or a killed process.

Shares run side by side in threads here (each with its own model, a ``threading.Barrier`` as
the processes' barrier); one slow test starts two real processes with ``accelerate launch``,
kills one of them and reruns the command.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from cli_data import cache_model_loads, decode, one_torch_thread, plain_folder, shapes_dataset

from serving import Segmenter
from serving.cli.label import run_label
from serving.cli.predict import run_predict
from serving.errors import InputError
from serving.sharding.lock import OutputLock
from serving.sharding.shards import Shard, take_share

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_torch_thread()


def _box_only(path: Path) -> Path:
    data = json.loads(path.read_text())
    for ann in data["annotations"]:
        ann.pop("segmentation", None)
        ann.pop("area", None)
    out = path.with_name("boxes.json")
    out.write_text(json.dumps(data))
    return out


def _copied_images(root: Path) -> Path:
    """A box-only COCO file of 24 images (the 8 shapes images, each copied 3 times), 72 boxes
    and a reversed one."""
    data = json.loads(_box_only(shapes_dataset(root, num_images=8)).read_text())
    images, anns = [], []
    for copy in range(3):
        for img in data["images"]:
            name = f"c{copy}_{img['file_name']}"
            (root / "images" / name).write_bytes((root / "images" / img["file_name"]).read_bytes())
            new_id = 1000 * (copy + 1) + img["id"]
            images.append({**img, "id": new_id, "file_name": name})
            anns += [{**a, "id": 1000 * (copy + 1) + a["id"], "image_id": new_id}
                     for a in data["annotations"] if a["image_id"] == img["id"]]
    anns.append({"id": 99999, "image_id": images[7]["id"], "category_id": 1,
                 "bbox": [30, 30, -5, 5], "iscrowd": 0})  # reversed: rejected (exit code 3)
    out = root / "copied.json"
    out.write_text(json.dumps({**data, "images": images, "annotations": anns}))
    return out


def _in_threads(world: int, fn) -> list:
    """Run ``fn(shard)`` for every rank at once, each in its own thread; their results."""
    barrier = threading.Barrier(world)
    results: list = [None] * world
    errors: list = []

    def work(rank: int) -> None:
        try:
            results[rank] = fn(Shard(rank, world, "run-1", sync=barrier.wait))
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    if errors:
        raise errors[0]
    return results


def test_shares_interleave_and_cover_every_item():
    items = list(range(11))
    shares = [take_share(items, Shard(r, 3)) for r in range(3)]
    assert shares == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]


def test_label_in_two_shares_writes_the_one_process_output(tmp_path, tiny_checkpoint):
    boxes = _box_only(shapes_dataset(tmp_path / "data", num_images=5))
    images = tmp_path / "data" / "images"
    kw = dict(batch_size=1, device="cpu", progress=False)
    one = run_label(str(tiny_checkpoint), str(boxes), str(images), str(tmp_path / "one.json"),
                    **kw)
    two = _in_threads(2, lambda shard: run_label(str(tiny_checkpoint), str(boxes), str(images),
                                                 str(tmp_path / "two.json"), shard=shard, **kw))
    assert two[0].merged and not two[1].merged and two[0].labelled == one.labelled == 15
    assert (tmp_path / "two.json").read_bytes() == (tmp_path / "one.json").read_bytes()
    logs = sorted(p.name for p in tmp_path.glob(".two.json.progress*"))
    assert logs == [".two.json.progress.1.jsonl", ".two.json.progress.jsonl"]
    keys = [[json.loads(x).get("key") for x in (tmp_path / n).read_text().splitlines()]
            for n in reversed(logs)]
    assert keys[0][1:-1] == ["100", "102", "104"] and keys[1][1:-1] == ["101", "103"]


def test_predict_in_three_shares_matches_one_process(tmp_path, tiny_checkpoint):
    src = plain_folder(tmp_path / "in", 7)
    kw = dict(batch_size=2, device="cpu", progress=False, save_vis=True)
    run_predict(str(tiny_checkpoint), [str(src)], str(tmp_path / "one"), **kw)
    out = _in_threads(3, lambda shard: run_predict(str(tiny_checkpoint), [str(src)],
                                                   str(tmp_path / "three"), shard=shard, **kw))
    assert out[0].done_now == 7 and out[0].merged and not out[1].merged
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    three = json.loads((tmp_path / "three" / "results.json").read_text())
    assert json.loads((tmp_path / "three" / "images.json").read_text()) == json.loads(
        (tmp_path / "one" / "images.json").read_text())
    assert [(r["image_id"], r["category_id"]) for r in three] == [
        (r["image_id"], r["category_id"]) for r in one]
    np.testing.assert_allclose([r["score"] for r in three], [r["score"] for r in one],
                               atol=1e-5)
    for a, b in zip(one, three):
        ma, mb = decode(a["segmentation"], 64, 80), decode(b["segmentation"], 64, 80)
        assert (ma & mb).sum() >= 0.99 * max((ma | mb).sum(), 1)
    assert len(list((tmp_path / "three" / "vis").iterdir())) == 7


def test_label_rerun_redoes_only_images_whose_boxes_changed(tmp_path, tiny_checkpoint,
                                                            monkeypatch):
    boxes = _box_only(shapes_dataset(tmp_path / "data", num_images=3))
    data = json.loads(boxes.read_text())
    data["annotations"][4]["bbox"] = [60, 60, -10, 10]  # image 101: a reversed box
    boxes.write_text(json.dumps(data))
    cache_model_loads(monkeypatch)
    calls: list[int] = []
    original = Segmenter.predict_batch

    def counting(self, images, *args, **kwargs):
        calls.append(len(images))
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(Segmenter, "predict_batch", counting)
    out = tmp_path / "labels.json"
    args = (str(tiny_checkpoint), str(boxes), str(tmp_path / "data" / "images"), str(out))
    kw = dict(batch_size=1, device="cpu", progress=False)
    first = run_label(*args, **kw)
    assert calls == [1, 1, 1] and first.exit_code == 3 and [r[0] for r in first.rejected] == [5]
    assert run_label(*args, **kw).exit_code == 3 and calls == [1, 1, 1]  # nothing changed
    data["annotations"][4]["bbox"] = [60, 50, 10, 10]  # the rejected box is fixed
    del data["annotations"][0]  # an annotation of a finished image is deleted
    boxes.write_text(json.dumps(data))
    calls[:] = []
    fixed = run_label(*args, **kw)
    assert calls == [1, 1] and fixed.exit_code == 0  # images 100 and 101 redone, 102 kept
    result = {a["id"]: a for a in json.loads(out.read_text())["annotations"]}
    assert 1 not in result and "segmentation" in result[5] and fixed.labelled == 8


def _launch(args: list[str], env: dict) -> subprocess.Popen:
    """``python -m serving label ... --processes 2`` (accelerate launch underneath)."""
    cmd = [sys.executable, "-m", "serving", *args, "--processes", "2"]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child.pid
        except psutil.Error:
            continue
    return None


@pytest.mark.slow
def test_two_processes_killed_halfway_then_rerun_equal_one_process(tmp_path, tiny_checkpoint):
    """Kill one of 2 processes halfway, rerun: the same JSON as one uninterrupted process
    writes (batch size 1: byte for byte), and the job's exit code (3: a box was rejected)."""
    boxes = _copied_images(tmp_path / "data")
    images = str(tmp_path / "data" / "images")
    args = ["label", "--model", str(tiny_checkpoint), "--annotations", str(boxes), "--images",
            images, "--batch-size", "1", "--device", "cpu", "--workers", "0", "--no-progress"]
    run_label(str(tiny_checkpoint), str(boxes), images, str(tmp_path / "one.json"),
              batch_size=1, device="cpu", progress=False)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "two.json"
    launcher = _launch([*args, "--output", str(out)], env)
    log1 = tmp_path / ".two.json.progress.1.jsonl"
    deadline = time.monotonic() + 240
    pid = None  # found first, so that the kill follows the sixth image at once (a shard of
    while pid is None and time.monotonic() < deadline:  # 12 can finish in a few tenths)
        pid = _rank_pid(launcher, 1)
        time.sleep(0.05)
    assert pid is not None, "process 1 not found"
    while time.monotonic() < deadline:
        if log1.exists() and len(log1.read_text().splitlines()) >= 6:
            break
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    output, _ = launcher.communicate(timeout=240)
    assert launcher.returncode != 0 and not out.exists(), output
    done_before = sum('"anns"' in x for p in tmp_path.glob(".two.json.progress*")
                      for x in p.read_text().splitlines())
    assert 0 < done_before < 24
    rerun = _launch([*args, "--output", str(out)], env)
    output, _ = rerun.communicate(timeout=240)
    assert rerun.returncode == 3, output
    assert "label: 72 annotations labelled, 1 rejected, 0 images failed" in output
    assert out.read_bytes() == (tmp_path / "one.json").read_bytes()


def _wait_for_records(log: Path, count: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and sum('"anns"' in x for x in log.read_text().splitlines()) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"{log}: fewer than {count} records after {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_signal_to_the_parent_stops_every_process_and_the_rerun_resumes(tmp_path, sig,
                                                                         tiny_checkpoint):
    """SIGTERM or SIGKILL to ``sim label --processes 2``: the launcher and both workers end
    within seconds (nothing finishes the job behind the user's back), a second run meanwhile
    is refused by the lock, and the rerun resumes from the kept progress."""
    import psutil

    boxes = _copied_images(tmp_path / "data")
    out = tmp_path / "two.json"
    args = ["label", "--model", str(tiny_checkpoint), "--annotations", str(boxes), "--images",
            str(tmp_path / "data" / "images"), "--batch-size", "1", "--device", "cpu",
            "--workers", "0", "--no-progress", "--output", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    parent = _launch(args, env)
    _wait_for_records(tmp_path / ".two.json.progress.1.jsonl", 3)
    with pytest.raises(InputError, match=f"in use by another run .sim label, pid {parent.pid}"):
        OutputLock("label", out).acquire()  # a second run is refused
    family = psutil.Process(parent.pid).children(recursive=True)
    assert len(family) >= 3  # the launcher and two workers
    os.kill(parent.pid, sig)
    parent.communicate(timeout=60)
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, [p.cmdline()[-12:] for p in alive]
    assert not out.exists()
    rerun = _launch(args, env)
    output, _ = rerun.communicate(timeout=240)
    assert rerun.returncode == 3, output  # one box of the data set is rejected
    assert "label: 72 annotations labelled, 1 rejected, 0 images failed" in output
    assert not (tmp_path / "two.json.lock").exists()


@pytest.mark.slow
def test_an_error_before_work_is_printed_once_with_two_processes(tmp_path, tiny_checkpoint):
    boxes = shapes_dataset(tmp_path / "data", num_images=2)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = _launch(["label", "--model", str(tiny_checkpoint), "--annotations", str(boxes),
                    "--images", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o.json"),
                    "--device", "cpu", "--no-progress"], env)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 1, output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "nowhere" in errors[0], output
    assert "Traceback" not in output and "terminate called" not in output, output
