"""``--model`` takes every file and folder that training and export write, in every command,
and answers anything else with one error wording (the same line from every entry point)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sim_testing import release_files

from serving import InputError, Segmenter
from serving.backends.locate import ACCEPTED, locate_model
from sim_cli.main import main as sim


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """Release f16b7e0's export folder (fp32 and INT8 sidecars) and its checkpoint."""
    return release_files(tmp_path_factory.mktemp("models"))


def bad_paths(root: Path) -> dict[str, Path]:
    """Paths that are no model, each under the reason its error gives."""
    (root / "model.xyz").write_bytes(b"x")
    (root / "model.pt").write_bytes(b"x")
    (root / "empty").mkdir()
    (root / "two").mkdir()
    for name in ("x.json", "y.json"):  # two sidecars of one precision: no rule picks one
        (root / "two" / name).write_text(json.dumps({"format": "sim-condinst-export"}))
    return {"unknown file type '.xyz'": root / "model.xyz",
            "PyTorch pickle files (.pt) are not loaded (unpickling can run code)":
                root / "model.pt",
            "file not found": root / "missing.safetensors",
            "the folder holds no model file; pass the file to load": root / "empty",
            "the folder holds 2 exports (x.json, y.json) and no single fp32 one; pass the "
            ".json of the one to load": root / "two"}


def test_locate_model_rules(export_dir, tmp_path) -> None:
    assert locate_model(export_dir) == (export_dir / "tiny.json", "onnx")
    assert locate_model(export_dir / "tiny.int8.json").kind == "onnx"
    (tmp_path / "m.plan").write_bytes(b"x")
    assert locate_model(tmp_path / "m.plan") == (tmp_path / "m.plan", "tensorrt")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("{}")  # a training run folder: not a sidecar
    shutil.copy(export_dir / "tiny.safetensors", run / "model_final.safetensors")
    assert locate_model(run) == (run / "model_final.safetensors", "checkpoint")
    shutil.copy(export_dir / "tiny.safetensors", run / "other.safetensors")
    with pytest.raises(InputError, match=r"holds 2 checkpoints \(model_final.safetensors, "
                                         r"other.safetensors\); pass the file to load"):
        locate_model(run)


def _argv(command: str, path: Path, root: Path) -> list[str]:
    image = root / "i.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    coco = root / "c.json"
    coco.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    return {
        "predict": ["predict", "--model", str(path), "--input", str(image), "--output",
                    str(root / "out")],
        "label": ["label", "--model", str(path), "--annotations", str(coco), "--images",
                  str(root), "--output", str(root / "l.json")],
        "eval": ["eval", "--model", str(path), "--annotations", str(coco), "--images",
                 str(root)],
        "info": ["info", str(path)],
        "serve": ["serve", "--model", str(path)],
        "app": ["app", "--model", str(path)],
    }[command]


@pytest.mark.parametrize("command", [
    "predict", "label", "eval", "info",
    "serve", pytest.param("app", marks=pytest.mark.slow)])
def test_every_entry_point_gives_the_same_error(tmp_path, capsys, command) -> None:
    """Segmenter.load's line, word for word, from predict, label, eval, info, serve, app."""
    for reason, path in bad_paths(tmp_path).items():
        with pytest.raises(InputError) as exc:
            Segmenter.load(path)
        line = str(exc.value)
        assert line == f"model {path}: {reason}; {ACCEPTED}"
        assert sim(_argv(command, path, tmp_path)) != 0
        err = capsys.readouterr().err
        assert f"error: {line}\n" in err, err


@pytest.mark.parametrize("model", ["tiny.int8.json", ".", "tiny.safetensors"])
def test_predict_and_info_take_every_export_file_and_the_folder(export_dir, tmp_path, model,
                                                                capsys) -> None:
    path = export_dir / model
    out = tmp_path / "out"
    assert sim(["predict", "--model", str(path), "--input", str(export_dir / "image.png"),
                "--output", str(out), "--no-progress"]) == 0
    assert len(json.loads((out / "results.json").read_text())) == 20
    capsys.readouterr()
    assert sim(["info", str(path), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)["card"]
    assert card["precision"] == ("int8" if "int8" in model else "fp32")
    assert card["calibration"]["score_threshold"] == 0.3125
    assert card["history"][0]["details"]["step"] == 1200
    assert sim(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "made by:\n  train: step 1200" in text and "COCO category ids: 1, 2, 7" in text
