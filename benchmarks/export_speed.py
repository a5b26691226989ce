"""CPU latency by backend and precision: PyTorch fp32 / bf16, ONNX Runtime fp32 / INT8 (not a test).

Three models with **random weights** (the class-logit bias is raised so every image keeps
``max_detections`` = 100 detections, the post-processing load of a trained model at score
threshold 0.05): MobileNetV2-FPN at 512x512 and ResNet-50-FPN at 800x1333 with the paper's
heads (FPN 256, 4-conv towers, 80 classes), and the quickstart's light heads (FPN 64, 2-conv
towers, 6 classes, ``configs/quickstart_cpu.yaml``) at 256x256. Each model is exported once
and quantised to INT8 (calibrated on ``--calibration-count`` noise images: with random weights
the calibration data only has to exist). Then, side by side in one process
(``benchmarks/common.py``: round r runs every variant once, A B C D A B C D ...), we time
``Segmenter.predict`` end to end in automatic mode and with 10 prompt boxes for:

    torch fp32 | torch bf16 (autocast, where the CPU has bf16) | onnxruntime fp32 | onnxruntime int8

at the same thread count, plus each backend alone in both modes (``detect`` /
``segment_boxes``: the network and its in-graph post-processing, without the ``Segmenter``'s
preprocessing and mask pasting at the original size, which are the same for every backend);
end to end / backend alone is what the work outside the network adds (also per call: each
end-to-end call over the time its backend spent inside it). Reported: median ms
per image, the speed-ups (INT8 / fp32 ORT, bf16 / fp32 torch), the conv GFLOP/s each
reaches (the model's convolution FLOPs divided by the **end-to-end** time: a lower bound of
what its convolution kernels run at), the load average during the run, and INT8's
agreement with fp32 on the benchmark image. ``--ref REV`` adds the ONNX Runtime INT8
variant of the ``serving`` package of git revision REV (``ab_speed.import_ref``) on the same
graphs, interleaved with the others: its per-call end to end / backend beside today's, from
the same rounds (the results checked equal). ``--ref-graphs REV`` adds ONNX Runtime fp32 and
INT8 on the graphs that REV's ``export`` package makes of the same checkpoint (same
calibration images), run by today's ``Segmenter``: each backend alone and end to end today /
REV's graphs, per round. Writes
``benchmarks/results/export_speed.{json,md}``; on a shared machine rerun it when quiet:

    python benchmarks/export_speed.py                  # ~15 minutes on 2 busy cores
    python benchmarks/export_speed.py --rounds 10 --rounds-r50 3 --threads 2
    python benchmarks/export_speed.py --threads 2 --cases quickstart_light@256x256 \
        --backends onnxruntime --ref 9feb464
    python benchmarks/export_speed.py --threads 2 --backends onnxruntime --ref-graphs 66a039a
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    bootstrap_interval,
    identical_predictions,
    interleaved_times,
    interval_text,
    machine_info,
    machine_markdown,
    markdown_table,
    summarize,
    write_results,
)

from export import export_onnx  # noqa: E402
from export.quantize import quantize_export  # noqa: E402
from export.verify import compare_automatic, mask_iou  # noqa: E402
from export.verify_int8 import compare_int8  # noqa: E402
from serving import InferenceConfig, ModelConfig, Segmenter, build_condinst  # noqa: E402
from serving.backends.torch_backend import cpu_bf16_support  # noqa: E402
from serving.inference.transforms import scale_boxes  # noqa: E402
from serving.model.model_file import new_card, save_checkpoint  # noqa: E402

#: case -> (backbone, (height, width)); the quickstart case uses the quickstart's light heads.
CASES = {
    "mobilenet_v2_fpn@512x512": ("mobilenet_v2", (512, 512)),
    "quickstart_light@256x256": ("mobilenet_v2", (256, 256)),
    "resnet50_fpn@800x1333": ("resnet50", (800, 1333)),
}
LIGHT = {"quickstart_light@256x256"}
MODES = ("automatic", "prompt(10)", "automatic, backend only", "prompt(10), backend only")
#: End-to-end mode -> the same mode's backend alone (network + in-graph post-processing).
NETWORK_OF = {"automatic": "automatic, backend only", "prompt(10)": "prompt(10), backend only"}


def model_config(case: str, backbone: str) -> ModelConfig:
    """The paper's heads (80 classes), or the quickstart's light heads (its YAML, 6 classes)."""
    if case not in LIGHT:
        return ModelConfig(backbone=backbone, num_classes=80)
    light = yaml.safe_load((REPO / "configs" / "quickstart_cpu.yaml").read_text())["model"]
    light.pop("backbone_weights", None)
    return ModelConfig(**{**light, "num_classes": 6})


def make_checkpoint(backbone: str, size: tuple[int, int], path: Path,
                    cfg: ModelConfig | None = None) -> Path:
    """Random-weight checkpoint whose automatic mode keeps 100 detections."""
    torch.manual_seed(0)
    cfg = cfg or ModelConfig(backbone=backbone, num_classes=80)
    model = build_condinst(cfg).eval()
    with torch.no_grad():
        model.head.cls_logits.bias.fill_(1.0)
    infer = InferenceConfig(min_size=min(size), max_size=max(size), max_detections=100)
    names = [f"class{i}" for i in range(cfg.num_classes)]
    return save_checkpoint(path, model, new_card(cfg, names, infer))


def prompt_boxes(h: int, w: int, n: int = 10) -> np.ndarray:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 0.6, (n, 2)) * (w, h)
    wh = rng.uniform(0.1, 0.4, (n, 2)) * (w, h)
    return np.concatenate((xy, np.minimum(xy + wh, (w, h))), axis=1).astype(np.float32)


def conv_gflop(seg: Segmenter, h: int, w: int) -> float:
    """Convolution FLOPs (2 x multiply-adds) of one forward at the padded input size."""
    total = [0]

    def hook(mod: torch.nn.Conv2d, _inp, out: torch.Tensor) -> None:
        total[0] += 2 * out.numel() * mod.weight[0].numel()

    model = seg.backend.model
    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, torch.nn.Conv2d)]
    with torch.inference_mode():
        model(torch.zeros(1, 3, -(-h // 32) * 32, -(-w // 32) * 32))
    for handle in handles:
        handle.remove()
    return total[0] / 1e9


def agreement(ref: Segmenter, int8: Segmenter, image: np.ndarray, boxes: np.ndarray) -> dict:
    """INT8 vs fp32 ONNX Runtime on the benchmark image (random weights: a smoke check)."""
    a, b = ref.predict(image), int8.predict(image)
    row = compare_int8("bench", a, b, score=0.3)
    matched, box_diff, iou, _ = compare_automatic(a, b)
    pa, pb = ref.predict(image, boxes=boxes), int8.predict(image, boxes=boxes)
    return {"detections": [len(a), len(b)], "confident_matched": [row.matched_torch,
                                                                    row.torch_confident],
            "nearest_max_box_diff_px": box_diff,
            "prompt_mean_mask_iou": float(np.mean([mask_iou(x, y)
                                                   for x, y in zip(pa.masks, pb.masks)]))}


def calibration_images(folder: Path, size: tuple[int, int], count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def build_variants(name: str, args: argparse.Namespace, workdir: Path) -> tuple[dict, dict]:
    """Segmenters of one case: {label: Segmenter}, plus facts (export/quantise seconds)."""
    backbone, (h, w) = CASES[name]
    ckpt = make_checkpoint(backbone, (h, w), workdir / f"{backbone}.safetensors",
                           model_config(name, backbone))
    start = time.perf_counter()
    exported = export_onnx(ckpt, workdir / "onnx", check_tensorrt=False)
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    cal = calibration_images(workdir / "cal", (h, w), args.calibration_count)
    quantized = quantize_export(exported.sidecar, cal, count=args.calibration_count)
    quantize_s = time.perf_counter() - start
    segs = {}
    if "torch" in args.backends:
        segs["torch fp32"] = Segmenter.from_checkpoint(ckpt, device="cpu")
        if cpu_bf16_support() is not None:
            segs["torch bf16"] = Segmenter.from_checkpoint(ckpt, device="cpu", dtype="bf16")
    segs["onnxruntime fp32"] = Segmenter.from_onnx(exported.sidecar, device="cpu",
                                                   threads=args.threads)
    segs["onnxruntime int8"] = Segmenter.from_onnx(quantized.sidecar, device="cpu",
                                                   threads=args.threads)
    if args.ref_module is not None:
        segs[ref_label(args)] = args.ref_module.Segmenter.from_onnx(
            quantized.sidecar, device="cpu", threads=args.threads)
    if args.ref_graphs is not None:
        from ab_speed import export_with
        old = export_with(args.ref_code, ckpt, workdir / "ref_onnx", cal, args.calibration_count)
        for precision, suffix in (("fp32", ""), ("int8", ".int8")):
            segs[f"onnxruntime {precision}, {args.ref_graphs} graphs"] = Segmenter.from_onnx(
                old / f"{ckpt.stem}{suffix}.json", device="cpu", threads=args.threads)
    facts = {"export_seconds": round(export_s, 1), "quantize_seconds": round(quantize_s, 1),
             "conv_gflop": round(conv_gflop(Segmenter.from_checkpoint(ckpt, device="cpu"), h, w),
                                 2)}
    return segs, facts


def graphs_comparison(times: dict[str, list[float]], ref: str) -> dict[str, Any]:
    """Today's graphs over ``ref``'s, ONNX Runtime fp32 and INT8, every variant: the median
    of the per-round time ratios with its 95 % bootstrap interval (below 1: faster today)."""
    out: dict[str, Any] = {}
    for precision in ("fp32", "int8"):
        for mode in MODES:
            ratio = (np.array(times[f"onnxruntime {precision} | {mode}"])
                     / np.array(times[f"onnxruntime {precision}, {ref} graphs | {mode}"]))
            out[f"{precision} {mode}"] = [_median(ratio),
                                          *bootstrap_interval((ratio,), _median)]
    return out


def ref_label(args: argparse.Namespace) -> str:
    return f"onnxruntime int8, {args.ref}"


class BackendClock:
    """Seconds a Segmenter's backend spends in ``detect`` / ``segment_boxes`` during each
    call of :meth:`timed` (the methods are wrapped on the backend instance): end to end over
    this, per call, is what the work outside the network adds, with the network's own
    call-to-call variation divided out."""

    def __init__(self, backend: object) -> None:
        self.inside = 0.0
        for method in ("detect", "segment_boxes"):
            setattr(backend, method, self._wrap(getattr(backend, method)))

    def _wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.inside += time.perf_counter() - start
        return timed

    def timed(self, fn: Callable[[], Any], ratios: list[float]) -> Callable[[], Any]:
        """``fn`` wrapped to append its wall time over its backend's time to ``ratios``."""
        def run() -> Any:
            self.inside, start = 0.0, time.perf_counter()
            result = fn()
            ratios.append((time.perf_counter() - start) / self.inside)
            return result
        return run


