"""``python -m export``: checkpoint -> ONNX (two graphs + sidecar) and/or TensorRT engines,
optionally verified against PyTorch on images.

    sim export --model runs/quickstart/model_final.safetensors --output exported \\
        --format onnx --verify data/images/
    sim export --model ... --int8 --calibration data/train.json --verify data/val/
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from serving import Segmenter
from serving.errors import InputError
from serving.files import check_writable_dir

from .int8_calibration import DEFAULT_CALIBRATION_COUNT, CalibrationSet, load_calibration_set
from .onnx import DEFAULT_OPSET, MIN_OPSET, ExportResult, export_onnx
from .quantize import METHODS, QuantizeOptions, quantize_export
from .tensorrt import build_tensorrt_engine, graph_op_types, import_tensorrt
from .verify import collect_images, verify_export
from .verify_int8 import verify_int8


def build_parser(prog: str = "python -m export") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "--checkpoint", dest="checkpoint", required=True,
                   help="training checkpoint (.safetensors)")
    p.add_argument("--format", choices=("onnx", "tensorrt", "all"), default="onnx",
                   help="onnx; tensorrt (builds the ONNX first); all (same as tensorrt)")
    p.add_argument("--output", default="exported", help="output folder (default: exported)")
    p.add_argument("--name", default=None, help="file stem (default: the checkpoint's)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, >= {MIN_OPSET} (default {DEFAULT_OPSET})")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--dynamic", dest="dynamic", action="store_true", default=True,
                       help="dynamic batch and image size (default)")
    shape.add_argument("--static", dest="dynamic", action="store_false",
                       help="fixed batch and image size (--batch-size, --image-size)")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="static input size, multiples of 32 (default max_size x max_size)")
    p.add_argument("--batch-size", type=int, default=1, help="static batch size (default 1)")
    p.add_argument("--max-detections", type=int, default=None,
                   help="K, detections per image in the automatic graph (default: checkpoint's)")
    p.add_argument("--fp16", action="store_true", help="TensorRT: allow FP16 kernels")
    p.add_argument("--workspace-gb", type=float, default=4.0, help="TensorRT workspace (GiB)")
    p.add_argument("--timing-cache", default=None, help="TensorRT timing cache file")
    q = p.add_argument_group("INT8 (ONNX Runtime QDQ; TensorRT from the same images)")
    q.add_argument("--int8", action="store_true",
                   help="also write <name>.int8.{auto,prompt}.onnx + <name>.int8.json")
    q.add_argument("--calibration", default=None, metavar="IMAGES",
                   help="calibration images: a folder or a COCO JSON (needed by --int8)")
    q.add_argument("--calibration-count", type=int, default=DEFAULT_CALIBRATION_COUNT,
                   metavar="N", help=f"images used, evenly spaced (default "
                                     f"{DEFAULT_CALIBRATION_COUNT})")
    q.add_argument("--calibration-images", default=None, metavar="DIR",
                   help="image folder of a COCO JSON (default: its folder or images/)")
    q.add_argument("--calibration-method", choices=METHODS, default="minmax")
    q.add_argument("--int8-calibrator", action="store_true",
                   help="TensorRT: calibrate the fp32 graphs with IInt8EntropyCalibrator2 "
                        "(TensorRT 10 only) instead of building from the INT8 Q/DQ graphs")
    p.add_argument("--verify", nargs="+", default=None, metavar="IMAGES",
                   help="images or folders to compare the export with PyTorch on")
    p.add_argument("--device", default="cpu", help="device for --verify (default cpu)")
    return p


def _check_args(args: argparse.Namespace) -> CalibrationSet | None:
    """Everything cheap, before the (slow) export; returns the checked calibration set."""
    if args.opset < MIN_OPSET:
        raise InputError(f"--opset {args.opset}: must be at least {MIN_OPSET}; try --opset 18")
    if not Path(args.checkpoint).is_file():
        raise InputError(f"--model {args.checkpoint}: file not found; check the path")
    if args.int8 and not args.calibration:
        raise InputError("--int8 needs --calibration IMAGES: a folder or COCO JSON of images "
                         "like the ones the model will see (64 are used by default)")
    if args.calibration and not args.int8:
        raise InputError("--calibration is used by --int8; add --int8 or drop --calibration")
    if args.int8_calibrator and not (args.int8 and args.format != "onnx"):
        raise InputError("--int8-calibrator applies to --int8 --format tensorrt")
    check_writable_dir(args.output)
    if not args.int8:
        return None
    from serving.model.model_file import read_checkpoint_card

    infer = read_checkpoint_card(args.checkpoint).inference
    return load_calibration_set(args.calibration, args.calibration_count,
                                args.calibration_images, (infer.min_size, infer.max_size))


def _int8(args: argparse.Namespace, result: ExportResult, cal: CalibrationSet,
          tensorrt: bool) -> dict[str, ExportResult | dict]:
    """The INT8 files: the QDQ ONNX (symmetric int8 activations when it feeds TensorRT) and
    the TensorRT engines (explicit from it, or implicit with the entropy calibrator)."""
    options = QuantizeOptions(method=args.calibration_method,
                              symmetric=tensorrt and not args.int8_calibrator)
    print(f"calibrating on {len(cal.paths)} of {cal.available} images from {cal.source} "
          f"(sha256 {cal.sha256[:12]}) ...", flush=True)
    quantized = quantize_export(result.sidecar, cal, options=options)
    for kind, path in quantized.graphs.items():
        print(f"wrote {path} ({kind}, int8 QDQ)")
    print(f"wrote {quantized.sidecar}")
    out: dict[str, ExportResult | dict] = {"onnx": quantized}
    if tensorrt:
        source, calibration = ((result.sidecar, cal) if args.int8_calibrator
                               else (quantized.sidecar, None))
        engines = build_tensorrt_engine(source, fp16=args.fp16, workspace_gb=args.workspace_gb,
                                        timing_cache=args.timing_cache,
                                        int8_calibration=calibration)
        for kind, path in engines.items():
            print(f"wrote {path} ({kind}, int8)")
        out["tensorrt"] = engines
    return out


def _verify(args: argparse.Namespace, images: list[Path], targets: dict[str, tuple]) -> bool:
    """Verify each (label -> (target, precision)); write the reports; True when all pass."""
    failed = False
    for label, (target, precision) in targets.items():
        if precision == "int8":
            seg = (Segmenter.from_tensorrt(target) if str(target).endswith(".engine")
                   else Segmenter.from_onnx(target, device=args.device))
            report: Any = verify_int8(args.checkpoint, seg, images, device=args.device)
        else:
            fp16 = precision == "fp16"
            report = verify_export(args.checkpoint, target, images, device=args.device,
                                   box_tolerance=2.0 if fp16 else 0.5,
                                   min_iou=0.9 if fp16 else 0.99)
        print(f"\nverify {label}:\n{report.table()}")
        stem = Path(target).name.split(".")[0]
        report_path = Path(args.output) / f"{stem}.verify.{label}.json"
        report_path.write_text(json.dumps(report.to_dict(), indent=2), encoding="utf-8")
        failed |= not report.passed
    return not failed


def main(argv: Sequence[str] | None = None, prog: str = "python -m export") -> int:
    """``sim export``; ``prog`` is the name its ``--help`` shows. Returns the exit code."""
    args = build_parser(prog).parse_args(argv)
    cal = _check_args(args)
    images = collect_images(args.verify) if args.verify else []
    if images:
        from serving.inference.images import load_image

        for path in images:  # fail on unreadable images now, not after exporting
            load_image(path)
    tensorrt = args.format in ("tensorrt", "all")
    if tensorrt:
        import_tensorrt()
    result = export_onnx(args.checkpoint, args.output, name=args.name, opset=args.opset,
                         max_detections=args.max_detections, dynamic=args.dynamic,
                         image_size=tuple(args.image_size) if args.image_size else None,
                         batch_size=args.batch_size)
    for kind, path in result.graphs.items():
        print(f"wrote {path} ({kind}; ops: {', '.join(graph_op_types(path))})")
    print(f"wrote {result.sidecar}")
    if result.unsupported_tensorrt_ops:
        print("warning: operators TensorRT's ONNX parser lacks: "
              + ", ".join(result.unsupported_tensorrt_ops))
    targets: dict[str, tuple] = {"onnx": (result.sidecar, "fp32")}
    if tensorrt and not args.int8:
        engines = build_tensorrt_engine(result.sidecar, fp16=args.fp16,
                                        workspace_gb=args.workspace_gb,
                                        timing_cache=args.timing_cache)
        result.engines.update(engines)
        for kind, path in engines.items():
            print(f"wrote {path} ({kind}, {'fp16' if args.fp16 else 'fp32'})")
        targets["tensorrt"] = (engines["automatic"], "fp16" if args.fp16 else "fp32")
    if cal is not None:
        int8 = _int8(args, result, cal, tensorrt)
        targets["onnx-int8"] = (int8["onnx"].sidecar, "int8")  # type: ignore[union-attr]
        if "tensorrt" in int8:
            targets["tensorrt-int8"] = (int8["tensorrt"]["automatic"], "int8")  # type: ignore
    if images and not _verify(args, images, targets):
        print("error: the export does not match PyTorch within the tolerances")
        return 1
    return 0
