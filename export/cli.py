"""``python -m export``: checkpoint -> ONNX (two graphs + sidecar) and/or TensorRT engines,
optionally verified against PyTorch on images.

    python -m export --checkpoint runs/quickstart/model_final.safetensors --output exported \\
        --format onnx --verify data/images/
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from serving.errors import InputError

from .onnx import DEFAULT_OPSET, MIN_OPSET, check_output_dir, export_onnx
from .tensorrt import build_tensorrt_engine, graph_op_types, import_tensorrt
from .verify import collect_images, verify_export


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__,
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
    p.add_argument("--verify", nargs="+", default=None, metavar="IMAGES",
                   help="images or folders to compare the export with PyTorch on")
    p.add_argument("--device", default="cpu", help="device for --verify (default cpu)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Check everything cheap before the (slow) export.
    if args.opset < MIN_OPSET:
        raise InputError(f"--opset {args.opset}: must be at least {MIN_OPSET}; try --opset 18")
    if not Path(args.checkpoint).is_file():
        raise InputError(f"--checkpoint {args.checkpoint}: file not found; check the path")
    check_output_dir(args.output)
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
    if tensorrt:
        engines = build_tensorrt_engine(result.sidecar, fp16=args.fp16,
                                        workspace_gb=args.workspace_gb,
                                        timing_cache=args.timing_cache)
        result.engines.update(engines)
        for kind, path in engines.items():
            print(f"wrote {path} ({kind}, {'fp16' if args.fp16 else 'fp32'})")
    if images:
        targets = {"onnx": result.sidecar}
        if tensorrt:
            targets["tensorrt"] = result.engines["automatic"]
        failed = False
        for label, target in targets.items():
            fp16 = label == "tensorrt" and args.fp16
            report = verify_export(args.checkpoint, target, images, device=args.device,
                                   box_tolerance=2.0 if fp16 else 0.5,
                                   min_iou=0.9 if fp16 else 0.99)
            print(f"\nverify {label}:\n{report.table()}")
            report_path = Path(args.output) / f"{result.sidecar.stem}.verify.{label}.json"
            report_path.write_text(json.dumps(report.to_dict(), indent=2), encoding="utf-8")
            failed |= not report.passed
        if failed:
            print("error: the export does not match PyTorch within the tolerances")
            return 1
    return 0