def run_case(name: str, rounds: int, args: argparse.Namespace, workdir: Path) -> dict:
    _, (h, w) = CASES[name]
    segs, facts = build_variants(name, args, workdir)
    image = np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)
    boxes = prompt_boxes(h, w)
    checks = agreement(segs["onnxruntime fp32"], segs["onnxruntime int8"], image, boxes)
    batch, _, sizes = segs["onnxruntime fp32"]._preprocess([image])
    scaled = torch.from_numpy(scale_boxes(boxes, (h, w), sizes[0]))[None]
    no_labels = torch.full((1, len(boxes)), -1, dtype=torch.int64)
    ref = segs.pop(ref_label(args), None)
    if ref is not None:  # the ref's results must be today's
        now = segs["onnxruntime int8"]
        facts["ref_same_results"] = all(
            identical_predictions(ref.predict(image, boxes=b), now.predict(image, boxes=b))
            for b in (None, boxes))
    variants, paired = {}, {}
    for label, seg in [*segs.items(), *([(ref_label(args), ref)] if ref is not None else [])]:
        clock = BackendClock(seg.backend)
        for mode, call in (("automatic", lambda s=seg: s.predict(image)),
                           ("prompt(10)", lambda s=seg: s.predict(image, boxes=boxes))):
            paired[f"{label} {mode}"] = []
            variants[f"{label} | {mode}"] = clock.timed(call, paired[f"{label} {mode}"])
        if seg is ref:
            continue
        # The backend alone (network + in-graph post-processing, no mask pasting): the part
        # that precision changes.
        variants[f"{label} | automatic, backend only"] = lambda s=seg: s.backend.detect(batch,
                                                                                          sizes)
        variants[f"{label} | prompt(10), backend only"] = lambda s=seg: s.backend.segment_boxes(
            batch, sizes, scaled, no_labels)
    loads = [os.getloadavg()[0]]
    with torch.inference_mode():
        # A pause after each call (outside the timing) lets the previous variant's idle
        # worker threads (ONNX Runtime and OpenMP spin before sleeping) stop competing.
        times = interleaved_times(variants, rounds=rounds, warmup=1,
                                  on_result=lambda *_: time.sleep(args.gap_ms / 1000))
    loads.append(os.getloadavg()[0])
    stats = {k: summarize(v) for k, v in times.items()}
    for value in stats.values():
        value["conv_gflops"] = facts["conv_gflop"] / value["median_ms"] * 1000
    speedup: dict[str, float] = {}
    graphs = [""] + ([f", {args.ref_graphs} graphs"] if args.ref_graphs else [])
    for mode in MODES:
        for stat, tag in (("median_ms", ""), ("min_ms", " (min)")):
            for g in graphs:
                speedup[f"int8/fp32 ort{g} {mode}{tag}"] = (
                    stats[f"onnxruntime fp32{g} | {mode}"][stat]
                    / stats[f"onnxruntime int8{g} | {mode}"][stat])
            if f"torch bf16 | {mode}" in stats:
                speedup[f"bf16/fp32 torch {mode}{tag}"] = (stats[f"torch fp32 | {mode}"][stat]
                                                           / stats[f"torch bf16 | {mode}"][stat])
    # What the work outside the backend adds: end to end / backend alone, per variant.
    overhead = {f"{label} {mode}": stats[f"{label} | {mode}"]["median_ms"]
                / stats[f"{label} | {alone}"]["median_ms"]
                for label in segs for mode, alone in NETWORK_OF.items()}
    if ref is not None:
        facts.update(ref_comparison(times, paired, ref_label(args)))
    if args.ref_graphs is not None:
        facts["graphs_today_over_ref"] = graphs_comparison(times, args.ref_graphs)
    # the same per call (the warm-up round dropped): network noise divided out
    paired_median = {k: float(np.median(v[1:])) for k, v in paired.items()}
    paired_interval = {k: bootstrap_interval((v[1:],), _median) for k, v in paired.items()}
    print(f"{name}: " + ", ".join(f"{k} {v:.2f}x" for k, v in speedup.items()), flush=True)
    print(f"{name}: end to end / backend alone: "
          + ", ".join(f"{k} {v:.2f}x" for k, v in overhead.items()), flush=True)
    return {"case": name, "image_size": [h, w], "rounds": rounds, **facts, "stats": stats,
            "speedup": speedup, "end_to_end_over_backend": overhead,
            "end_to_end_over_backend_paired": paired_median,
            "end_to_end_over_backend_paired_95": paired_interval, "int8_agreement": checks,
            "load_average_1m": loads,
            "ort_providers": segs["onnxruntime fp32"].info.get("providers")}


