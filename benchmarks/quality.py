"""Quality benchmark: BoxInst vs SIM (and its ablations) vs fully supervised, equal budget.

Reproduces the *shape* of the paper's Tables 3 and 4 on data that can be had offline: the
built-in synthetic dataset and the napari fluorescence nuclei (2-D slices, boxes only for
training). Every row trains with the same config, budget and seeds, then reports COCO mask AP
(AP, AP50, AP75, APs/m/l), box AP, and the ratio of mask AP to the fully supervised row.

    python benchmarks/quality.py                 # every row, 2 seeds, both datasets
    python benchmarks/quality.py --quick         # fewer iterations, 1 seed (< 20 min target)
    python benchmarks/quality.py --rows boxinst sim --datasets synthetic --seeds 0 1 2

Writes ``benchmarks/results/quality[_quick].json`` and ``.md``; per-run folders under
``runs/bench/``. Rows never run are never reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving.checkpoint import save_checkpoint  # noqa: E402
from serving.model import build_condinst  # noqa: E402
from training.config import load_config  # noqa: E402
from training.data import CocoInstanceDataset  # noqa: E402
from training.evaluate import evaluate_checkpoint  # noqa: E402
from training.train import train  # noqa: E402

#: Rows of the table: name -> config overrides (on top of the dataset's base config).
ROWS: dict[str, list[str]] = {
    "mask (fully supervised)": ["supervision=mask", "sim.enabled=false"],
    "boxinst": ["sim.enabled=false"],
    "boxinst + pseudo": ["sim.copy_paste=false"],
    "sim (alpha 0.5, + copy-paste)": [],
    "sim alpha 0": ["sim.alpha=0.0"],
    "sim alpha 1": ["sim.alpha=1.0"],
}
ROW_KEYS = {"mask": "mask (fully supervised)", "boxinst": "boxinst",
            "pseudo": "boxinst + pseudo", "sim": "sim (alpha 0.5, + copy-paste)",
            "alpha0": "sim alpha 0", "alpha1": "sim alpha 1"}
DATASETS = {"synthetic": "configs/bench_synthetic.yaml", "nuclei": "configs/bench_nuclei.yaml"}
METRICS = ("segm/AP", "segm/AP50", "segm/AP75", "segm/APs", "segm/APm", "segm/APl", "bbox/AP")


def prepare_nuclei(cfg_path: str) -> None:
    cfg = load_config(ROOT / cfg_path)
    if not Path(cfg.data.train_json).is_file():
        from training.data.nuclei import convert_nuclei

        convert_nuclei(Path(cfg.data.train_json).parent)


def untrained(cfg_path: str, out: Path) -> dict[str, float]:
    cfg = load_config(ROOT / cfg_path)
    data = CocoInstanceDataset(cfg.data.train_json, cfg.data.train_images)
    cfg.model.num_classes = data.num_classes
    path = out / "untrained.safetensors"
    save_checkpoint(path, build_condinst(cfg.model), cfg.model, data.class_names, cfg.inference,
                    extra={"category_ids": data.label_to_category_id})
    return evaluate_checkpoint(path, cfg.data.val_json, cfg.data.val_images, device="cpu")


def run_row(dataset: str, row: str, seed: int, extra: list[str], out: Path) -> dict[str, Any]:
    run_dir = out / dataset / row.split(" (")[0].replace(" ", "_").replace("+", "p") / f"s{seed}"
    overrides = ROWS[row] + extra + [f"seed={seed}", f"output_dir={run_dir}"]
    cfg = load_config(ROOT / DATASETS[dataset], overrides)
    start = time.perf_counter()
    result = train(cfg)
    return {"metrics": result["metrics"], "seconds": time.perf_counter() - start,
            "overrides": overrides}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(runs), "seconds": sum(r["seconds"] for r in runs)}
    for key in METRICS:
        values = [r["metrics"].get(key, float("nan")) for r in runs]
        out[key] = statistics.fmean(values)
        out[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# Quality benchmark{' (quick)' if results['quick'] else ''}", "",
             f"Command: `{results['command']}`  ", f"Machine: {results['machine']}  ",
             f"Total time: {results['total_seconds'] / 60:.1f} min", ""]
    for dataset, rows in results["datasets"].items():
        full = rows.get(ROWS_FULL, {}).get("segm/AP")
        lines += [f"## {dataset}", "",
                  "| row | seeds | mask AP | AP50 | AP75 | APs | APm | APl | box AP | / full |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, s in rows.items():
            if name == "untrained":
                lines.append(f"| untrained | - | {s['segm/AP']:.1f} | {s['segm/AP50']:.1f} | "
                             f"{s['segm/AP75']:.1f} | | | | {s['bbox/AP']:.1f} | |")
                continue
            ratio = f"{s['segm/AP'] / full:.2f}" if full else "-"
            cells = [f"{s[k]:.1f} ± {s[k + '_std']:.1f}" if k in ("segm/AP", "bbox/AP")
                     else f"{s[k]:.1f}" for k in METRICS]
            lines.append(f"| {name} | {s['n']} | " + " | ".join(cells) + f" | {ratio} |")
        lines.append("")
    return "\n".join(lines)


ROWS_FULL = "mask (fully supervised)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer iterations, one seed")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--rows", nargs="+", default=list(ROW_KEYS), choices=list(ROW_KEYS))
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None, help="override optim.max_iter")
    parser.add_argument("--out", default="runs/bench")
    args = parser.parse_args(argv)
    seeds = args.seeds or ([0] if args.quick else [0, 1])
    extra: list[str] = []
    iters = args.iters or (300 if args.quick else None)
    if iters:
        extra += [f"optim.max_iter={iters}", f"optim.steps=[{int(iters * 0.8)}]"]
    out = ROOT / args.out
    start = time.perf_counter()
    results: dict[str, Any] = {
        "quick": args.quick, "command": "python benchmarks/quality.py " + " ".join(argv or
                                                                                 sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{__import__('os').cpu_count()} cores, CPU only",
        "seeds": seeds, "datasets": {}, "runs": {}}
    for dataset in args.datasets:
        if dataset == "nuclei":
            prepare_nuclei(DATASETS[dataset])
        rows: dict[str, Any] = {}
        for key in args.rows:
            row = ROW_KEYS[key]
            runs = [run_row(dataset, row, s, extra, out) for s in seeds]
            results["runs"][f"{dataset}/{row}"] = runs
            rows[row] = summarise(runs)
            print(f"[{dataset}] {row}: mask AP {rows[row]['segm/AP']:.2f} "
                  f"± {rows[row]['segm/AP_std']:.2f}", flush=True)
        rows["untrained"] = untrained(DATASETS[dataset], out / dataset)
        results["datasets"][dataset] = rows
    results["total_seconds"] = time.perf_counter() - start
    name = "quality_quick" if args.quick else "quality"
    res_dir = ROOT / "benchmarks" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    (res_dir / f"{name}.json").write_text(json.dumps(results, indent=2))
    (res_dir / f"{name}.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
