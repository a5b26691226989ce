"""Box-prompted mask quality across training seeds: one table from several results of
``benchmarks/prompted_quality.py``.

Each file is one model (the same config trained with another ``seed=``) measured on the same
boxes; this puts their ``default`` rows side by side with the best ``today @ N`` row of each
(the size picked by hand on the true masks), and gives the mean and the sample standard
deviation over the seeds. Only results of the same data, split, images, boxes and upscale
are merged.

    sim train --config configs/quickstart_nuclei.yaml seed=1 output_dir=runs/qs_nuclei_s1
    python benchmarks/prompted_quality.py --data nuclei --sizes 320 --rows \\
        --model runs/qs_nuclei_s1/model_final.safetensors --tag seed1
    python benchmarks/prompted_seeds.py benchmarks/results/prompted_quality_nuclei_seed{0,1}.json \\
        --name prompted_quality_nuclei_seeds

Writes ``benchmarks/results/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import interval_text, markdown_table, write_results  # noqa: E402

#: What every merged file must share: the boxes the masks were measured on.
SAME = ("data", "split", "images", "boxes", "upscale")
#: The default row's columns summarized over the seeds.
COLUMNS = ("mean_iou", "under_0.5", "mask_ap", "ap_over_hand_picked", "spearman")


class SeedsError(ValueError):
    """Results that cannot be merged (the message names the file and the fix)."""


def _hand_picked(rows: dict[str, Any], path: Path) -> tuple[str, float]:
    """The ``today @ N`` row with the highest mask AP: (its name, its AP)."""
    sized = {name: row["mask_ap"] for name, row in rows.items() if name.startswith("today @ ")}
    if not sized:
        raise SeedsError(f"{path}: no 'today @ N' row; run prompted_quality.py with --sizes N")
    name = max(sized, key=sized.__getitem__)
    return name, float(sized[name])


def seed_row(results: dict[str, Any], path: Path, compare: str | None = None) -> dict[str, Any]:
    """One file's ``default`` row, its best hand-picked size and the AP gain over it, and
    the Spearman of its ``compare`` row (e.g. the same masks under another score)."""
    rows = results["rows"]
    for name in ("default", compare):
        if name is not None and name not in rows:
            raise SeedsError(f"{path}: no {name!r} row; give prompted_quality.py results "
                             "that have it")
    best, best_ap = _hand_picked(rows, path)
    row = rows["default"]
    return {"file": path.with_suffix(".md").name, "model": results["model"],
            "mean_iou": row["mean_iou"], "under_0.5": row["under_0.5"], "mask_ap": row["mask_ap"],
            "hand_picked": best, "hand_picked_ap": best_ap,
            "ap_over_hand_picked": round(float(row["mask_ap"]) - best_ap, 1),
            "spearman": row["spearman"], "spearman_95": row.get("spearman_95"),
            "compare_spearman": rows[compare]["spearman"] if compare else None}


def _field(results: dict[str, Any], key: str) -> Any:
    """One of ``SAME`` in a result (``upscale`` is 1 in results from before that option)."""
    return results.get(key, 1 if key == "upscale" else None)


def merge(paths: list[Path], compare: str | None = None) -> dict[str, Any]:
    """The seed rows of ``paths`` and their mean and standard deviation per column (with
    ``compare``, also that row's Spearman)."""
    if len(paths) < 2:
        raise SeedsError("give two or more prompted_quality.py results (one per seed)")
    loaded = [(p, json.loads(p.read_text(encoding="utf-8"))) for p in paths]
    first_path, first = loaded[0]
    for path, results in loaded[1:]:
        for key in SAME:
            if _field(results, key) != _field(first, key):
                raise SeedsError(f"{path}: {key} {results.get(key)!r} differs from "
                                 f"{first.get(key)!r} in {first_path}; merge results of the "
                                 "same boxes only")
    rows = [seed_row(results, path, compare) for path, results in loaded]
    summary = {}
    for column in COLUMNS + (("compare_spearman",) if compare else ()):
        values = np.array([r[column] for r in rows if r[column] is not None], np.float64)
        summary[column] = {"mean": round(float(values.mean()), 3),
                           "std": round(float(values.std(ddof=1)), 3) if len(values) > 1
                           else None}
    return {**{key: first.get(key) for key in SAME}, "rows": rows, "summary": summary,
            "compare": compare}


def markdown(merged: dict[str, Any], command: str) -> str:
    """The results file: one line per seed, then mean +- standard deviation."""
    header = ["model", "mean IoU", "under 0.5 IoU", "mask AP", "best by hand (mask AP)",
              "AP over it", "Spearman(score, IoU)", "95 % interval", "result file"]
    lines = [[r["model"], r["mean_iou"], f"{100 * r['under_0.5']:.1f} %", r["mask_ap"],
              f"{r['hand_picked']} ({r['hand_picked_ap']})", r["ap_over_hand_picked"],
              r["spearman"], interval_text(r["spearman_95"]), f"`{r['file']}`"]
             for r in merged["rows"]]
    s = merged["summary"]

    def both(column: str, scale: float = 1.0, unit: str = "") -> str:
        mean, std = s[column]["mean"] * scale, s[column]["std"]
        return f"{mean:.3g}{unit} ± {std * scale:.2g}{unit}" if std is not None else f"{mean:.3g}"

    lines.append(["mean ± sd", both("mean_iou"), both("under_0.5", 100, " %"),
                  both("mask_ap"), None, both("ap_over_hand_picked"), both("spearman"),
                  None, None])
    compare = merged.get("compare")
    if compare:  # the compared row's Spearman, before the result file
        header.insert(-1, f"Spearman, {compare}")
        for line, r in zip(lines, merged["rows"]):
            line.insert(-1, r["compare_spearman"])
        lines[-1].insert(-1, both("compare_spearman"))
    split = "training" if merged.get("split") == "train" else "validation"
    return (f"# Box-prompted masks across training seeds: {merged['data']} {split} boxes\n\n"
            f"`{command}`\n\n{merged['images']} images, {merged['boxes']} boxes; the "
            "`default` row of each model (one training seed each), the best `today @ N` row "
            "of the same file (the size picked by hand on the true masks) and the mean and "
            f"sample standard deviation over the {len(merged['rows'])} seeds.\n\n"
            f"{markdown_table(header, lines)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path,
                        help="prompted_quality.py result files (.json), one per seed")
    parser.add_argument("--name", required=True, help="name of the merged results")
    parser.add_argument("--compare", default=None,
                        help="another row whose Spearman to set beside the default's "
                             "(e.g. 'score without crowding')")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    try:
        merged = merge(args.results, args.compare)
    except (SeedsError, OSError, json.JSONDecodeError) as exc:
        print(f"prompted_seeds: {exc}", file=sys.stderr)
        return 2
    command = "python benchmarks/prompted_seeds.py " + shlex.join(
        str(p) for p in (argv if argv is not None else sys.argv[1:]))
    write_results(args.out, args.name, merged, markdown(merged, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