def _median(x: np.ndarray) -> float:
    return float(np.median(x))


def ref_comparison(times: dict[str, list[float]], paired: dict[str, list[float]],
                   ref: str) -> dict[str, Any]:
    """Today's ONNX Runtime INT8 against the ``ref`` variant, per round (paired): end to end
    today / ref, and the ms outside the backend (end to end x (1 - backend share)) of each,
    medians with 95 % bootstrap intervals. ``paired`` holds the warm-up call first."""
    out: dict[str, Any] = {}
    for mode in NETWORK_OF:
        labels = ("onnxruntime int8", ref)
        now_t, ref_t = (np.array(times[f"{label} | {mode}"]) for label in labels)
        now_out, ref_out = (1000 * t * (1 - 1 / np.array(paired[f"{label} {mode}"][1:]))
                            for t, label in zip((now_t, ref_t), labels))
        out[f"now_over_ref {mode}"] = _median(now_t / ref_t)
        out[f"now_over_ref {mode} 95"] = bootstrap_interval((now_t / ref_t,), _median)
        out[f"outside_ms {mode}"] = [_median(now_out), _median(ref_out)]
        out[f"outside_ms_now_minus_ref {mode}"] = _median(now_out - ref_out)
        out[f"outside_ms_now_minus_ref {mode} 95"] = bootstrap_interval((now_out - ref_out,),
                                                                         _median)
    return out


