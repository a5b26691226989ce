"""Training-step cost of SIM relative to BoxInst: time, peak memory and where SIM's time goes.

Every variant trains the same network (same initial weights) on the same batch, through the
training loop's own step (``training.batch_losses.batch_losses`` + backward + optimizer +
EMA update):

- ``boxinst``: ``sim.enabled=false`` (projection + pairwise losses only);
- ``sim``: SIM active (teacher, M_I, M_S, prototypes, pseudo loss, memory-bank push), no paste
  in the step (``sim.paste_prob=0``);
- ``sim+paste``: the same with online copy-paste in the step (``sim.paste_prob=1``).

With the default ``paste_prob`` of 0.5 a SIM run alternates the two SIM rows, so the expected
SIM step is their mean (reported as ``sim (expected)``). The memory bank is pre-filled with
objects cut from the batch (ellipses inside the boxes), so pasting starts at once. The steps
are timed side by side: round r runs boxinst, sim, sim+paste once each; medians over rounds.

SIM's parts are measured with the ``torch.profiler.record_function`` ranges in
``training/train.py`` and ``training/sim/iteration.py`` (``sim.teacher_forward``,
``sim.instance_map``, ...) over a few ``sim+paste`` steps; each share is the range's time over
the profiled step time.

Peak memory: on a GPU ``torch.cuda.max_memory_allocated`` over the timed steps; on the CPU each
variant runs in a fresh subprocess that resets the kernel's peak-RSS counter (``VmHWM``, via
``/proc/self/clear_refs``) after warm-up and reports the peak resident memory of the measured
steps above the resident memory before them (activations, gradients, temporaries; the model,
optimizer state and data are in the baseline).

    python benchmarks/train_speed.py                       # bench_synthetic config, CPU
    python benchmarks/train_speed.py --quick               # fewer rounds, tiny images
    python benchmarks/train_speed.py --device cuda --config configs/sim_r50_fpn_1x.yaml \\
        --image-size 800 --batch-size 2                    # the paper's R-50 1x step on a GPU

Writes ``benchmarks/results/train_speed.json`` and ``.md`` (``_quick`` with ``--quick``).
Weights are random (timing does not depend on them); the data are synthetic images generated
into a temporary folder.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    interleaved_times,
    machine_info,
    machine_markdown,
    markdown_table,
    summarize,
    synchronize,
    write_results,
)
from serving.model import build_condinst  # noqa: E402
from training.batch_losses import batch_losses  # noqa: E402
from training.data import CocoInstanceDataset  # noqa: E402
from training.data.collate import Batch  # noqa: E402
from training.data.loader import build_train_loader  # noqa: E402
from training.optim import build_optimizer, build_scheduler  # noqa: E402
from training.run_state import RunState  # noqa: E402
from training.sim.iteration import SIMState  # noqa: E402
from training.train_config import TrainConfig, load_config  # noqa: E402

VARIANTS: dict[str, list[str]] = {
    "boxinst": ["sim.enabled=false"],
    "sim": ["sim.paste_prob=0.0"],
    "sim+paste": ["sim.paste_prob=1.0"],
}
#: record_function ranges of one SIM step (see training/train.py and training/sim/iteration.py).
PARTS = (
    "sim.copy_paste", "student.forward", "losses.fcos_boxinst", "sim.losses",
    "sim.teacher_forward", "sim.instance_map", "sim.semantic_map", "sim.pseudo_masks",
    "sim.pseudo_paste_losses", "sim.prototype_update", "sim.bank_push", "backward",
    "optimizer.step", "sim.ema_update",
)
#: Parts nested inside ``sim.losses`` (the table indents them).
SIM_LOSS_PARTS = ("sim.teacher_forward", "sim.instance_map", "sim.semantic_map",
                  "sim.pseudo_masks", "sim.pseudo_paste_losses", "sim.prototype_update",
                  "sim.bank_push")


# --------------------------------------------------------------------------- setup
def make_config(args: argparse.Namespace, data_dir: Path, variant: str) -> TrainConfig:
    """The benchmark config of one variant: the chosen YAML + synthetic data + variant switches."""
    size = args.image_size
    overrides = [
        "model.backbone_weights=null",
        f"data.train_json={data_dir / 'train.json'}", f"data.train_images={data_dir / 'images'}",
        "data.val_json=null", "data.val_images=null", "data.synthetic_images=0",
        f"data.min_sizes=[{size}]", f"data.max_size={max(size, args.max_size or size)}",
        "data.num_workers=0", "data.flip_prob=0.0", f"optim.batch_size={args.batch_size}",
        f"sim.paste_min_bank={args.bank_entries}", f"sim.memory_size={max(args.bank_entries, 1)}",
        f"seed={args.seed}",
    ] + VARIANTS[variant] + list(args.overrides)
    return load_config(args.config, overrides)


def ensure_data(args: argparse.Namespace, work: Path) -> Path:
    """A small synthetic COCO dataset (generated once per work folder)."""
    data_dir = work / f"synthetic_{args.image_size}"
    if not (data_dir / "train.json").is_file():
        from training.data.synthetic import generate_dataset

        count = max(2 * args.batch_size, 8)
        generate_dataset(data_dir, count, seed=args.seed, size=args.image_size, val_fraction=0.0)
    return data_dir


def first_batch(cfg: TrainConfig) -> tuple[Batch, int]:
    """The first training batch of the config's data (identical for every variant)."""
    dataset = CocoInstanceDataset(cfg.data.train_json, cfg.data.train_images, mode="box")
    loader = build_train_loader(dataset, cfg, 0, 1)
    return next(iter(loader.iterate(RunState()))), dataset.num_classes


