"""Merge quality-benchmark results run in several invocations into one table.

Seeds can be added to a table later instead of rerunning it whole: run the new seeds under
their own ``--name``, then merge. Only runs of the same settings are merged: every file must
agree on ``--quick`` and on each dataset's iterations, and a row must have been run with the
same config overrides in every file that has it (the seed and the run folder aside; ``sim.*``
overrides of a row that turns SIM off, which cannot change it). A seed of a row may appear in
one file only. ``--rows`` keeps only the named rows of every file, and ``FILE.json:ROW,ROW``
only those rows of that file (for example BoxInst's seed from a file whose other row ran with a
diagnostic setting); ``--datasets`` keeps only the named datasets (their iterations alone must
agree).

    python benchmarks/quality.py --datasets synthetic --rows boxinst sim --seeds 2 3 \\
        --name quality_seeds23
    python benchmarks/quality_merge.py benchmarks/results/quality.json \\
        benchmarks/results/quality_seeds23.json --name quality_4seeds
    python benchmarks/quality_merge.py benchmarks/results/quality_2400.json \\
        benchmarks/results/quality_2400_seed1.json \\
        benchmarks/results/quality_2400_bgonly_seed2.json:boxinst --name quality_2400_3seeds

Writes ``benchmarks/results/<name>.json`` and ``.md`` (the same table as ``quality.py``: mean
and spread per row, ratio to the fully supervised row, and each row minus BoxInst seed by seed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quality import markdown, tabulate  # noqa: E402

#: Overrides that identify a run rather than its settings (the schedule is checked through the
#: dataset's iterations instead, so ``--iters 600`` merges with a default 600-iteration run).
_RUN_KEYS = ("seed=", "output_dir=", "optim.max_iter=", "optim.steps=")


class MergeError(ValueError):
    """Results that cannot be merged; the message names the file and what differs."""


def _settings(run: dict[str, Any]) -> list[str]:
    """The run's overrides that set what it trains. With ``sim.enabled=false`` the other
    ``sim.*`` overrides are inert (a ``--set sim.x=...`` given to a whole benchmark invocation
    reaches its BoxInst row too) and are left out."""
    overrides = [o for o in run.get("overrides", []) if not o.startswith(_RUN_KEYS)]
    if "sim.enabled=false" in overrides:
        overrides = [o for o in overrides if o == "sim.enabled=false" or not o.startswith("sim.")]
    return sorted(overrides)


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise MergeError(f"{path}: no such file; pass the .json written by "
                         "benchmarks/quality.py") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MergeError(f"{path}: not JSON ({exc}); pass the .json written by "
                         "benchmarks/quality.py, not the .md") from None
    if not isinstance(data, dict) or not {"runs", "datasets", "quick"} <= set(data):
        raise MergeError(f"{path}: not a quality benchmark result (no runs/datasets); pass the "
                         ".json written by benchmarks/quality.py")
    return data


def _source(arg: str | Path) -> tuple[Path, list[str] | None]:
    """``FILE.json`` -> (FILE.json, None); ``FILE.json:ROW,ROW`` -> (FILE.json, [ROW, ROW])."""
    head, sep, tail = str(arg).rpartition(":")
    if sep and head.endswith(".json") and tail:
        return Path(head), tail.split(",")
    return Path(arg), None


def merge(paths: list[str] | list[Path], rows: list[str] | None = None,
          datasets: list[str] | None = None) -> dict[str, Any]:
    """One results dict (as ``quality.py`` writes) holding the runs of every file in ``paths``
    (only those of ``rows`` and of ``datasets`` when given; a path ``FILE.json:ROW,ROW`` gives
    only those rows of that file).

    Raises ``MergeError`` when the files disagree on ``--quick`` or a kept dataset's
    iterations, when a row was run with different settings, when a (dataset, row, seed)
    repeats, or when a named row or dataset is in none of the files (or a row not in the file
    it was named for).
    """
    if len(paths) < 2:
        raise MergeError("give at least two result files to merge")
    merged: dict[str, Any] = {"runs": [], "datasets": {}, "total_seconds": 0.0}
    settings: dict[tuple[str, str], tuple[list[str], Path]] = {}
    seen: dict[tuple[str, str, int], Path] = {}
    found: set[str] = set()  # every row of every file, for the --rows error
    found_datasets: set[str] = set()  # and every dataset, for the --datasets error
    for source in paths:
        path, own = _source(source)
        data = _load(path)
        if "quick" in merged and merged["quick"] != data["quick"]:
            raise MergeError(f"{path}: --quick={data['quick']} but {paths[0]} has "
                             f"--quick={merged['quick']}; merge runs of one schedule only")
        merged.setdefault("quick", data["quick"])
        workers = data.get("workers", 0)
        if merged.setdefault("workers", workers) != workers:
            merged["workers"] = 0  # the files ran with different numbers: the table says so
        merged.setdefault("machine", data.get("machine", "unknown"))
        merged["total_seconds"] += data.get("total_seconds", 0.0)
        present = {run["row"] for run in data["runs"]}
        if own is not None and not set(own) <= present:
            raise MergeError(f"{source}: no row {' '.join(sorted(set(own) - present))} in "
                             f"{path} (its rows: {' '.join(sorted(present))})")
        found |= present
        found_datasets |= set(data["datasets"])
        kept = [run for run in data["runs"] if (rows is None or run["row"] in rows)
                and (own is None or run["row"] in own)
                and (datasets is None or run["dataset"] in datasets)]
        for dataset, info in data["datasets"].items():
            if datasets is not None and dataset not in datasets:
                continue
            mine = merged["datasets"].setdefault(dataset, {
                "iters": info["iters"], "seeds": [], "rows": {}, "figure": None,
                "untrained": None})
            if mine["iters"] != info["iters"]:
                raise MergeError(f"{path}: {dataset} ran {info['iters']} iterations, another "
                                 f"file {mine['iters']}; merge runs of one schedule only")
            # quality.py draws the figure from the "sim" row's first seed: keep it with that row.
            if any(run["dataset"] == dataset and run["row"] == "sim" for run in kept):
                mine["figure"] = mine["figure"] or info.get("figure")
            mine["untrained"] = mine["untrained"] or info.get("untrained")
        for run in kept:
            key = (run["dataset"], run["row"])
            first = settings.setdefault(key, (_settings(run), path))
            if first[0] != _settings(run):
                raise MergeError(f"{path}: row {run['row']} of {run['dataset']} ran with "
                                 f"{_settings(run)}, but with {first[0]} in {first[1]}; "
                                 "merge runs of the same settings only")
            seed_key = (*key, run["seed"])
            if seed_key in seen:
                raise MergeError(f"{path}: seed {run['seed']} of row {run['row']} "
                                 f"({run['dataset']}) is also in {seen[seed_key]}; pass each "
                                 "run once")
            seen[seed_key] = path
            merged["runs"].append(run)
    missing = [r for r in rows or [] if r not in found]
    if missing:
        raise MergeError(f"--rows {' '.join(missing)}: in none of the files (their rows: "
                         f"{' '.join(sorted(found))})")
    missing = [d for d in datasets or [] if d not in found_datasets]
    if missing:
        raise MergeError(f"--datasets {' '.join(missing)}: in none of the files (their "
                         f"datasets: {' '.join(sorted(found_datasets))})")
    for dataset in list(merged["datasets"]):
        info = merged["datasets"][dataset]
        info["seeds"] = sorted({r["seed"] for r in merged["runs"] if r["dataset"] == dataset})
        if not info["seeds"]:  # every run of it left out by --rows
            del merged["datasets"][dataset]
        elif info["untrained"] is None:
            info.pop("untrained")
    tabulate(merged)
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="quality.py result .json files; "
                        "FILE.json:ROW,ROW takes only those rows of the file")
    parser.add_argument("--name", required=True, help="merged results file name")
    parser.add_argument("--rows", nargs="+", default=None, metavar="ROW",
                        help="keep only these rows of every file (default: all)")
    parser.add_argument("--datasets", nargs="+", default=None, metavar="DATASET",
                        help="keep only these datasets of every file (default: all)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    try:
        merged = merge(args.results, args.rows, args.datasets)
    except MergeError as exc:
        parser.error(str(exc))
    merged["command"] = ("python benchmarks/quality_merge.py "
                         + " ".join(str(p) for p in args.results)
                         + (f" --rows {' '.join(args.rows)}" if args.rows else "")
                         + (f" --datasets {' '.join(args.datasets)}" if args.datasets else "")
                         + f" --name {args.name}")
    merged["merged_from"] = [str(p) for p in args.results]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(merged, indent=2))
    text = markdown(merged)
    (args.out_dir / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
