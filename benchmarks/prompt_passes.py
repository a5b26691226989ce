"""What splitting a prompt into passes costs: ``Segmenter.predict`` with M prompt boxes when one
forward pass takes all of them, against the same boxes split into passes of ``max_prompt_boxes``
(the Segmenter's passes), interleaved in one process and checked to give identical results.

    python benchmarks/prompt_passes.py              # MobileNetV2-FPN at 512 px, 128 boxes
    python benchmarks/prompt_passes.py --quick      # 32 boxes, fewer rounds

Writes ``benchmarks/results/prompt_passes[_quick].json`` and ``.md``. Random weights; times
are ratios to the one-pass run of the same mode (the whole image once, ``box_scale`` off; or
each box at its own scale, on).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    identical_predictions,
    interleaved_times,
    machine_info,
    machine_markdown,
    markdown_table,
    summarize,
    write_results,
)
from benchmarks.speed import MODELS, bench_image, build_checkpoint, prompt_boxes  # noqa: E402
from serving import Prediction, Segmenter  # noqa: E402

MODEL = "mobilenet_v2_fpn"


def bench_mode(checkpoint: Path, box_scale: bool, count: int, per_pass: list[int],
               rounds: int) -> list[dict[str, Any]]:
    """One row per per-pass limit: passes, median seconds, ratio to one pass, identical."""
    size = MODELS[MODEL][1]
    image, boxes = bench_image(size), prompt_boxes(size, count)
    segs = {n: Segmenter.load(checkpoint, device="cpu", box_scale=box_scale,
                              max_prompt_boxes=n) for n in [count, *per_pass]}
    results: dict[int, Prediction] = {}
    times = interleaved_times(
        {n: (lambda s=seg: s.predict(image, boxes=boxes)) for n, seg in segs.items()},
        rounds, on_result=lambda n, pred: results.__setitem__(n, pred))
    base = summarize(times[count])["median_ms"]
    return [{"box_scale": box_scale, "boxes": count, "max_prompt_boxes": n,
             "passes": -(-count // n), "median_ms": summarize(times[n])["median_ms"],
             "ratio": summarize(times[n])["median_ms"] / base,
             "identical": identical_predictions(results[n], results[count])} for n in segs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 boxes, 2 rounds")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))
    count, rounds = (32, 2) if args.quick else (128, 3)
    per_pass = [count // 4]
    with tempfile.TemporaryDirectory() as work:
        checkpoint, _ = build_checkpoint(MODEL, Path(work))
        rows = [r for on in (False, True)
                for r in bench_mode(checkpoint, on, count, per_pass, rounds)]
    info = machine_info()
    command = "python benchmarks/prompt_passes.py" + (" --quick" if args.quick else "")
    table = markdown_table(
        ["box_scale", "boxes", "max_prompt_boxes", "passes", "median ms", "x one pass",
         "identical to one pass"],
        [["on" if r["box_scale"] else "off", r["boxes"], r["max_prompt_boxes"], r["passes"],
          f"{r['median_ms']:.0f}", f"{r['ratio']:.2f}", "yes" if r["identical"] else "NO"]
         for r in rows])
    text = (f"# Prompt boxes in passes\n\n`{command}` ({MODEL}, {MODELS[MODEL][1][0]} px, "
            f"random weights, {rounds} interleaved rounds, torch threads "
            f"{torch.get_num_threads()})\n\n{table}\n\n{machine_markdown(info)}")
    name = "prompt_passes" + ("_quick" if args.quick else "")
    write_results(args.out, name, {"command": command, "rows": rows, "machine": info}, text)
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
