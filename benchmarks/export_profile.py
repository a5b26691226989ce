"""Where the CPU time goes: PyTorch eager vs ONNX Runtime, per operator type (not a test).

``benchmarks/export_speed.py`` measures the end-to-end ratio; this script explains it. For the
same random-weight model as that benchmark (80 classes, the paper's FPN 256 / 4-conv towers) it
profiles the network forward of both backends on one image:

- PyTorch eager with ``torch.profiler`` (self CPU time per ``aten::`` op),
- ONNX Runtime (automatic graph, ``ORT_ENABLE_ALL``) with its built-in node profiler (kernel
  time per ONNX op type),

and counts the multiply-adds of every convolution (forward hooks). It reports the share of the
convolutions in each backend, their throughput in GFLOP/s, and the **ceiling** of the ONNX
Runtime speed-up: ``torch forward / ORT convolution time``, the ratio ONNX Runtime would reach
if every other node cost nothing. Writes ``benchmarks/results/export_profile.{json,md}``.

    python benchmarks/export_profile.py --threads 2            # ~1 minute on 2 quiet cores
    python benchmarks/export_profile.py --case resnet50_fpn@800x1333 --runs 2
"""

from __future__ import annotations

import argparse
import collections
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

from common import machine_info, machine_markdown, markdown_table  # noqa: E402
from export_speed import CASES, make_checkpoint  # noqa: E402

from export import export_onnx  # noqa: E402
from serving import Segmenter  # noqa: E402

#: torch ops that are convolutions (oneDNN, or the fallback for small/odd shapes).
TORCH_CONV_OPS = ("aten::mkldnn_convolution", "aten::_slow_conv2d_forward",
                  "aten::thnn_conv2d", "aten::_convolution", "aten::convolution")


def conv_gflop(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Floating-point operations (2 x multiply-adds) of all ``nn.Conv2d`` in one forward."""
    total = [0]

    def hook(mod: torch.nn.Conv2d, _inp, out: torch.Tensor) -> None:
        k = mod.weight[0].numel()  # in_channels / groups * kh * kw
        total[0] += 2 * out.numel() * k

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, torch.nn.Conv2d)]
    with torch.inference_mode():
        model(x)
    for h in handles:
        h.remove()
    return total[0] / 1e9


def gemm_gflops(runs: int = 5, n: int = 2048) -> float:
    """Practical fp32 peak of this CPU at the current thread count: an ``n x n`` matmul."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(runs):
        a @ b
    return 2 * n**3 * runs / (time.perf_counter() - start) / 1e9


def profile_torch(model: torch.nn.Module, x: torch.Tensor, runs: int) -> dict:
    """Wall time and self CPU ms per op (per forward) of the eager network."""
    with torch.inference_mode():
        model(x)
        start = time.perf_counter()
        for _ in range(runs):
            model(x)
        wall = (time.perf_counter() - start) / runs
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                model(x)
    ops = {e.key: e.self_cpu_time_total / 1000 / runs for e in prof.key_averages()}
    conv = sum(v for k, v in ops.items() if k in TORCH_CONV_OPS)
    return {"wall_ms": 1000 * wall, "conv_ms": conv, "ops_ms": ops}


def profile_ort(onnx_path: Path, feed: dict, threads: int, runs: int, workdir: Path) -> dict:
    """Wall time and kernel ms per ONNX op type (per run) of an ONNX Runtime session."""
    import onnxruntime as ort

    def session(profiling: bool):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads
        if profiling:
            opts.enable_profiling = True
            opts.profile_file_prefix = str(workdir / "ort_profile")
        return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])

    plain = session(False)
    plain.run(None, feed)
    start = time.perf_counter()
    for _ in range(runs):
        plain.run(None, feed)
    wall = (time.perf_counter() - start) / runs
    prof = session(True)
    prof.run(None, feed)  # warm-up, counted out below by taking the last `runs` runs
    for _ in range(runs):
        prof.run(None, feed)
    events = json.loads(Path(prof.end_profiling()).read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and
               e.get("name", "").endswith("_kernel_time")]
    per_run = len(kernels) // (runs + 1)
    ops: dict[str, float] = collections.defaultdict(float)
    for e in kernels[per_run:]:
        ops[e["args"]["op_name"]] += e["dur"] / 1000 / runs
    return {"wall_ms": 1000 * wall, "conv_ms": ops.get("Conv", 0.0), "ops_ms": dict(ops)}


