"""Inference speed end to end through ``Segmenter``, per model, batch, mode, backend and precision.

Each timed call is ``Segmenter.predict_batch`` on decoded RGB uint8 arrays held in memory (image
decoding excluded): preprocessing (resize, pad), the network, post-processing (candidates, NMS or
prompt locations, dynamic mask head) and the masks at the original image size as NumPy booleans.

- Models: MobileNetV2-FPN on 512x512 images and ResNet-50-FPN on 800x1333 images, both with the
  paper's heads (FPN 256, 4-conv towers) and 80 classes. Weights are **random**; the class bias is
  calibrated on the benchmark image so the automatic mode returns a realistic 50-100 detections
  (``max_detections`` is 100), and the box-regression bias gives boxes a few strides wide.
- Modes: ``auto`` (automatic instance segmentation) and ``prompt`` (10 prompt boxes per image,
  one mask per box). The figure that matters for the box-prompted API is
  ``prompt / auto`` latency (target <= 1.15).
- Backends: ``torch`` (eager), ``torch.compile`` (the network module compiled; mask head and
  post-processing eager), ``onnxruntime`` (``Segmenter.from_onnx`` on an export made with
  ``export``), ``tensorrt``; fp32 everywhere, fp16/bf16 (autocast or engine precision) on CUDA.
  A backend that is unavailable or fails is listed with the reason instead of a number.

Every (backend, precision, mode) of one (model, batch) is timed side by side: each round calls
each of them once, in the same order; the reported figure is the median over rounds, so load that
comes and goes on a shared machine hits all alike and the ratios stay meaningful.

    python benchmarks/speed.py                          # everything available, default device
    python benchmarks/speed.py --quick                  # batch 1, few rounds
    python benchmarks/speed.py --device cuda --models r50_fpn --backends torch torch.compile

Writes ``benchmarks/results/speed.json`` and ``speed.md`` (``speed_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    interleaved_times,
    machine_info,
    machine_markdown,
    markdown_table,
    summarize,
    write_results,
)
from serving import InferenceConfig, ModelConfig, Segmenter, build_condinst  # noqa: E402
from serving.inference.postprocess import detect  # noqa: E402
from serving.inference.transforms import preprocess  # noqa: E402
from serving.model.model_file import new_card, save_checkpoint  # noqa: E402

#: name -> (ModelConfig fields, image (height, width), min_size, max_size)
MODELS: dict[str, tuple[dict[str, Any], tuple[int, int], int, int]] = {
    "mobilenet_v2_fpn": ({"backbone": "mobilenet_v2", "freeze_at": 2}, (512, 512), 512, 512),
    "r50_fpn": ({"backbone": "resnet50"}, (800, 1333), 800, 1333),
}
BACKENDS = ("torch", "torch.compile", "onnxruntime", "tensorrt")
NUM_CLASSES = 80
NUM_PROMPTS = 10
TARGET_DETECTIONS = 75  # the calibration aims here (50-100 accepted)
BOX_BIAS = 1.0  # box regression bias: boxes ~2 strides per side


class Skip(Exception):
    """A backend/precision that cannot run here; the message is the reason."""


# --------------------------------------------------------------------------- inputs
def bench_image(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8: smooth random colour fields with a few flat-coloured rectangles."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    low = rng.integers(0, 256, (max(h // 32, 2), max(w // 32, 2), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(low).resize((w, h), Image.BILINEAR)).copy()
    for _ in range(12):
        y0, x0 = int(rng.integers(0, h - 16)), int(rng.integers(0, w - 16))
        y1 = min(h, y0 + int(rng.integers(16, h // 3)))
        x1 = min(w, x0 + int(rng.integers(16, w // 3)))
        img[y0:y1, x0:x1] = rng.integers(0, 256, 3, dtype=np.uint8)
    return img


def prompt_boxes(size: tuple[int, int], count: int = NUM_PROMPTS, seed: int = 0) -> np.ndarray:
    """(count, 4) float32 XYXY boxes of 24 px to half the image side, inside the image."""
    rng = np.random.default_rng(seed + 1)
    h, w = size
    bw = rng.uniform(24, w / 2, count)
    bh = rng.uniform(24, h / 2, count)
    x0 = rng.uniform(0, w - bw)
    y0 = rng.uniform(0, h - bh)
    return np.stack([x0, y0, x0 + bw, y0 + bh], axis=1).astype(np.float32)


def build_checkpoint(name: str, work: Path, seed: int = 0) -> tuple[Path, dict[str, Any]]:
    """A random-weight checkpoint whose automatic mode finds ~50-100 instances on the image."""
    fields, size, min_size, max_size = MODELS[name]
    path = work / f"{name}_s{seed}.safetensors"
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        return path, json.loads(meta_path.read_text())
    torch.manual_seed(seed)
    cfg = ModelConfig(num_classes=NUM_CLASSES, **fields)
    model = build_condinst(cfg).eval()
    infer = InferenceConfig(min_size=min_size, max_size=max_size)
    with torch.inference_mode():
        model.head.bbox_pred.bias.fill_(BOX_BIAS)
        batch, valid, sizes = preprocess([bench_image(size, seed)], min_size, max_size)
        out = model(model.normalize(batch, valid))
        image_sizes = torch.tensor(sizes)

        def count(delta: float) -> int:
            shifted = out._replace(cls_logits=out.cls_logits + delta)
            return int(detect(model, shifted, image_sizes, infer).num[0])

        lo, hi = -10.0, 20.0  # bisection on a bias shift: count grows with the shift
        for _ in range(14):
            mid = (lo + hi) / 2
            if count(mid) >= TARGET_DETECTIONS:
                hi = mid
            else:
                lo = mid
        model.head.cls_logits.bias += hi
    with torch.inference_mode():
        out = model(model.normalize(batch, valid))
        found = int(detect(model, out, image_sizes, infer).num[0])
    names = [f"class{i}" for i in range(NUM_CLASSES)]
    save_checkpoint(path, model, new_card(cfg, names, infer,
                                          benchmark="random weights, calibrated class bias"))
    meta = {"cls_bias_shift": hi, "detections_on_image": found, "box_bias": BOX_BIAS}
    meta_path.write_text(json.dumps(meta))
    return path, meta


# --------------------------------------------------------------------------- backends
@dataclass
class Variant:
    backend: str
    dtype: str
    device: str
    segmenter: Segmenter | None = None
    reason: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.backend}/{self.dtype}"


_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def _export_module() -> Any:
    """The project's export package, imported lazily (it may not exist in every checkout)."""
    try:
        import export  # noqa: PLC0415
    except Exception as exc:  # noqa: BLE001 - any import failure means no export available
        raise Skip(f"export package not importable ({type(exc).__name__}: {exc})") from None
    return export