def overhead_table(payload: dict, key: str) -> str:
    """End to end over the backend (``key`` of each result: medians, or paired per call, with
    the 95 % bootstrap interval over the rounds where ``key``_95 holds it), a row per case and
    backend, a column per mode."""
    def cell(r: dict, name: str) -> str:
        interval = r.get(f"{key}_95", {}).get(name)
        if name not in r[key]:
            return ""
        return f"{r[key][name]:.2f}x" + (f" ({interval_text(interval)})" if interval else "")

    return markdown_table(["model @ input", "backend", *NETWORK_OF], [
        [r["case"], label, *[cell(r, f"{label} {m}") for m in NETWORK_OF]]
        for r in payload["results"] if key in r
        for label in dict.fromkeys(k.split(" | ")[0] for k in r["stats"])])


def markdown(payload: dict) -> str:
    rows = []
    for r in payload["results"]:
        for key, s in r["stats"].items():
            label, mode = key.split(" | ")
            base = "torch fp32" if label.startswith("torch") else "onnxruntime fp32"
            if label.endswith(" graphs"):  # a revision's graphs: against its own fp32
                base = label.replace("int8", "fp32")
            ratio = r["stats"][f"{base} | {mode}"]["median_ms"] / s["median_ms"]
            rows.append([r["case"], mode, label, s["median_ms"], s["min_ms"], s["max_ms"],
                         f"{ratio:.2f}x", round(s["conv_gflops"])])
    loads = [f"{r['case']}: {r['load_average_1m'][0]:.1f} -> {r['load_average_1m'][1]:.1f}"
             for r in payload["results"]]
    bf16 = payload["bf16_support"] or "none (bf16 rows skipped)"
    ref_graphs = payload.get("ref_graphs")
    return "\n\n".join([
        "# CPU latency: PyTorch fp32 / bf16 vs ONNX Runtime fp32 / INT8",
        machine_markdown(payload["machine"]), f"Command: `{payload['command']}`",
        f"Random weights (class bias raised: 100 detections per image), {payload['threads']} "
        f"threads for every backend, `Segmenter.predict` end to end (same preprocessing and "
        f"mask resizing), median of the rounds after one warm-up round, all variants "
        f"interleaved in one process (A B C D ... per round, {payload.get('gap_ms', 0):g} ms "
        f"untimed pause after each call). CPU bf16 instructions: {bf16}. "
        f"Ratios: against fp32 of the same runtime. conv GFLOP/s = the model's convolution "
        f"FLOPs / the row's median time. Load average (1 min) before -> after each case: "
        f"{'; '.join(loads)}; the machine is shared, so compare ratios, not absolute times.",
        "Speed-ups from the medians, and in brackets from the fastest round of each variant "
        "(less sensitive to other jobs on a shared machine); targets: INT8 ORT >= 2x fp32 ORT, "
        "bf16 torch >= 1.4x fp32 torch:",
        markdown_table(["model @ input", "ratio", *MODES], [
            [r["case"], ratio, *[f"{r['speedup'][f'{ratio} {m}']:.2f}x "
                                 f"({r['speedup'][f'{ratio} {m} (min)']:.2f}x)" for m in MODES]]
            for r in payload["results"] for ratio in ("int8/fp32 ort", "bf16/fp32 torch",
                                                      f"int8/fp32 ort, {ref_graphs} graphs")
            if f"{ratio} automatic" in r["speedup"]]),
        "End to end / the backend alone (the network and its in-graph post-processing), from "
        "the medians: what preprocessing, mask pasting at the original size and the rest of "
        "`Segmenter.predict` add:",
        overhead_table(payload, "end_to_end_over_backend"),
        "The same per call: each end-to-end call's time over the time its backend spent "
        "inside that call, median over the rounds (the network's call-to-call variation "
        "divided out), and in brackets its 95 % bootstrap interval over the rounds:",
        overhead_table(payload, "end_to_end_over_backend_paired"),
        *ref_lines(payload),
        *graphs_lines(payload),
        markdown_table(["model @ input", "mode", "backend", "median ms", "min ms", "max ms",
                        "vs fp32", "conv GFLOP/s"], rows),
    ])