def ellipse_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(M, H, W) bool ellipses inscribed in XYXY boxes (objects to pre-fill the memory bank)."""
    ys = torch.arange(height, dtype=torch.float32)[None, :, None] + 0.5
    xs = torch.arange(width, dtype=torch.float32)[None, None, :] + 0.5
    b = boxes.float().cpu()
    cx, cy = ((b[:, 0] + b[:, 2]) / 2)[:, None, None], ((b[:, 1] + b[:, 3]) / 2)[:, None, None]
    rx = ((b[:, 2] - b[:, 0]) / 2).clamp(min=1)[:, None, None]
    ry = ((b[:, 3] - b[:, 1]) / 2).clamp(min=1)[:, None, None]
    return ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0


def prefill_bank(sim: SIMState, batch: Batch, entries: int) -> None:
    """Push ``entries`` bank entries cut from the batch's images (cycling over them)."""
    h, w = batch.images.shape[-2:]
    b = 0
    while len(sim.bank) < entries:
        i = b % len(batch)
        boxes = batch.boxes[i].cpu()
        if boxes.shape[0]:
            sim.bank.push(batch.images[i].cpu(), ellipse_masks(boxes, h, w), boxes,
                          batch.labels[i].cpu(), torch.ones(boxes.shape[0]))
        b += 1
        if b > 10 * max(entries, 1) + len(batch):
            break


class Trainer:
    """One variant: its own model copy, optimizer, scheduler and SIM state."""

    def __init__(self, cfg: TrainConfig, init_state: dict[str, torch.Tensor], batch: Batch,
                 device: torch.device, amp: str | None) -> None:
        self.cfg = cfg
        self.device = device
        self.model = build_condinst(cfg.model)
        self.model.load_state_dict(init_state)
        self.model.to(device).train()
        self.batch = batch.to(device)
        self.sim = SIMState(self.model, cfg, device) if cfg.sim.enabled else None
        if self.sim is not None:
            prefill_bank(self.sim, batch, cfg.sim.paste_min_bank)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim)
        self.step_index = cfg.sim_start_iter  # SIM's losses are active from here
        self.amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp or "")
        self.scaler = torch.amp.GradScaler(device.type) if self.amp == torch.float16 else None

    def step(self) -> float:
        """One training iteration, as the training loop runs it; returns the total loss."""
        from torch.profiler import record_function

        with torch.autocast(self.device.type, dtype=self.amp or torch.float32,
                            enabled=self.amp is not None):
            losses = batch_losses(self.model, self.model, self.batch, self.cfg, self.step_index,
                                  self.sim, lambda t: t)
            total = sum(losses.values())
        with record_function("backward"):
            (self.scaler.scale(total) if self.scaler else total).backward()
        with record_function("optimizer.step"):
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.sim is not None:
            self.sim.after_step(self.model)
        return float(total.detach())


def build_trainers(args: argparse.Namespace, names: list[str],
                   device: torch.device) -> tuple[dict[str, Trainer], Batch, int]:
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="train_speed_"))
    data_dir = ensure_data(args, work)
    base = make_config(args, data_dir, "boxinst")
    batch, num_classes = first_batch(base)
    torch.manual_seed(args.seed)
    cfgs = {}
    for name in names:
        cfg = make_config(args, data_dir, name)
        cfg.model.num_classes = num_classes
        cfgs[name] = cfg
    if args.num_classes:
        for cfg in cfgs.values():
            cfg.model.num_classes = max(args.num_classes, num_classes)
    init = build_condinst(cfgs[names[0]].model).state_dict()
    trainers = {n: Trainer(cfgs[n], copy.deepcopy(init), batch, device, args.amp) for n in names}
    return trainers, batch, num_classes


