"""``python -m export``: one-line errors with exit code 1, a full export + verify run, and
``verify_export`` failing on a different model."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from export.__main__ import main
from export.verify import VerificationError, verify_export
from serving.model.model_file import load_checkpoint, save_checkpoint


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_missing_checkpoint(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "nope.safetensors")]) == 1
    assert "nope.safetensors: file not found" in _error_line(capsys)


def test_opset_below_17(tiny_checkpoint, capsys):
    assert main(["--checkpoint", str(tiny_checkpoint), "--opset", "16"]) == 1
    assert "at least 17" in _error_line(capsys)


def test_unwritable_output(tiny_checkpoint, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["--checkpoint", str(tiny_checkpoint), "--output", str(blocker / "x")]) == 1
    assert "not writable" in _error_line(capsys)


def test_bad_verify_images(tiny_checkpoint, tmp_path, capsys):
    argv = ["--checkpoint", str(tiny_checkpoint), "--output", str(tmp_path / "o"), "--verify"]
    assert main(argv + [str(tmp_path / "missing.png")]) == 1
    assert "missing.png: not found" in _error_line(capsys)
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    assert main(argv + [str(fake)]) == 1
    assert "fake.png" in _error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert main(argv + [str(tmp_path / "empty")]) == 1
    assert "no images found" in _error_line(capsys)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                    reason="tensorrt is installed here")
def test_tensorrt_format_without_tensorrt(tiny_checkpoint, tmp_path, capsys):
    argv = ["--checkpoint", str(tiny_checkpoint), "--output", str(tmp_path), "--format", "all"]
    assert main(argv) == 1
    assert "pip install tensorrt" in _error_line(capsys)
    assert not list(tmp_path.iterdir())  # failed before exporting anything


@pytest.mark.slow
def test_export_and_verify_end_to_end(cli_export):
    """The session export: ``python -m export`` with its defaults and ``--int8``, then --verify
    of both on 2 images."""
    assert cli_export.code == 0, cli_export.stdout
    printed = cli_export.stdout
    assert "NonMaxSuppression" in printed and "PASS" in printed
    assert "warning" not in printed  # every operator is in TensorRT's ONNX parser
    assert sorted(p.name for p in cli_export.out.iterdir()) == [
        "tiny.auto.onnx", "tiny.int8.auto.onnx", "tiny.int8.json", "tiny.int8.prompt.onnx",
        "tiny.json", "tiny.prompt.onnx", "tiny.verify.onnx-int8.json", "tiny.verify.onnx.json"]
    report = json.loads((cli_export.out / "tiny.verify.onnx.json").read_text())
    assert report["passed"] and [r["mode"] for r in report["rows"]] == ["automatic", "prompt"] * 2
    for auto in report["rows"][::2]:
        assert auto["torch_count"] == auto["export_count"] == auto["matched"] == 20
        assert auto["max_box_diff"] <= 0.5 and auto["min_mask_iou"] >= 0.99
    sidecar = json.loads((cli_export.out / "tiny.json").read_text())
    details = sidecar["history"][-1]["details"]
    assert details["exporter"] == "dynamo" and details["dynamic"] is True
    int8 = json.loads((cli_export.out / "tiny.int8.json").read_text())
    assert [h["made_by"] for h in int8["history"]] == ["save", "export onnx", "export int8"]
    assert int8["history"][-1]["source"] == "tiny.json" and int8["precision"] == "int8"
    print(f"python -m export of the tiny model (dynamo, both graphs, INT8, verify): "
          f"{cli_export.seconds:.0f} s")


def test_options_reach_the_exporter(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """What the command line passes on (checked without exporting)."""
    import export.cli as cli
    from export import ExportResult

    seen = {}

    def fake_export(checkpoint, output, **kwargs):
        seen.update(kwargs)
        return ExportResult(sidecar=tmp_path / "tiny.json")

    monkeypatch.setattr(cli, "export_onnx", fake_export)
    argv = ["--checkpoint", str(tiny_checkpoint), "--output", str(tmp_path), "--name", "tiny",
            "--max-detections", "10", "--static", "--image-size", "256", "320",
            "--batch-size", "2", "--opset", "17"]
    assert main(argv) == 0
    assert seen == {"name": "tiny", "opset": 17, "max_detections": 10, "dynamic": False,
                    "image_size": (256, 320), "batch_size": 2}
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # the TorchScript exporter is gone
        main(["--checkpoint", str(tiny_checkpoint), "--exporter", "torchscript"])


@pytest.mark.slow
def test_verify_fails_on_another_model(export_checkpoint, tiny_export, tmp_path, sample_image):
    model, info = load_checkpoint(export_checkpoint)
    with torch.no_grad():  # another model: shifted box regression
        model.head.bbox_pred.bias.add_(0.5)
    other = save_checkpoint(tmp_path / "other.safetensors", model, info)
    report = verify_export(other, tiny_export.sidecar, [sample_image, sample_image[:, ::-1]])
    assert not report.passed and len(report.rows) == 4
    assert "FAIL" in report.table() and "| image 0 | automatic |" in report.table()
    with pytest.raises(VerificationError, match="differs from PyTorch on image 0"):
        report.raise_if_failed()
    same = verify_export(export_checkpoint, tiny_export.sidecar,
                         [np.ascontiguousarray(sample_image[:, ::-1])])
    assert same.passed