def ref_lines(payload: dict) -> list[str]:
    """With ``--ref``: today's ONNX Runtime INT8 end to end over the ref's, per round."""
    ref = payload.get("ref")
    if ref is None:
        return []
    def interval(r: dict, key: str, digits: int) -> str:
        low, high = r[f"{key} 95"]
        return f"{r[key]:.{digits}f} ({low:.{digits}f} to {high:.{digits}f})"

    cells = [[r["case"], *[interval(r, f"now_over_ref {m}", 3) for m in NETWORK_OF],
              *[f"{r[f'outside_ms {m}'][1]:.1f} -> {r[f'outside_ms {m}'][0]:.1f}: "
                + interval(r, f"outside_ms_now_minus_ref {m}", 2) for m in NETWORK_OF],
              "yes" if r["ref_same_results"] else "**no**"] for r in payload["results"]]
    return [f"ONNX Runtime INT8, today's code against the `serving` package of {ref} "
            f"({payload['ref_commit'][:10]}) on the same graphs, in the same rounds: end to end "
            "today / ref, median of the per-round ratios (below 1: faster today); the ms per "
            "call outside the backend, ref -> today (medians): median of the per-round "
            "differences; 95 % bootstrap intervals in brackets; results equal (boxes, scores, "
            "labels, masks; both modes):",
            markdown_table(["model @ input", *[f"end to end, {m}" for m in NETWORK_OF],
                            *[f"ms outside, {m}" for m in NETWORK_OF], "same results"], cells)]


