"""Auto-labelling throughput with 1, 2 (and 4) processes, and how the work is shared.

A folder of ``--images`` synthetic images whose box count grows along the file list (2 to ~40
boxes: the images at the end cost more, as in real datasets where a sorted list is rarely
uniform) is labelled by ``sim label`` with a random-weight model of the quickstart's
architecture (MobileNetV2-FPN, light heads, 256 px), one torch thread per process. Each
configuration is a whole command, start-up included, run as a user runs it:

- ``processes``: 1, 2 (and 4 when the machine has 4 cores or ``--processes`` asks);
- ``share``: how the images are split: ``interleaved`` (the product's: every N-th image),
  ``contiguous`` (blocks, like ``accelerate``'s ``split_between_processes``) and ``queue``
  (claimed in chunks of 2 from a shared queue); see benchmarks/label_scale_worker.py.

Configurations are run round-robin (A B C A B C ...) and reported by their median, so load that
comes and goes hits all alike. Reported: wall time, images/s and its ratio to one process, the
same with each configuration's start-up (the same command on 2 images, timed in the same
round) taken off, the idle share (how long processes wait for the slowest, from their logs'
end marks) and whether the output is byte-identical to the one-process output (batch size 1).

    python benchmarks/label_scale.py                       # 96 images, 1 and 2 processes
    python benchmarks/label_scale.py --processes 1 2 4 --rounds 3

Writes ``benchmarks/results/label_scale.json`` and ``label_scale.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.common import (  # noqa: E402
    machine_info,
    machine_markdown,
    markdown_table,
    write_results,
)
from serving import InferenceConfig, ModelConfig, build_condinst  # noqa: E402
from serving.model.model_file import new_card, save_checkpoint  # noqa: E402

CLASSES = ("a", "b", "c")
#: processes -> the machine's parallel ceiling measured in each round (see parallel_ceiling).
CEILING: dict[int, list[float]] = {}


def make_model(path: Path) -> Path:
    """A random-weight model with the quickstart's architecture and input size."""
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="mobilenet_v2", num_classes=len(CLASSES), fpn_channels=64,
                      head_convs=2, mask_branch_channels=32, mask_branch_convs=2)
    save_checkpoint(path, build_condinst(cfg),
                    new_card(cfg, CLASSES, InferenceConfig(min_size=256, max_size=256)))
    return path


def make_dataset(root: Path, count: int) -> Path:
    """``count`` 320x384 images of rectangles; image i has 2 + 40 i / count boxes."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(count):
        img = np.full((320, 384, 3), 60, np.uint8)
        for _ in range(2 + (40 * i) // count):
            x, y = int(rng.integers(0, 330)), int(rng.integers(0, 270))
            w, h = int(rng.integers(12, 54)), int(rng.integers(12, 50))
            img[y:y + h, x:x + w] = rng.integers(80, 255, 3)
            anns.append({"id": len(anns) + 1, "image_id": i + 1,
                         "category_id": int(rng.integers(1, 4)), "bbox": [x, y, w, h],
                         "iscrowd": 0})
        name = f"img_{i:04d}.png"
        Image.fromarray(img).save(root / "images" / name)
        images.append({"id": i + 1, "file_name": name, "height": 320, "width": 384})
    path = root / "boxes.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [
        {"id": k + 1, "name": n} for k, n in enumerate(CLASSES)]}))
    return path


def _burn(n: int) -> None:
    x = 0
    for i in range(n):
        x += i * i


def parallel_ceiling(processes: int, n: int = 20_000_000) -> float:
    """How much more pure-Python work ``processes`` processes get done than one, in the same
    time: the most any multi-process run can gain on this machine (2.0 on two free cores)."""
    import multiprocessing as mp

    def run(k: int) -> float:
        procs = [mp.Process(target=_burn, args=(n,)) for _ in range(k)]
        start = time.perf_counter()
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        return time.perf_counter() - start

    one, many = run(1), run(processes)
    return round(processes * one / many, 2)


def run_one(processes: int, share: str, model: Path, data: Path, out: Path,
            boxes: str = "boxes.json") -> dict[str, Any]:
    """One whole ``sim label`` command; its wall time and each process's finish time."""
    args = ["--share", share, "--model", str(model), "--annotations", str(data / boxes),
            "--images", str(data / "images"), "--output", str(out), "--batch-size", "1",
            "--device", "cpu", "--workers", "1", "--no-progress"]
    worker = ["-m", "benchmarks.label_scale_worker", *args]
    if processes > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "0", *worker]
    else:
        cmd = [sys.executable, *worker]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{processes} x {share} failed:\n{proc.stdout}\n{proc.stderr}")
    finish = sorted(p.stat().st_mtime - start for p in out.parent.glob(f".{out.name}.progress*"))
    return {"wall_s": wall, "finish_s": finish}