def _export_onnx(checkpoint: Path, out_dir: Path) -> Path:
    """Export the checkpoint with ``export.export_onnx`` (once per folder); the sidecar path."""
    export = _export_module()
    fn = getattr(export, "export_onnx", None)
    if fn is None:
        raise Skip("export.export_onnx does not exist in this checkout")
    sidecar = out_dir / f"{checkpoint.stem}.json"
    if not sidecar.is_file():
        sidecar = Path(fn(checkpoint, out_dir).sidecar)
    return sidecar


def make_variant(backend: str, dtype: str, device: str, checkpoint: Path,
                 work: Path) -> Variant:
    """Load one backend/precision, or a Variant with the reason it cannot run."""
    v = Variant(backend, dtype, device)
    try:
        if dtype != "fp32" and not device.startswith("cuda"):
            raise Skip(f"{dtype} is benchmarked on CUDA only")
        if backend in ("torch", "torch.compile"):
            v.segmenter = Segmenter.from_checkpoint(checkpoint, device=device,
                                                    dtype=_DTYPES[dtype])
            if backend == "torch.compile":
                v.segmenter.backend.model.compile()  # compiles on the first call (warm-up)
                v.notes.append("torch.compile(default mode) on the network; mask head and "
                               "post-processing eager")
        elif backend == "onnxruntime":
            if importlib.util.find_spec("onnxruntime") is None:
                raise Skip("onnxruntime is not installed")
            if dtype != "fp32":
                raise Skip("the ONNX export is fp32")
            sidecar = _export_onnx(checkpoint, work / "onnx")
            v.segmenter = Segmenter.from_onnx(sidecar, device=device)
            v.notes.append("export.export_onnx defaults (dynamic batch and size)")
        elif backend == "tensorrt":
            if importlib.util.find_spec("tensorrt") is None:
                raise Skip("tensorrt is not installed (no wheel with its libraries here)")
            if not device.startswith("cuda"):
                raise Skip("TensorRT needs a CUDA device")
            export = _export_module()
            fn = getattr(export, "build_tensorrt_engine", None)
            if fn is None:
                raise Skip("export.build_tensorrt_engine does not exist in this checkout")
            sidecar = _export_onnx(checkpoint, work / f"trt_{dtype}")  # engines sit beside it
            fn(sidecar, fp16=dtype == "fp16")
            v.segmenter = Segmenter.from_tensorrt(sidecar)
        else:
            raise Skip(f"unknown backend {backend}")
    except Skip as exc:
        v.reason = str(exc)
    except Exception as exc:  # noqa: BLE001 - record any failure, keep benchmarking the rest
        v.reason = f"failed to load: {type(exc).__name__}: {exc}".splitlines()[0]
    return v