# --------------------------------------------------------------------------- measurements
def profile_parts(trainer: Trainer, steps: int, device: torch.device) -> dict[str, Any]:
    """Time of each ``record_function`` range per step (ms), from ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    synchronize(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            trainer.step()
        synchronize(device)
        wall = (time.perf_counter() - start) / steps
    parts: dict[str, dict[str, float]] = {}
    for evt in prof.key_averages():
        if evt.key in PARTS:
            entry = {"cpu_ms": evt.cpu_time_total / 1000.0 / steps}
            device_total = getattr(evt, "device_time_total", 0.0) or 0.0
            if device.type == "cuda":
                entry["device_ms"] = device_total / 1000.0 / steps
            parts[evt.key] = entry
    key = "device_ms" if device.type == "cuda" else "cpu_ms"
    for entry in parts.values():
        entry["share"] = entry.get(key, 0.0) / 1000.0 / wall
    return {"profiled_step_ms": wall * 1000.0, "steps": steps, "parts": parts,
            "share_of": key}


def _status() -> dict[str, int]:
    with open("/proc/self/status", encoding="utf-8") as f:
        text = f.read()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) for k in ("VmHWM", "VmRSS")}


def memory_child(args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of one variant's steps (run in a fresh process: ``--memory-child NAME``)."""
    device = torch.device(args.device)
    trainers, _, _ = build_trainers(args, [args.memory_child], device)
    trainer = trainers[args.memory_child]
    for _ in range(args.warmup):
        trainer.step()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.memory_steps):
            trainer.step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"measure": "torch.cuda.max_memory_allocated", "baseline_mib": base / 2**20,
                "peak_mib": peak / 2**20, "step_peak_mib": (peak - base) / 2**20}
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")  # reset the peak-RSS counter VmHWM (Linux >= 4.0)
        how = "VmHWM after reset"
    except OSError:
        how = "VmHWM since process start (reset not permitted)"
    before = _status()["VmRSS"]
    for _ in range(args.memory_steps):
        trainer.step()
    peak = _status()["VmHWM"]
    return {"measure": f"RSS ({how})", "baseline_mib": before / 1024, "peak_mib": peak / 1024,
            "step_peak_mib": (peak - before) / 1024}


