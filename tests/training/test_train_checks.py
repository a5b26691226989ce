"""``sim train`` refuses, before the first step, what it would otherwise find late: missing
images (training or validation), an output_dir that is a file or not writable."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from training.train import main


def _data_copy(tiny_data, tmp_path: Path) -> tuple[Path, Path, list[str]]:
    root = tmp_path / "data"
    shutil.copytree(tiny_data.root, root)
    train_json = root / tiny_data.train_json.relative_to(tiny_data.root)
    names = [im["file_name"] for im in json.loads(train_json.read_text())["images"]]
    return root, train_json, names


def _args(tiny_data, root: Path, out: Path) -> list[str]:
    rel = lambda p: root / Path(p).relative_to(tiny_data.root)  # noqa: E731
    return ["--config", "configs/tiny.yaml", f"output_dir={out}",
            f"data.train_json={rel(tiny_data.train_json)}",
            f"data.train_images={rel(tiny_data.images)}",
            f"data.val_json={rel(tiny_data.val_json)}", f"data.val_images={rel(tiny_data.images)}"]


def test_missing_training_images_are_refused_before_the_first_step(tiny_data, tmp_path,
                                                                   capsys, monkeypatch):
    root, _, names = _data_copy(tiny_data, tmp_path)
    images = root / tiny_data.images.relative_to(tiny_data.root)
    for name in names[-2:]:
        (images / name).unlink()
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    import training.train as train_module

    monkeypatch.setattr(train_module, "_build_run", lambda *a: pytest.fail("training began"))
    assert main(_args(tiny_data, root, tmp_path / "run")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"2 of {len(names)} images" in err and names[-1] in err


def test_an_output_dir_that_is_a_file_or_read_only_is_refused_first(tiny_data, tmp_path,
                                                                    capsys, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    import training.train as train_module

    monkeypatch.setattr(train_module, "_make_accelerator", lambda *a: pytest.fail("started"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(_args(tiny_data, tiny_data.root, blocker)) == 1
    assert "exists and is not a folder" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert main(_args(tiny_data, tiny_data.root, locked / "run")) == 1
        assert "not writable" in capsys.readouterr().err