def top(ops: dict[str, float], n: int = 6) -> str:
    total = sum(ops.values()) or 1.0
    return ", ".join(f"{k} {v:.0f} ms ({100 * v / total:.0f}%)"
                     for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:n])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="mobilenet_v2_fpn@512x512", choices=list(CASES))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--runs", type=int, default=5, help="forwards per measurement")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backbone, (h, w) = CASES[args.case]
    info = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        ckpt = make_checkpoint(backbone, (h, w), tmp_dir / "model.safetensors")
        exported = export_onnx(ckpt, tmp_dir / "onnx", check_tensorrt=False)
        model = Segmenter.from_checkpoint(ckpt, device="cpu").backend.model
        image = np.random.default_rng(1).uniform(0, 255, (1, 3, h, w)).astype(np.float32)
        # Both backends get the batch as Segmenter builds it: padded to a multiple of 32 (the
        # ONNX graph normalises in-graph, so both run the same convolutions).
        ph, pw = -(-h // 32) * 32, -(-w // 32) * 32
        image = np.pad(image, ((0, 0), (0, 0), (0, ph - h), (0, pw - w)))
        x = torch.from_numpy(image)
        gflop = conv_gflop(model, x)
        peak = gemm_gflops()
        torch_prof = profile_torch(model, x, args.runs)
        feed = {"images": image, "image_sizes": np.array([[h, w]], dtype=np.int64)}
        ort_prof = profile_ort(exported.graphs["automatic"], feed, args.threads, args.runs, tmp_dir)
    ceiling = torch_prof["wall_ms"] / ort_prof["conv_ms"]
    result = {
        "case": args.case, "threads": args.threads, "runs": args.runs, "machine": info,
        "conv_gflop": round(gflop, 2), "gemm_gflops": peak,
        "torch": {**torch_prof, "conv_gflops": gflop / torch_prof["conv_ms"] * 1000},
        "onnxruntime": {**ort_prof, "conv_gflops": gflop / ort_prof["conv_ms"] * 1000},
        "forward_speedup": torch_prof["wall_ms"] / ort_prof["wall_ms"],
        "speedup_ceiling_if_only_conv": ceiling,
    }
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    stem = "export_profile" + ("" if args.case == "mobilenet_v2_fpn@512x512" else "_r50")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    rows = [[name, round(p["wall_ms"]), round(p["conv_ms"]),
             f"{100 * p['conv_ms'] / p['wall_ms']:.0f}%", round(gflop / p["conv_ms"] * 1000),
             f"{100 * gflop / p['conv_ms'] * 1000 / peak:.0f}%"]
            for name, p in (("torch eager", torch_prof), ("onnxruntime", ort_prof))]
    text = "\n\n".join([
        f"# Network forward, per operator: PyTorch eager vs ONNX Runtime ({args.case})",
        machine_markdown(info),
        f"Command: `python benchmarks/export_profile.py --case {args.case} --threads "
        f"{args.threads} --runs {args.runs}`. Network forward only (batch 1, random weights; "
        f"ONNX Runtime runs the automatic graph incl. its in-graph pre/post-processing and NMS). "
        f"Convolutions: {gflop:.1f} GFLOP per forward. The CPU's practical fp32 peak, a "
        f"2048x2048 matmul at the same thread count: **{peak:.0f} GFLOP/s**.",
        markdown_table(["backend", "forward ms", "conv ms", "conv share", "conv GFLOP/s",
                        "% of matmul peak"], rows),
        f"Forward speed-up of ONNX Runtime: **{result['forward_speedup']:.2f}x**. Ceiling if "
        f"every non-convolution node were free (torch forward / ORT conv time): "
        f"**{ceiling:.2f}x**.",
        f"Top ops, torch: {top(torch_prof['ops_ms'])}.",
        f"Top ops, onnxruntime: {top(ort_prof['ops_ms'])}.",
    ])
    (out / f"{stem}.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
