"""ONNX Runtime vs PyTorch eager latency on the CPU (not a test).

Two models with **random weights** (no training needed; the class-logit bias is raised so every
image yields ``max_detections`` = 100 detections, the post-processing load of a trained model at
score threshold 0.05): MobileNetV2-FPN at 512x512 and ResNet-50-FPN at 800x1333, 80 classes,
the full architecture of the paper (FPN 256, 4-conv towers). Each model is exported once; then,
side by side in one process (``benchmarks/common.py``: round r runs every variant once), we
time ``Segmenter.predict`` in automatic mode and with 10 prompt boxes, PyTorch eager vs ONNX
Runtime, same thread count. Reported: median ms per image and the speed-up, plus the parity of
the two backends on the benchmark image. Writes ``benchmarks/results/export_speed.{json,md}``.

    python benchmarks/export_speed.py                  # ~10 minutes on 2 busy cores
    python benchmarks/export_speed.py --rounds 10 --rounds-r50 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    interleaved_times,
    machine_info,
    machine_markdown,
    markdown_table,
    summarize,
)

from export import export_onnx  # noqa: E402
from export.verify import compare_automatic, mask_iou  # noqa: E402
from serving import InferenceConfig, ModelConfig, Segmenter, build_condinst  # noqa: E402
from serving.model.checkpoint import save_checkpoint  # noqa: E402

CASES = {
    "mobilenet_v2_fpn@512x512": ("mobilenet_v2", (512, 512)),
    "resnet50_fpn@800x1333": ("resnet50", (800, 1333)),
}


def make_checkpoint(backbone: str, size: tuple[int, int], path: Path) -> Path:
    """Random-weight 80-class checkpoint whose automatic mode keeps 100 detections."""
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, num_classes=80)
    model = build_condinst(cfg).eval()
    with torch.no_grad():
        model.head.cls_logits.bias.fill_(1.0)
    infer = InferenceConfig(min_size=min(size), max_size=max(size), max_detections=100)
    return save_checkpoint(path, model, cfg, [f"class{i}" for i in range(80)], infer)


def prompt_boxes(h: int, w: int, n: int = 10) -> np.ndarray:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 0.6, (n, 2)) * (w, h)
    wh = rng.uniform(0.1, 0.4, (n, 2)) * (w, h)
    return np.concatenate((xy, np.minimum(xy + wh, (w, h))), axis=1).astype(np.float32)


def parity(ref_seg: Segmenter, ort_seg: Segmenter, image: np.ndarray,
           boxes: np.ndarray) -> dict:
    ref, got = ref_seg.predict(image), ort_seg.predict(image)
    matched, box_diff, iou, score_diff = compare_automatic(ref, got)
    pref, pgot = ref_seg.predict(image, boxes=boxes), ort_seg.predict(image, boxes=boxes)
    return {"automatic": {"torch": len(ref), "onnx": len(got), "matched": matched,
                          "max_box_diff_px": box_diff, "min_mask_iou": iou,
                          "max_score_diff": score_diff},
            "prompt": {"boxes": len(boxes),
                       "min_mask_iou": min(mask_iou(a, b) for a, b in zip(pref.masks, pgot.masks)),
                       "max_score_diff": float(np.abs(pref.scores - pgot.scores).max())}}


def run_case(name: str, backbone: str, size: tuple[int, int], rounds: int, threads: int,
             workdir: Path) -> dict:
    h, w = size
    ckpt = make_checkpoint(backbone, size, workdir / f"{backbone}.safetensors")
    start = time.perf_counter()
    result = export_onnx(ckpt, workdir / backbone, check_tensorrt=False)
    export_s = time.perf_counter() - start
    torch_seg = Segmenter.from_checkpoint(ckpt, device="cpu")
    ort_seg = Segmenter.from_onnx(result.sidecar, device="cpu", threads=threads)
    image = np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)
    boxes = prompt_boxes(h, w)
    checks = parity(torch_seg, ort_seg, image, boxes)
    variants = {
        "torch automatic": lambda: torch_seg.predict(image),
        "onnxruntime automatic": lambda: ort_seg.predict(image),
        "torch prompt(10)": lambda: torch_seg.predict(image, boxes=boxes),
        "onnxruntime prompt(10)": lambda: ort_seg.predict(image, boxes=boxes),
    }
    with torch.inference_mode():
        times = interleaved_times(variants, rounds=rounds, warmup=1)
    stats = {k: summarize(v) for k, v in times.items()}
    speedup = {mode: stats[f"torch {mode}"]["median_ms"] / stats[f"onnxruntime {mode}"]["median_ms"]
               for mode in ("automatic", "prompt(10)")}
    print(f"{name}: " + ", ".join(f"{k} {v['median_ms']:.0f} ms" for k, v in stats.items())
          + f"; speed-up {speedup}", flush=True)
    return {"case": name, "backbone": backbone, "image_size": [h, w], "rounds": rounds,
            "export_seconds": round(export_s, 1), "stats": stats, "speedup": speedup,
            "parity": checks, "ort_providers": ort_seg.info.get("providers")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds, MobileNetV2")
    parser.add_argument("--rounds-r50", type=int, default=3, help="timed rounds, ResNet-50")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="threads for both torch and ONNX Runtime")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = machine_info()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            backbone, size = CASES[name]
            rounds = args.rounds_r50 if backbone == "resnet50" else args.rounds
            results.append(run_case(name, backbone, size, rounds, args.threads, Path(tmp)))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "threads": args.threads, "exporter": "dynamo",
               "weights": "random (class bias raised: 100 detections per image)",
               "results": results}
    (out / "export_speed.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    rows = []
    for r in results:
        for mode in ("automatic", "prompt(10)"):
            t = r["stats"][f"torch {mode}"]["median_ms"]
            o = r["stats"][f"onnxruntime {mode}"]["median_ms"]
            rows.append([r["case"], mode, t, o, r["speedup"][mode], r["rounds"]])
    par = [[r["case"], r["parity"]["automatic"]["torch"], r["parity"]["automatic"]["onnx"],
            r["parity"]["automatic"]["matched"], r["parity"]["automatic"]["max_box_diff_px"],
            r["parity"]["automatic"]["min_mask_iou"], r["parity"]["prompt"]["min_mask_iou"]]
           for r in results]
    text = "\n\n".join([
        "# ONNX Runtime vs PyTorch eager, CPU", machine_markdown(info),
        f"Random weights (class bias raised so each image keeps 100 detections), 80 classes, "
        f"{args.threads} threads for both backends, `Segmenter.predict` end to end (same "
        f"preprocessing and mask resizing), median of the rounds after one warm-up round, "
        "variants interleaved; exporter: dynamo (python -m export's default).",
        markdown_table(["model @ input", "mode", "torch eager ms", "onnxruntime ms",
                        "speed-up", "rounds"], rows),
        "Parity on the benchmark image:",
        markdown_table(["model", "torch dets", "onnx dets", "matched", "max box diff px",
                        "min mask IoU (auto)", "min mask IoU (prompt)"], par),
    ])
    (out / "export_speed.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
