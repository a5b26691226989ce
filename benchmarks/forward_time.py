"""Network forward time (no post-processing) of the two reference architectures on this machine.

    python benchmarks/forward_time.py [--reps 5] [--threads N]

MobileNetV2-FPN at 512x512 and ResNet-50-FPN at 800x1344 (800x1333 padded to /32), batch 1,
random weights, fp32, ``torch.inference_mode``; median of ``--reps`` runs after one warm-up.
Writes ``benchmarks/results/forward_time.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving import ModelConfig, build_condinst  # noqa: E402

CASES = {
    "mobilenet_v2_fpn@512x512": (ModelConfig(backbone="mobilenet_v2"), (512, 512)),
    "resnet50_fpn@800x1333": (ModelConfig(backbone="resnet50"), (800, 1344)),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch "
                          f"{torch.__version__}, {args.threads} threads, load average "
                          f"{os.getloadavg()[0]:.1f} at start", "cases": {}}
    for name, (cfg, (h, w)) in CASES.items():
        model = build_condinst(cfg).eval()
        x = torch.randn(1, 3, h, w)
        times = []
        with torch.inference_mode():
            model(x)
            for _ in range(args.reps):
                start = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - start)
        results["cases"][name] = {"median_s": statistics.median(times), "min_s": min(times),
                                  "reps": args.reps}
        print(f"{name}: median {statistics.median(times):.3f} s, min {min(times):.3f} s")
    out = ROOT / "benchmarks" / "results" / "forward_time.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