def graphs_lines(payload: dict) -> list[str]:
    """With ``--ref-graphs``: today's graphs over the revision's, per round."""
    ref = payload.get("ref_graphs")
    if ref is None:
        return []
    cells = [[r["case"], precision, *[
        f"{v[0]:.3f} ({v[1]:.3f} to {v[2]:.3f})"
        for v in (r["graphs_today_over_ref"][f"{precision} {m}"] for m in MODES)]]
        for r in payload["results"] for precision in ("fp32", "int8")]
    return [f"ONNX Runtime on today's graphs against those that the `export` package of {ref} "
            f"({payload['ref_graphs_commit'][:10]}) makes of the same checkpoint (INT8 "
            "calibrated on the same images), both run by today's `Segmenter`, in the same "
            "rounds: time today / time on the revision's graphs, median of the per-round "
            "ratios (below 1: faster today), 95 % bootstrap interval in brackets:",
            markdown_table(["model @ input", "precision", *MODES], cells)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (MobileNetV2 cases)")
    parser.add_argument("--rounds-r50", type=int, default=3, help="timed rounds, ResNet-50")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="threads for torch and ONNX Runtime")
    parser.add_argument("--calibration-count", type=int, default=8)
    parser.add_argument("--gap-ms", type=float, default=200.0,
                        help="untimed pause after every call (default 200 ms)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--backends", nargs="+", default=["torch", "onnxruntime"],
                        choices=["torch", "onnxruntime"],
                        help="runtimes to time (ONNX Runtime fp32 and INT8 always)")
    parser.add_argument("--ref", default=None,
                        help="git revision whose serving package runs beside (INT8 ORT)")
    parser.add_argument("--ref-graphs", default=None,
                        help="git revision whose export package's graphs run beside")
    parser.add_argument("--name", default="export_speed")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    payload = {"machine": machine_info(), "command": "python " + " ".join(sys.argv),
               "threads": args.threads, "exporter": "dynamo", "gap_ms": args.gap_ms,
               "bf16_support": cpu_bf16_support(),
               "weights": "random (class bias raised: 100 detections per image)", "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        args.ref_module = None
        if args.ref is not None:
            from ab_speed import commit_of, import_ref
            args.ref_module = import_ref(args.ref, Path(tmp) / "ref")
            payload.update(ref=args.ref, ref_commit=commit_of(args.ref))
        if args.ref_graphs is not None:
            from ab_speed import commit_of, revision_code
            args.ref_code = revision_code(args.ref_graphs, Path(tmp) / "ref_graphs")
            payload.update(ref_graphs=args.ref_graphs,
                           ref_graphs_commit=commit_of(args.ref_graphs))
        for name in args.cases:
            rounds = args.rounds_r50 if CASES[name][0] == "resnet50" else args.rounds
            payload["results"].append(run_case(name, rounds, args, Path(tmp) / name))
    write_results(Path(args.output), args.name, payload, markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