def run_memory(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """``memory_child`` of every variant, each in its own subprocess."""
    out: dict[str, Any] = {}
    for name in names:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", name,
               *_forwarded(args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            out[name] = {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
        else:
            out[name] = json.loads(lines[-1])
    return out


def _forwarded(args: argparse.Namespace) -> list[str]:
    """The options a memory subprocess needs to rebuild the same setup."""
    opts = ["--config", str(args.config), "--device", args.device, "--batch-size",
            str(args.batch_size), "--image-size", str(args.image_size), "--seed", str(args.seed),
            "--warmup", str(args.warmup), "--memory-steps", str(args.memory_steps),
            "--bank-entries", str(args.bank_entries), "--threads", str(args.threads)]
    if args.max_size:
        opts += ["--max-size", str(args.max_size)]
    if args.work_dir:
        opts += ["--work-dir", args.work_dir]
    if args.amp:
        opts += ["--amp", args.amp]
    if args.num_classes:
        opts += ["--num-classes", str(args.num_classes)]
    return opts + list(args.overrides)


# --------------------------------------------------------------------------- report
def report(result: dict[str, Any]) -> str:
    t = result["times"]
    rows = []
    for name, s in t.items():
        mem = result["memory"].get(name, {})
        rows.append([name, s["median_ms"], s["min_ms"], s["max_ms"], s["ratio_to_boxinst"],
                     s["median_round_ratio"], mem.get("step_peak_mib"), mem.get("peak_mib")])
    lines = [
        f"# Training step: SIM vs BoxInst ({result['mode']})", "",
        machine_markdown(result["machine"]), "",
        f"Config `{result['config']}` ({result['backbone']}), batch {result['batch_size']} of "
        f"{result['image_size']}x{result['image_size']} synthetic images, device "
        f"`{result['device']}`, precision {result['amp'] or 'fp32'}; random weights; "
        f"{result['rounds']} interleaved rounds after {result['warmup']} warm-up rounds "
        "(medians). Memory: " + result["memory_note"], "",
        markdown_table(["variant", "step ms (median)", "min", "max", "x BoxInst",
                        "x BoxInst (median per round)", "step peak MiB", "peak MiB"], rows), "",
        f"Expected SIM step (paste in half the steps): **{result['sim_expected_ratio']:.3f}x** "
        f"BoxInst from the medians, {result['sim_expected_round_ratio']:.3f}x from the per-round "
        "ratios (target <= 1.35). Peak MiB is the whole process (libraries included); step "
        "peak is what the measured steps added.", "",
    ]
    prof = result.get("parts")
    if prof:
        lines += [f"## Where a SIM step (with paste) spends its time ({prof['share_of']}; "
                  f"profiled step {prof['profiled_step_ms']:.0f} ms over {prof['steps']} steps)",
                  ""]
        prow = []
        for part in PARTS:
            if part in prof["parts"]:
                e = prof["parts"][part]
                label = f"&nbsp;&nbsp;{part}" if part in SIM_LOSS_PARTS else part
                prow.append([label, e.get("device_ms", e["cpu_ms"]), 100.0 * e["share"]])
        lines += [markdown_table(["part", "ms / step", "% of step"], prow), "",
                  "Indented parts run inside `sim.losses`. The profiler adds overhead to every "
                  "op, so the profiled step is slower than the timed one; read the shares.", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs/bench_synthetic.yaml"))
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's (4)")
    p.add_argument("--image-size", type=int, default=None, help="synthetic image side (256)")
    p.add_argument("--max-size", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 10)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile-steps", type=int, default=None)
    p.add_argument("--memory-steps", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--bank-entries", type=int, default=10)
    p.add_argument("--amp", choices=("bf16", "fp16"), default=None)
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes of the model (default: the synthetic data's; 80 for COCO)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch CPU threads (default: all cores)")
    p.add_argument("--work-dir", default=None, help="where the synthetic data go (default tmp)")
    p.add_argument("--quick", action="store_true", help="few rounds, small images")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="extra dotted config overrides")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    base = load_config(args.config)
    if args.batch_size is None:
        args.batch_size = 2 if args.quick else base.optim.batch_size
    if args.image_size is None:
        args.image_size = 128 if args.quick else max(base.inference.min_size, 64)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 10
    if args.profile_steps is None:
        args.profile_steps = 1 if args.quick else 3
    if args.quick:
        args.warmup = min(args.warmup, 1)
        args.memory_steps = 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args)))
        return 0
    device = torch.device(args.device)
    names = list(VARIANTS)
    trainers, batch, _ = build_trainers(args, names, device)
    for name, tr in trainers.items():
        if tr.sim is not None and len(tr.sim.bank) < tr.cfg.sim.paste_min_bank:
            print(f"warning: {name}: memory bank holds {len(tr.sim.bank)} entries, paste needs "
                  f"{tr.cfg.sim.paste_min_bank}", file=sys.stderr)
    print(f"timing {names} on {device}: {args.rounds} rounds after {args.warmup} warm-up",
          file=sys.stderr)
    times = interleaved_times({n: tr.step for n, tr in trainers.items()}, args.rounds,
                              args.warmup, device)
    summary = {n: summarize(t) for n, t in times.items()}
    base_ms = summary["boxinst"]["median_ms"]
    for s in summary.values():
        s["ratio_to_boxinst"] = s["median_ms"] / base_ms
    # Per-round ratios are robust to drifting load: their median is reported too.
    for n in names:
        summary[n]["median_round_ratio"] = statistics.median(
            a / b for a, b in zip(times[n], times["boxinst"]))
    expected = (summary["sim"]["median_ms"] + summary["sim+paste"]["median_ms"]) / 2 / base_ms
    expected_rounds = (summary["sim"]["median_round_ratio"]
                       + summary["sim+paste"]["median_round_ratio"]) / 2
    print("profiling sim+paste parts", file=sys.stderr)
    parts = profile_parts(trainers["sim+paste"], args.profile_steps, device)
    del trainers
    gc.collect()
    memory = {} if args.no_memory else run_memory(args, names)
    cfg = load_config(args.config)
    result = {
        "mode": "quick" if args.quick else "full",
        "machine": machine_info(device), "device": str(device), "config": str(args.config),
        "backbone": cfg.model.backbone, "batch_size": args.batch_size,
        "image_size": args.image_size, "amp": args.amp, "rounds": args.rounds,
        "warmup": args.warmup, "times": summary, "sim_expected_ratio": expected,
        "sim_expected_round_ratio": expected_rounds,
        "parts": parts, "memory": memory,
        "memory_note": ("torch.cuda.max_memory_allocated during the measured steps minus the "
                        "allocated memory before them" if device.type == "cuda" else
                        "peak resident set size (VmHWM) of a fresh process during the measured "
                        "steps, minus the resident size before them"),
        "batch_instances": [int(b.shape[0]) for b in batch.boxes],
    }
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results"
    stem = "train_speed_quick" if args.quick else "train_speed"
    write_results(out, stem, result, report(result))
    print(f"wrote {out / stem}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