def variants_for(args: argparse.Namespace, device: str) -> list[tuple[str, str]]:
    dtypes = ["fp32"] + (["fp16", "bf16"] if device.startswith("cuda") else [])
    if args.dtypes:
        dtypes = args.dtypes
    pairs = []
    for backend in args.backends:
        for dtype in dtypes:
            if backend == "onnxruntime" and dtype != "fp32":
                continue
            if backend == "tensorrt" and dtype == "bf16":
                continue
            pairs.append((backend, dtype))
    return pairs


# --------------------------------------------------------------------------- timing
def _call(seg: Segmenter, images: list[np.ndarray], prompts: list[np.ndarray] | None,
          batch: int) -> Callable[[], Any]:
    """One timed unit: ``predict_batch`` of the whole list (automatic when ``prompts`` is None)."""
    return lambda: seg.predict_batch(images, boxes=prompts, batch_size=batch)


def _recorder(store: dict[str, list[int]]) -> Callable[[str, Any], None]:
    """Collects the mean number of instances per image of each call."""
    def record(key: str, preds: Any) -> None:
        store.setdefault(key, []).append(sum(len(p) for p in preds) // max(len(preds), 1))
    return record


def bench_model(name: str, args: argparse.Namespace, device: str, work: Path,
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    fields, size, _, _ = MODELS[name]
    checkpoint, meta = build_checkpoint(name, work, args.seed)
    image = bench_image(size, args.seed)
    boxes = prompt_boxes(size, NUM_PROMPTS, args.seed)
    variants = [make_variant(b, d, device, checkpoint, work) for b, d in variants_for(args, device)]
    rows: list[dict[str, Any]] = []
    base = {"model": name, "input": f"{size[1]}x{size[0]}", "device": device}
    for v in variants:
        if v.segmenter is None:
            rows.append({**base, "backend": v.backend, "dtype": v.dtype, "status": "skipped",
                         "reason": v.reason})
    live = [v for v in variants if v.segmenter is not None]
    for batch in args.batches:
        images = [image] * batch
        prompts = [boxes] * batch
        calls: dict[str, Callable[[], Any]] = {}
        for v in live:
            calls[f"{v.key}/auto"] = _call(v.segmenter, images, None, batch)
            calls[f"{v.key}/prompt"] = _call(v.segmenter, images, prompts, batch)
        failed: dict[str, str] = {}
        for key, fn in list(calls.items()):  # first call: compile/build, and catch failures
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - e.g. torch.compile without a toolchain
                failed[key] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                if args.verbose:
                    traceback.print_exc()
                del calls[key]
        dets: dict[str, list[int]] = {}
        record = _recorder(dets)
        print(f"{name} batch {batch}: timing {list(calls)} x {args.rounds} rounds",
              file=sys.stderr)
        times = interleaved_times(calls, args.rounds, max(args.warmup - 1, 0), device, record)
        for v in live:
            for mode in ("auto", "prompt"):
                key = f"{v.key}/{mode}"
                row = {**base, "backend": v.backend, "dtype": v.dtype, "batch": batch,
                       "mode": mode}
                if key in failed:
                    rows.append({**row, "status": "failed", "reason": failed[key]})
                    continue
                s = summarize(times[key])
                rows.append({**row, "status": "ok", **s,
                             "ms_per_image": s["median_ms"] / batch,
                             "images_per_s": 1000.0 * batch / s["median_ms"],
                             "instances_per_image": statistics.median(dets.get(key, [0])),
                             "notes": v.notes})
            ka, kp = f"{v.key}/auto", f"{v.key}/prompt"
            if ka in times and kp in times:
                rows[-1]["prompt_over_auto"] = (statistics.median(times[kp])
                                                / statistics.median(times[ka]))
                rows[-1]["prompt_over_auto_per_round"] = statistics.median(
                    p / a for p, a in zip(times[kp], times[ka]))
    for v in variants:
        v.segmenter = None
    gc.collect()
    return rows, {"checkpoint": str(checkpoint), **meta}


# --------------------------------------------------------------------------- report
def report(result: dict[str, Any]) -> str:
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    table = {}
    for r in ok:
        table.setdefault((r["model"], r["input"], r["batch"], r["backend"], r["dtype"],
                          r["device"]), {})[r["mode"]] = r
    rows = []
    for (model, inp, batch, backend, dtype, device), modes in table.items():
        a, p = modes.get("auto"), modes.get("prompt")
        rows.append([model, inp, batch, backend, dtype, device,
                     a and a["median_ms"], a and a["images_per_s"],
                     a and a["instances_per_image"], p and p["median_ms"],
                     p and p["images_per_s"], p and p.get("prompt_over_auto")])
    lines = [
        f"# Inference speed, end to end ({result['mode']})", "",
        machine_markdown(result["machine"]), "",
        "Each call is `Segmenter.predict_batch` on in-memory RGB arrays: preprocessing, network, "
        "post-processing and boolean masks at the original size. Random weights (class bias "
        f"calibrated to ~{TARGET_DETECTIONS} detections, at most 100); prompt mode = "
        f"{NUM_PROMPTS} boxes per image. Variants of one (model, batch) are timed side by side, "
        f"{result['rounds']} rounds after {result['warmup']} warm-up round(s); medians. Latency "
        "is per call (a whole batch).", "",
        markdown_table(["model", "input", "batch", "backend", "dtype", "device", "auto ms",
                        "auto img/s", "instances", "prompt ms", "prompt img/s",
                        "prompt/auto"], rows), "",
    ]
    ratios = [[r["model"], r["batch"], r["backend"], r["dtype"], r["prompt_over_auto"],
               r["prompt_over_auto_per_round"]] for r in ok if "prompt_over_auto" in r]
    if ratios:
        lines += ["## Box-prompted (10 boxes) latency / automatic latency (target <= 1.15)", "",
                  markdown_table(["model", "batch", "backend", "dtype", "ratio of medians",
                                  "median of per-round ratios"], ratios), ""]
    other = [r for r in result["rows"] if r["status"] != "ok"]
    if other:
        lines += ["## Not measured", ""]
        seen = set()
        for r in other:
            key = (r["model"], r["backend"], r["dtype"], r.get("batch"), r.get("mode"),
                   r["reason"])
            if key in seen:
                continue
            seen.add(key)
            where = f" batch {r['batch']} {r['mode']}" if r.get("batch") else ""
            lines.append(f"- {r['model']} {r['backend']} {r['dtype']}{where}: {r['status']}: "
                         f"{r['reason']}")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--dtypes", nargs="+", choices=list(_DTYPES), default=None,
                   help="default: fp32 (+ fp16 bf16 on CUDA)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--batches", nargs="+", type=int, default=None, help="default: 1 8")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds, the first included")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch CPU threads (default: all cores)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True (fixed input sizes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=None,
                   help="checkpoints and exports (default: a temporary folder)")
    p.add_argument("--quick", action="store_true", help="batch 1, 2 rounds, 1 warm-up")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.batches is None:
        args.batches = [1] if args.quick else [1, 8]
    if args.rounds is None:
        args.rounds = 2 if args.quick else 5
    if args.quick:
        args.warmup = 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="speed_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    models: dict[str, Any] = {}
    for name in args.models:
        model_rows, meta = bench_model(name, args, args.device, work)
        rows += model_rows
        models[name] = meta
    result = {
        "mode": "quick" if args.quick else "full",
        "machine": machine_info(torch.device(args.device)),
        "device": args.device, "rounds": args.rounds, "warmup": args.warmup,
        "threads": args.threads, "cudnn_benchmark": args.cudnn_benchmark,
        "weights": "random (class bias calibrated for 50-100 detections)",
        "models": models, "rows": rows,
    }
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results"
    stem = "speed_quick" if args.quick else "speed"
    write_results(out, stem, result, report(result))
    print(f"wrote {out / stem}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