def measure(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    model = make_model(work / "model.safetensors")
    data = work / "data"
    make_dataset(data, args.images)
    full = json.loads((data / "boxes.json").read_text())
    first = {img["id"] for img in full["images"][:2]}
    (data / "two.json").write_text(json.dumps({
        **full, "images": full["images"][:2],
        "annotations": [a for a in full["annotations"] if a["image_id"] in first]}))
    configs = [(1, "interleaved")] + [(p, s) for p in args.processes if p > 1
                                      for s in args.shares]
    runs: dict[tuple[int, str], list[dict[str, Any]]] = {c: [] for c in configs}
    reference: bytes | None = None
    for _ in range(args.rounds):
        for p in args.processes:
            if p > 1:
                CEILING.setdefault(p, []).append(parallel_ceiling(p))
        for processes, share in configs:
            out = work / "out" / f"p{processes}_{share}" / "labels.json"
            shutil.rmtree(out.parent, ignore_errors=True)
            out.parent.mkdir(parents=True)
            result = run_one(processes, share, model, data, out)
            if reference is None:
                reference = out.read_bytes()
            result["identical"] = out.read_bytes() == reference
            shutil.rmtree(out.parent)
            out.parent.mkdir(parents=True)
            result["startup_s"] = run_one(processes, share, model, data, out, "two.json")["wall_s"]
            runs[(processes, share)].append(result)
            print(f"{processes} x {share}: {result['wall_s']:.1f} s", flush=True)
    return [summarise(p, s, rs, args.images) for (p, s), rs in runs.items()]


def summarise(processes: int, share: str, runs: list[dict[str, Any]],
              images: int) -> dict[str, Any]:
    wall = statistics.median(r["wall_s"] for r in runs)
    net = statistics.median(r["wall_s"] - r["startup_s"] for r in runs)
    idle = [1 - statistics.mean(r["finish_s"]) / max(r["finish_s"]) if r["finish_s"] else 0
            for r in runs]
    return {"processes": processes, "share": share, "wall_s": round(wall, 2),
            "images_per_s": round(images / wall, 3), "net_s": round(net, 2),
            "net_images_per_s": round(images / net, 3),
            "idle_share": round(statistics.median(idle), 3),
            "identical_output": all(r["identical"] for r in runs), "runs": runs}


def write(rows: list[dict[str, Any]], args: argparse.Namespace, info: dict[str, Any]) -> None:
    base = next(r for r in rows if r["processes"] == 1)
    for r in rows:
        r["ratio_to_one_process"] = round(r["images_per_s"] / base["images_per_s"], 3)
        r["net_ratio_to_one_process"] = round(r["net_images_per_s"] / base["net_images_per_s"],
                                              3)
    command = "python benchmarks/label_scale.py " + " ".join(sys.argv[1:])
    ceiling = {p: statistics.median(v) for p, v in CEILING.items()}
    table = markdown_table(
        ["processes", "share", "wall s (median)", "images/s", "x one process",
         "images/s without start-up", "x one process", "idle share", "output = one process"],
        [[r["processes"], r["share"], r["wall_s"], r["images_per_s"], r["ratio_to_one_process"],
          r["net_images_per_s"], r["net_ratio_to_one_process"], r["idle_share"],
          "yes" if r["identical_output"] else "NO"] for r in rows])
    text = (f"# Auto-labelling throughput by process count\n\n`{command.strip()}`\n\n"
            f"{machine_markdown(info)}\n\n{args.images} images (2 to ~40 boxes each, growing "
            f"along the list), batch size 1, one torch thread per process, {args.rounds} "
            f"round(s), start-up included.\n\n{table}\n\nParallel ceiling of this machine in "
            f"the same rounds (pure-Python work done by N processes over one, the most any run "
            f"can gain; 2.0 on two free cores): "
            + ", ".join(f"{p} processes {c:.2f}x" for p, c in sorted(ceiling.items())) + "\n")
    payload = {"command": command.strip(), "machine": info, "images": args.images, "rows": rows,
               "parallel_ceiling": ceiling}
    write_results(ROOT / "benchmarks" / "results", args.name, payload, text.rstrip("\n"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shares", nargs="+", default=["interleaved", "contiguous", "queue"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--name", default="label_scale")
    args = parser.parse_args()
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="label_scale_") as tmp:
        rows = measure(args, Path(tmp))
    write(rows, args, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
