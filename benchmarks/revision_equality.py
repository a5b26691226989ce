"""Today's network and export code against a git revision's, on the same weights: the same
instances and masks (a check, not a test).

For each checkpoint (``--models``, and with ``--benchmark-models`` the random-weight models of
``benchmarks/export_speed.py`` on random images at their input size and 1.5x larger) and each
of the first ``--count`` images of a COCO file, automatic and prompted with the image's
annotated boxes:

- **torch**: ``Segmenter.from_checkpoint`` of today's ``serving`` against the revision's
  (imported as ``serving_ref``, :func:`ab_speed.import_ref`);
- **onnxruntime fp32 / int8** (``--onnx``): the checkpoint exported and quantised
  (``python -m export --int8``, the same calibration images) by today's ``export`` package and
  by the revision's (run from a ``git archive`` of its ``serving`` and ``export``), both graphs
  served by today's ``Segmenter``.

Reported per model, backend and mode as in ``postprocess_equality.py``: whether boxes, scores
and labels are equal, the share of bit-identical masks and the lowest mask IoU. Writes
``benchmarks/results/<--name>.{json,md}``; exits 1 unless every run has the same instances and
every mask is within 0.999 IoU or one pixel (a reordered float sum flips only pixels whose
probability lies within rounding of the threshold; one pixel of a 320-pixel nucleus is 0.997).

    python benchmarks/revision_equality.py --ref 66a039a --onnx --benchmark-models \\
        --models runs/quickstart/model_final.safetensors \\
        --annotations data/synthetic/val.json --images data/synthetic/images
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ab_speed import commit_of, export_with, import_ref, revision_code  # noqa: E402
from common import machine_info, machine_markdown, markdown_table, write_results  # noqa: E402
from export_speed import calibration_images  # noqa: E402
from postprocess_equality import (  # noqa: E402
    benchmark_checkpoints,
    coco_items,
    compare_predictions,
)

from serving import Segmenter  # noqa: E402


def pairs(name: str, ckpt: Path, calibration: Path, args: argparse.Namespace, ref_serving,
          ref_code: Path, work: Path):
    """(backend label, today's predict, the revision's predict) of one checkpoint."""
    load = ref_serving.Segmenter.from_checkpoint
    today, before = Segmenter.from_checkpoint(ckpt, device="cpu"), load(ckpt, device="cpu")
    yield "torch", today, before
    if not args.onnx:
        return
    stem = ckpt.stem
    new = export_with(REPO, ckpt, work / name / "today", calibration, args.calibration_count)
    old = export_with(ref_code, ckpt, work / name / "ref", calibration, args.calibration_count)
    for precision, suffix in (("fp32", ""), ("int8", ".int8")):
        yield (f"onnxruntime {precision}", Segmenter.load(new / f"{stem}{suffix}.json"),
               Segmenter.load(old / f"{stem}{suffix}.json"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", required=True, help="git revision to compare against")
    parser.add_argument("--models", nargs="*", default=[], type=Path, help=".safetensors")
    parser.add_argument("--annotations", type=Path)
    parser.add_argument("--images", type=Path)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--calibration-count", type=int, default=8)
    parser.add_argument("--score-atol", type=float, default=1e-4,
                        help="largest score difference of the same instance")
    parser.add_argument("--benchmark-models", action="store_true")
    parser.add_argument("--onnx", action="store_true", help="also compare the exports")
    parser.add_argument("--name", default="revision_equality")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ref_serving, ref_code = import_ref(args.ref, work), revision_code(args.ref, work)
        runs = [(str(p), p, args.images, list(coco_items(args.annotations, args.images,
                                                           args.count))) for p in args.models]
        for case, ckpt, items in (benchmark_checkpoints(work) if args.benchmark_models else []):
            size = items[0][0].shape[:2]
            runs.append((case, ckpt, calibration_images(work / f"cal_{case}", size,
                                                         args.calibration_count), items))
        for name, ckpt, calibration, items in runs:
            label = Path(name).parent.name or name
            for backend, today, before in pairs(label, ckpt, calibration, args, ref_serving,
                                                ref_code, work):
                for mode in ("automatic", "prompted"):
                    picked = [(im, None if mode == "automatic" else bx) for im, bx in items
                              if mode == "automatic" or (bx is not None and len(bx))]
                    r = compare_predictions(
                        lambda im, bx, s=today: s.predict(im, boxes=bx),
                        lambda im, bx, s=before: s.predict(im, boxes=bx), picked,
                        score_atol=args.score_atol)
                    results.append({"model": name, "backend": backend, "mode": mode, **r})
                    rows.append([name, backend, mode, r["images"], r["instances"],
                                 "yes" if r["same_instances"] else "NO",
                                 f"{r['max_score_diff']:.1e}",
                                 f"{r['identical_masks']} / {r['instances']}",
                                 f"{r['min_iou']:.5f}",
                                 ", ".join("{} of {} px".format(*m) for m in r["below_0999"])
                                 or "none"])
                    print(rows[-1], flush=True)
    # A float sum in another order flips only pixels whose probability lies within rounding
    # of the threshold: a mask passes at IoU >= 0.999 or with one pixel that differs.
    ok = all(r["same_instances"] and all(px <= 1 for px, _ in r["below_0999"])
             for r in results)
    payload = {"machine": machine_info(), "command": "python " + " ".join(sys.argv),
               "ref": commit_of(args.ref), "results": results, "all_equal": ok}
    text = "\n\n".join([
        f"# Today's network and export code vs {args.ref} ({payload['ref'][:10]})",
        machine_markdown(payload["machine"]), f"Command: `{payload['command']}`",
        "Same weights; torch: both `serving` packages; onnxruntime: both `export` packages' "
        "graphs (fp32, and INT8 calibrated on the same images) under today's `Segmenter`. "
        f"Same instances = equal boxes and labels, scores within {args.score_atol:g}; masks "
        "compared pixel for pixel (IoU of each instance's full-size mask); for each mask under "
        "0.999 IoU, its pixels that differ and its area. "
        f"All within 0.999 IoU or one pixel: {'yes' if ok else '**no**'}.",
        markdown_table(["model", "backend", "mode", "images", "instances", "same instances",
                        "largest score difference", "identical masks", "lowest mask IoU",
                        "masks under 0.999 IoU: pixels that differ"], rows),
    ])
    write_results(Path(args.output), args.name, payload, text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
