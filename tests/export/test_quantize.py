"""INT8 ONNX export end to end on a small random model: the files and sidecar, what stays fp32,
serving through ``Segmenter`` with the same outputs contract, the INT8 verification passing on
the model and failing on a broken or different one, and the ``--int8`` command line.

The model is the tiny test architecture with its predictions made less degenerate
(``make_tiny_checkpoint(sharp=True)``), so that matching detections by IoU is meaningful. The
session's one ``python -m export --int8 --calibration ... --verify ...`` run makes every file
the tests look at."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from export_images import random_image
from sim_testing import make_tiny_checkpoint

from export.verify_int8 import INT8_TOLERANCES, verify_int8
from serving import Segmenter
from serving.backends.exported import read_sidecar
from serving.errors import CheckpointError, InputError

pytestmark = pytest.mark.slow  # the shared fixture exports (dynamo) and quantises


@pytest.fixture(scope="session")
def int8_model(export_checkpoint, cli_export, tiny_export, int8_export):
    """(checkpoint, fp32 ExportResult, INT8 ExportResult, calibration folder, CLI stdout) of
    the session's ``python -m export --int8 --calibration cal --calibration-count 3 --verify
    a.png b.png`` (tests/export/conftest.py)."""
    return export_checkpoint, tiny_export, int8_export, cli_export.calibration, cli_export.stdout


@pytest.fixture(scope="session")
def verify_images():
    return [random_image(120 + 40 * i, 160, 20 + i) for i in range(3)]


def _ops(path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_files_and_sidecar(int8_model):
    _, fp32, int8, cal, _ = int8_model
    assert int8.sidecar.name == "tiny.int8.json"
    assert {p.name for p in int8.graphs.values()} == {"tiny.int8.auto.onnx",
                                                      "tiny.int8.prompt.onnx"}
    assert all(p.parent == fp32.sidecar.parent for p in int8.paths)
    side, base = read_sidecar(int8.sidecar), read_sidecar(fp32.sidecar)
    assert (side.precision, base.precision) == ("int8", "fp32")
    assert side.export_id != base.export_id and side.class_names == base.class_names
    assert side.graphs["automatic"]["inputs"] == base.graphs["automatic"]["inputs"]
    record = side.quantization
    assert record["calibration"]["files"] == ["0.png", "2.png", "3.png"]  # 3 of 4, spread
    digests = [hashlib.sha256((cal / name).read_bytes()).hexdigest()
               for name in record["calibration"]["files"]]
    assert record["calibration"]["sha256"] == hashlib.sha256(
        "\n".join(digests).encode()).hexdigest()
    assert record["calibration"]["count"] == 3 and record["format"] == "QDQ"
    assert record["source"]["export_id"] == base.export_id
    assert record["graphs"]["automatic"]["quantized_nodes"] > 0


def test_weights_use_seven_bits(int8_model):
    """Every int8 weight lies in -64..64 (``reduce_range``: a pair of products with uint8
    activations sums to at most 2 * 255 * 64 = 32640, so the int16 sums of ONNX Runtime's
    kernels on CPUs without VNNI cannot saturate), and the record says so."""
    import onnx
    from onnx import numpy_helper

    _, _, int8, _, _ = int8_model
    assert read_sidecar(int8.sidecar).quantization["weights"] == (
        "int8 symmetric per-channel, 7-bit range (-64..64)")
    model = onnx.load(str(int8.graphs["automatic"]))
    weights = [numpy_helper.to_array(i) for i in model.graph.initializer
               if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
    assert len(weights) > 5
    assert all(w.min() >= -64 and w.max() <= 64 for w in weights)
    assert max(int(np.abs(w).max()) for w in weights) == 64  # the range is used, not less


def test_network_in_int8_and_post_processing_in_fp32(int8_model):
    _, fp32, int8, _, _ = int8_model
    ops, base = _ops(int8.graphs["automatic"]), _ops(fp32.graphs["automatic"])
    assert ops["QuantizeLinear"] > 10 and ops["DequantizeLinear"] > ops["QuantizeLinear"]
    for op in ("NonMaxSuppression", "TopK", "MatMul", "Sigmoid"):  # untouched, fp32
        assert ops.get(op) == base.get(op), op
    import onnx

    model = onnx.load(str(int8.graphs["automatic"]))
    dq_outputs = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert matmuls and not any(i in dq_outputs for n in matmuls for i in n.input)  # mask head
    # The prediction convolutions (class, box, centerness per level x 5 levels + the mask
    # branch output; the controller is a product at the kept locations, fp32 like the mask
    # head) keep fp32 weights and outputs; the other convolutions get int8 weights.
    kept = read_sidecar(int8.sidecar).quantization["graphs"]["automatic"]["fp32_convs"]
    assert len(kept) == 16
    by_name = {n.name: n for n in model.graph.node}
    float_inits = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    assert all(by_name[name].input[1] in float_inits for name in kept)
    q_inputs = {i for n in model.graph.node if n.op_type == "QuantizeLinear" for i in n.input}
    assert not any(o in q_inputs for name in kept for o in by_name[name].output)
    int8_convs = [n for n in model.graph.node if n.op_type == "Conv" and n.input[1] in dq_outputs]
    assert len(int8_convs) > 20


def test_segmenter_serves_int8_with_the_same_contract(int8_model, verify_images):
    ckpt, _, int8, _, _ = int8_model
    image = verify_images[1]
    for path in (int8.sidecar, int8.graphs["automatic"], int8.graphs["prompt"]):
        seg = Segmenter.load(path) if str(path).endswith(".onnx") else Segmenter.from_onnx(path)
        assert seg.info["precision"] == "int8"
    pred = seg.predict(image)
    assert len(pred) > 0 and pred.boxes.dtype == np.float32 and pred.scores.dtype == np.float32
    assert pred.labels.dtype == np.int64 and pred.masks.dtype == bool
    assert pred.masks.shape[1:] == image.shape[:2]
    assert (pred.boxes[:, 2] <= image.shape[1] + 1e-3).all()
    boxes = np.array([[10, 10, 90, 100], [40, 60, 150, 150]], np.float32)
    prompted = seg.predict(image, boxes=boxes, labels=[1, -1])
    assert len(prompted) == 2 and prompted.labels[0] == 1
    np.testing.assert_array_equal(prompted.boxes, boxes)
    assert not prompted.masks[0][:, 100:].any()  # clipped to its box
    with pytest.raises(InputError, match="exported precision"):
        Segmenter.load(int8.graphs["automatic"], dtype="bf16")


def test_int8_verification_passes_on_the_model(int8_model, verify_images):
    ckpt, _, int8, _, _ = int8_model
    report = verify_int8(ckpt, int8.sidecar, verify_images)
    assert report.passed, report.table()
    assert report.agreement >= INT8_TOLERANCES.min_agreement
    assert report.tolerances is INT8_TOLERANCES
    assert "PASS (INT8 tolerances)" in report.table()
    report.raise_if_failed()


def test_int8_verification_fails_on_another_model(int8_model, verify_images, tmp_path):
    from export.verify import VerificationError

    _, _, int8, _, _ = int8_model
    other = make_tiny_checkpoint(tmp_path / "other.safetensors", seed=5)
    report = verify_int8(other, int8.sidecar, verify_images)
    assert not report.passed and report.agreement < 0.5
    with pytest.raises(VerificationError, match="INT8 tolerances"):
        report.raise_if_failed()


def test_int8_verification_fails_with_a_wrong_calibration_scale(int8_model, verify_images,
                                                                 tmp_path):
    """Scale the first activation dequantisation by 4 (as a wrong calibration would)."""
    import onnx
    from onnx import numpy_helper

    ckpt, _, int8, _, _ = int8_model
    broken = tmp_path / "broken"
    shutil.copytree(int8.sidecar.parent, broken)
    path = broken / int8.graphs["automatic"].name
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    first = next(n for n in model.graph.node if n.op_type == "DequantizeLinear"
                 and n.input[0] not in inits)  # an activation, not a weight
    scale = numpy_helper.to_array(inits[first.input[1]]) * 4
    model.graph.initializer.append(numpy_helper.from_array(scale, "broken_scale"))
    first.input[1] = "broken_scale"
    onnx.save(model, str(path))
    report = verify_int8(ckpt, broken / int8.sidecar.name, verify_images)
    assert not report.passed, report.table()


def test_int8_export_cannot_be_quantised_again(int8_model):
    from export.quantize import quantize_export

    _, _, int8, cal, _ = int8_model
    with pytest.raises(InputError, match="already int8"):
        quantize_export(int8.sidecar, cal)


def test_mixed_int8_and_fp32_files_are_refused(int8_model, tmp_path):
    _, fp32, int8, _, _ = int8_model
    mixed = tmp_path / "mixed"
    shutil.copytree(int8.sidecar.parent, mixed)
    shutil.copy(fp32.graphs["automatic"], mixed / int8.graphs["automatic"].name)
    with pytest.raises(CheckpointError, match="does not belong"):
        Segmenter.from_onnx(mixed / int8.sidecar.name)


def test_export_cli_int8(int8_model):
    _, fp32, int8, _, printed = int8_model
    assert "tiny.int8.auto.onnx" in printed and "calibrating on 3 of 4 images" in printed
    assert "verify onnx-int8" in printed and "PASS (INT8 tolerances)" in printed
    report = json.loads((fp32.sidecar.parent / "tiny.verify.onnx-int8.json").read_text())
    assert report["precision"] == "int8" and report["passed"]
    assert json.loads((fp32.sidecar.parent / "tiny.verify.onnx.json").read_text())["passed"]


def test_symmetric_int8_for_tensorrt_runs_on_onnxruntime(int8_model, verify_images, tmp_path):
    """The TensorRT form (int8 activations, all zero points 0) is valid ONNX that ONNX
    Runtime serves too, within the INT8 tolerances."""
    import onnx
    from onnx import numpy_helper

    from export.quantize import QuantizeOptions, quantize_export

    ckpt, fp32, _, cal, _ = int8_model
    work = tmp_path / "sym"
    work.mkdir()
    for path in fp32.paths:
        shutil.copy(path, work / path.name)
    sym = quantize_export(work / fp32.sidecar.name, cal,
                          options=QuantizeOptions(symmetric=True))
    assert read_sidecar(sym.sidecar).quantization["activations"] == "int8 symmetric"
    model = onnx.load(str(sym.graphs["automatic"]))
    inits = {i.name: i for i in model.graph.initializer}
    zero_points = [numpy_helper.to_array(inits[n.input[2]]) for n in model.graph.node
                   if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    assert verify_int8(ckpt, sym.sidecar, verify_images).passed
