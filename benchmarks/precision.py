"""Accuracy cost of reduced precision: mask and box AP of fp32 vs INT8 vs bf16 (not a test).

For each trained checkpoint (the synthetic quickstart model, the nuclei model) on its dataset's
validation split (every image), COCO mask and box AP of:

- PyTorch fp32 (the reference) and PyTorch bf16 autocast (``Segmenter.load(dtype="bf16")``);
- ONNX Runtime fp32 (the export) and ONNX Runtime INT8 (``export.quantize``), calibrated on
  ``--calibration-count`` images of the **training** split (never the images scored), in the
  default setting and the variants the INT8 design was decided with: prediction convolutions
  also in int8 (``+pred-convs``), the dynamic mask head's MatMuls also in int8
  (``+mask-head``), depthwise convolutions also in int8 (``+depthwise``, the default before
  it was measured slower), percentile calibration (``percentile``), full-range weights
  (``8-bit weights``, the default before CPUs without VNNI were measured);
- plus the INT8 verification figures (:mod:`export.verify_int8`) of each INT8 variant on the
  first ``--verify-images`` validation images.

Writes ``benchmarks/results/precision.{json,md}`` with the command line.

    python benchmarks/precision.py                          # both datasets, ~10 min on 2 cores
    python benchmarks/precision.py --datasets synthetic --variants default
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    machine_info,
    machine_markdown,
    markdown_table,
    write_results,
)

from export import export_onnx  # noqa: E402
from export.int8_calibration import load_calibration_set  # noqa: E402
from export.quantize import QuantizeOptions, quantize_export  # noqa: E402
from export.verify_int8 import verify_int8  # noqa: E402
from serving import Segmenter  # noqa: E402
from serving.backends.torch_backend import cpu_bf16_support  # noqa: E402
from serving.formats.cocoeval import evaluate_coco  # noqa: E402
from training.evaluate import predict_dataset  # noqa: E402
from training.train_config import load_config  # noqa: E402

DATASETS = {
    "synthetic": ("configs/quickstart_cpu.yaml", "runs/q/model_final.safetensors"),
    "nuclei": ("configs/bench_nuclei.yaml", "runs/nuclei/model_final.safetensors"),
}
VARIANTS = {
    "default": QuantizeOptions(),
    "+pred-convs": QuantizeOptions(keep_prediction_convs=False),
    "+mask-head": QuantizeOptions(quantize_mask_head=True),
    "+depthwise": QuantizeOptions(quantize_depthwise=True),
    "percentile": QuantizeOptions(method="percentile"),
    "8-bit weights": QuantizeOptions(reduce_range=False),
}


def category_ids(seg: Segmenter) -> list[int] | None:
    return list(seg.card.category_ids) if seg.card and seg.card.category_ids else None


def average_precision(seg: Segmenter, val_json: str, val_images: str) -> dict[str, float]:
    """Mask and box AP (percent) over every image of the validation split."""
    results = predict_dataset(seg, val_json, val_images, category_ids(seg), progress=False)
    metrics = evaluate_coco(val_json, results)
    return {k: round(100.0 * v, 2) if v >= 0 else v for k, v in metrics.items()}


def run_dataset(name: str, checkpoint: str, args: argparse.Namespace, work: Path) -> dict:
    config, _ = DATASETS[name]
    cfg = load_config(REPO / config)
    data = cfg.data
    export = export_onnx(checkpoint, work / name, check_tensorrt=False)
    cal = load_calibration_set(data.train_json, args.calibration_count, data.train_images)
    val_paths = sorted(Path(data.val_images) / img["file_name"] for img in
                       json.loads(Path(data.val_json).read_text())["images"])
    rows: dict[str, Any] = {}

    def score(label: str, seg: Segmenter, seconds: float = 0.0) -> None:
        start = time.perf_counter()
        rows[label] = {"metrics": average_precision(seg, data.val_json, data.val_images),
                       "precision": seg.info.get("precision"), "build_seconds": seconds,
                       "eval_seconds": round(time.perf_counter() - start, 1)}
        m = rows[label]["metrics"]
        print(f"{name} {label}: mask AP {m['segm/AP']:.2f}, box AP {m['bbox/AP']:.2f}", flush=True)

    score("torch fp32", Segmenter.load(checkpoint, device="cpu"))
    if cpu_bf16_support() is not None:  # (refused on a CPU without native bf16)
        score("torch bf16", Segmenter.load(checkpoint, device="cpu", dtype="bf16"))
    score("onnxruntime fp32", Segmenter.from_onnx(export.sidecar, device="cpu", threads=1))
    for variant in args.variants:
        start = time.perf_counter()
        q = quantize_export(export.sidecar, cal, options=VARIANTS[variant],
                            name=f"{export.sidecar.stem}.int8-{variant.strip('+')}")
        seconds = round(time.perf_counter() - start, 1)
        seg = Segmenter.from_onnx(q.sidecar, device="cpu", threads=1)
        score(f"onnxruntime int8 {variant}", seg, seconds)
        report = verify_int8(checkpoint, seg, val_paths[: args.verify_images])
        rows[f"onnxruntime int8 {variant}"]["verify"] = {
            k: {"value": round(v[0], 4), "ok": v[3]} for k, v in report.checks().items()}
    return {"dataset": name, "checkpoint": checkpoint, "val_json": data.val_json,
            "val_images": len(val_paths), "calibration": cal.to_dict(), "rows": rows}


def markdown(payload: dict[str, Any]) -> str:
    parts = ["# Accuracy cost of bf16 and INT8 (CPU)", machine_markdown(payload["machine"]),
             f"Command: `{payload['command']}`",
             "Mask and box AP (percent, COCO) on every image of each validation split; INT8 is "
             "calibrated on training images. Deltas are against PyTorch fp32. The verify "
             "columns are `export.verify_int8` on the first validation images (INT8 "
             "tolerances: agreement >= 0.9, mask IoUs >= 0.85). Checkpoints: "
             + ", ".join(f"`{r['checkpoint']}`" for r in payload["results"])
             + " (`python -m training --config configs/quickstart_cpu.yaml output_dir=runs/q`, "
             "`python -m training --config configs/bench_nuclei.yaml output_dir=runs/nuclei`)."]
    for res in payload["results"]:
        ref = res["rows"]["torch fp32"]["metrics"]
        table = []
        for label, row in res["rows"].items():
            m = row["metrics"]
            checks = row.get("verify", {})
            table.append([label, f"{m['segm/AP']:.2f}", f"{m['segm/AP'] - ref['segm/AP']:+.2f}",
                          f"{m['bbox/AP']:.2f}", f"{m['bbox/AP'] - ref['bbox/AP']:+.2f}",
                          checks.get("detection agreement", {}).get("value"),
                          checks.get("mask IoU (automatic, mean)", {}).get("value"),
                          checks.get("mask IoU (prompt, mean)", {}).get("value")])
        parts.append(f"## {res['dataset']} ({res['val_images']} validation images, "
                     f"calibration: {res['calibration']['count']} training images, sha256 "
                     f"{res['calibration']['sha256'][:12]})")
        parts.append(markdown_table(["variant", "mask AP", "Δ mask", "box AP", "Δ box",
                                     "verify: agreement", "verify: mask IoU",
                                     "verify: prompt IoU"], table))
    return "\n\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--checkpoints", nargs="+", default=None,
                        help="one per dataset (default: runs/q/..., runs/nuclei/...)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--calibration-count", type=int, default=64)
    parser.add_argument("--verify-images", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="precision")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--render", action="store_true",
                        help="only rewrite <name>.md from an existing <name>.json")
    args = parser.parse_args()
    out = Path(args.output)
    if args.render:
        payload = json.loads((out / f"{args.name}.json").read_text(encoding="utf-8"))
        (out / f"{args.name}.md").write_text(markdown(payload) + "\n", encoding="utf-8")
        return 0
    torch.set_num_threads(args.threads)
    checkpoints = args.checkpoints or [DATASETS[d][1] for d in args.datasets]
    payload: dict[str, Any] = {"machine": machine_info(),
                               "command": "python " + shlex.join(sys.argv), "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        for dataset, checkpoint in zip(args.datasets, checkpoints, strict=True):
            payload["results"].append(run_dataset(dataset, checkpoint, args, Path(tmp)))
    write_results(out, args.name, payload, markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
