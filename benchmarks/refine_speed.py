"""Time per box of a box-prompted mask's refinement and score, by box size.

For square boxes of 50 to 800 px on a 1600x1600 image: one box's
:func:`serving.inference.refine.box_view` (the network's probabilities sampled over the box and
its margin, the colour model, the guided filter) and
:func:`serving.inference.quality.quality_score`, what ``Segmenter.predict`` runs per prompt box
after the network. Each size's view says how it was done: at the region's own pixels, on a
grid, or not refined (the region is too large). The image is noise and the probabilities a
random smooth map: the time depends on the sizes, not on the content. Sizes are interleaved
per round (``benchmarks/common.py``).

    python benchmarks/refine_speed.py --name refine_speed

Run the same script against another checkout's ``serving`` (``--code``) to compare revisions.
Writes ``benchmarks/results/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SIDES = (50, 100, 200, 300, 400, 600, 800)
SIZE = 1600


def variants(code: Path, sides: tuple[int, ...] = SIDES,
             ) -> tuple[dict[str, Any], dict[str, str]]:
    """side -> one box's view and score (a zero-argument callable), and side -> how the view
    was made, with ``serving`` imported from ``code``."""
    sys.path.insert(0, str(code))
    from serving.inference import quality, refine

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    noise = torch.from_numpy(rng.random((1, 1, SIZE // 8, SIZE // 8), np.float32))
    probs = F.avg_pool2d(noise, 5, stride=1, padding=2)[0, 0]  # stride 4 of a 1/2 crop
    source = refine.Source(probs, (0, 0, SIZE, SIZE), (SIZE // 2, SIZE // 2))
    result = type("Result", (), {"score": 0.5})()
    crop = type("Crop", (), {"window": source.window, "resized": source.resized})()
    calls, how = {}, {}
    for side in sides:
        box = np.array([100, 100, 100 + side, 100 + side], np.float32)

        def run(box: np.ndarray = box) -> Any:
            view = refine.box_view(image, [source], box)
            return quality.quality_score([(crop, result)], view, 0.5), view

        view = run()[1]
        region = (view.region[2] - view.region[0]) * (view.region[3] - view.region[1])
        refined = getattr(view, "mask_probs", None) is not None or getattr(view, "full", False)
        how[str(side)] = ("not refined" if not refined else "own pixels"
                          if view.probs.numel() == region else "grid")
        how[str(side)] += f", {view.probs.shape[0]}x{view.probs.shape[1]} of {region} px"
        calls[str(side)] = run
    return calls, how


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", default=str(ROOT), help="checkout whose serving/ is timed")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="refine_speed")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--quick", action="store_true", help="two sizes, 3 rounds")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.name = 3, f"{args.name}_quick"
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import (
        interleaved_times,
        machine_info,
        machine_markdown,
        markdown_table,
        summarize,
        write_results,
    )

    calls, how = variants(Path(args.code), (100, 300) if args.quick else SIDES)
    with torch.inference_mode():
        times = interleaved_times(calls, rounds=args.rounds, warmup=2)
    stats = {side: summarize(t) for side, t in times.items()}
    payload = {"machine": machine_info(), "code": args.code, "rounds": args.rounds,
               "stats": stats, "how": how}
    rows = [[f"{side} px", how[side], s["median_ms"], s["min_ms"]] for side, s in stats.items()]
    command = " ".join(["python", "benchmarks/refine_speed.py", *sys.argv[1:]])
    text = (f"# Refinement and score per box, by box size\n\n`{command}`\n\n"
            f"{machine_markdown(payload['machine'])}\n\nCode: `{args.code}`. Square boxes on a "
            f"{SIZE}x{SIZE} image, `box_view` and `quality_score` per call, {args.rounds} "
            "interleaved rounds.\n\n"
            + markdown_table(["box", "how (the score's grid of the box and its margin)",
                              "median ms", "min ms"], rows))
    write_results(Path(args.out), args.name, payload, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
