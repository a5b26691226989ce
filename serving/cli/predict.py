"""``sim predict`` / ``python -m serving predict``: batch inference on a folder, glob or list of
images.

Writes into ``--output``:

- ``results.json``: COCO results (``image_id``, ``category_id``, ``bbox`` [x, y, w, h],
  ``score``, ``segmentation`` RLE with str counts; ``prompt_id`` = the box annotation id in
  box-prompted mode), rewritten atomically every 30 s and at the end;
- ``images.json``: the ``images`` (id, file_name, height, width) and ``categories`` those
  results refer to, so ``COCO("images.json").loadRes("results.json")`` works without a GT;
- ``vis/<name>.jpg`` overlays (``--save-vis``) and ``masks/<name>_<i>.png`` instance masks
  (``--save-masks png``; 0/255, ``i`` = the result's index within the image);
- ``.progress.jsonl`` (one per process): one line per finished image (fsync'ed); a rerun
  skips images whose file (and prompt boxes) did not change.

Several processes: ``accelerate launch --num_processes N -m serving predict ...`` (add
``--multi_gpu`` on a machine without GPUs) splits the images and writes the same outputs.

Exit codes: 0 all images done; 1 error before any work (bad option, missing model, no images,
malformed boxes JSON, unwritable output); 2 bad command line; 3 finished, but some images
failed or some prompt boxes were rejected (each reported on stderr); 130 interrupted (work
so far is saved; rerun the same command to continue).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from ..errors import InputError, SimError
from ..files import write_json
from ..formats.coco import boxes_by_image, read_coco_json
from ..inference.domain import box_sizes, calibration_of, score_advice, size_advice
from ..segmenter import Segmenter
from .common import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    ImageFile,
    add_run_options,
    check_model_path,
    check_writable_dir,
    find_images,
    load_model,
    report,
    run_exit_code,
)
from .jobs import Job, Outcome, class_lookup, note_unknown_categories, run_jobs
from .main import prog
from .progress import ProgressLog, WorkRecords, file_stamp, fingerprint
from .runner import JobRunner, RunPlan
from .shards import Shard, current_shard, run_sharded

PROGRESS_STEM = ".progress"
WRITE_EVERY_S = 30.0


@dataclass
class PredictSummary:
    """What a ``predict`` run did. ``failed``: (image path, reason) of this run."""

    images: int
    done_before: int
    done_now: int
    instances: int
    failed: list[tuple[str, str]] = field(default_factory=list)
    rejected_boxes: int = 0
    interrupted: bool = False
    output: Path = Path(".")
    #: False in the processes other than 0 of a multi-process run: they write no output.
    merged: bool = True
    #: One-line warnings about the input against the model's own data (sizes, scores).
    advice: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return run_exit_code(self.interrupted, self.failed, self.rejected_boxes)


@dataclass(frozen=True)
class PredictOptions:
    """The ``predict`` command's options (see :func:`build_parser`)."""

    boxes: str | None = None
    batch_size: int = 4
    device: str = "auto"
    score_threshold: float | None = None
    save_vis: bool = False
    save_masks: bool = False
    workers: int = 2
    overwrite: bool = False
    progress: bool = True
    image_size: tuple[int, ...] | None = None


def _norm_name(file_name: str) -> str:
    return PurePosixPath(str(file_name).replace("\\", "/")).as_posix().removeprefix("./")


def _match_boxes(files: list[ImageFile], coco: dict[str, Any],
                 ) -> dict[Path, tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Image entry and non-crowd annotations of each file, matched on the COCO ``file_name``
    (the path below the input folder first, then the bare file name when unambiguous)."""
    by_path = {_norm_name(img["file_name"]): img for img in coco["images"]}
    by_base: dict[str, dict[str, Any] | None] = {}
    for img in coco["images"]:
        base = PurePosixPath(_norm_name(img["file_name"])).name
        by_base[base] = None if base in by_base else img
    anns: dict[Any, list[dict[str, Any]]] = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        if not ann.get("iscrowd", 0) and ann["image_id"] in anns:
            anns[ann["image_id"]].append(ann)
    matched = {}
    for f in files:
        img = by_path.get(f.rel) or by_base.get(PurePosixPath(f.rel).name)
        if img is not None:
            matched[f.path] = (img, anns[img["id"]])
    return matched


def _categories(class_names: Sequence[str], coco: dict[str, Any] | None,
                ) -> tuple[list[int], list[dict[str, Any]]]:
    """COCO category id of each model class (the boxes JSON's id where the names agree, new
    ids above the JSON's otherwise) and the category list to publish."""
    if coco is None:
        return ([i + 1 for i in range(len(class_names))],
                [{"id": i + 1, "name": n} for i, n in enumerate(class_names)])
    categories = [dict(c) for c in coco["categories"]]
    by_name: dict[str, int] = {}
    for c in categories:
        by_name.setdefault(str(c["name"]), c["id"])
    next_id = max([int(c["id"]) for c in categories], default=0) + 1
    ids = []
    for name in class_names:
        if name not in by_name:
            by_name[name] = next_id
            categories.append({"id": next_id, "name": name})
            next_id += 1
        ids.append(by_name[name])
    return ids, categories


def _plan(inputs: Sequence[str], out: Path, opts: PredictOptions, notes: bool = True,
          ) -> tuple[list[Job], dict[str, ImageFile], dict[str, Any] | None]:
    """Jobs for the input images (prompted by their boxes when ``--boxes`` is given), the
    files by job key, and the boxes JSON. ``notes``: report what is skipped (process 0)."""
    files = find_images(inputs, exclude=out)
    coco = read_coco_json(opts.boxes, "boxes") if opts.boxes else None
    matched: dict[Path, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    if coco is not None:
        matched = _match_boxes(files, coco)
        if not matched:
            raise InputError(f"boxes {opts.boxes}: no input image matches a file_name in it; "
                             "check --input or the JSON's file names")
        if len(matched) < len(files) and notes:
            report(f"note: {len(files) - len(matched)} images have no entry in {opts.boxes}; "
                   "skipped")
        if notes:
            note_unknown_categories(coco)
        files = [f for f in files if f.path in matched]
    jobs = []
    for f in files:
        entry, anns = matched.get(f.path, (None, None))
        jobs.append(Job(str(f.path), f.path, fingerprint(file_stamp(f.path), entry, anns),
                        entry, anns))
    return jobs, {str(f.path): f for f in files}, coco


def _image_ids(jobs: list[Job], records: WorkRecords) -> dict[str, int]:
    """COCO image id of each job: the boxes JSON's, the one an earlier run gave it, or the
    next free one in input order (so every process of a run assigns the same ids)."""
    ids = {key: int(r["image_id"]) for key, r in records.results.items()}
    next_id = max(ids.values(), default=0) + 1
    for job in jobs:
        if job.entry is not None:
            ids[job.key] = job.entry["id"]
        elif job.key not in ids:
            ids[job.key], next_id = next_id, next_id + 1
    return ids


class _Writer:
    """Writes what one finished image produces: pictures, mask PNGs and its log entry."""

    def __init__(self, out: Path, files: dict[str, ImageFile], ids: dict[str, int],
                 category_ids: list[int], opts: PredictOptions) -> None:
        self.out, self.files, self.ids = out, files, ids
        self.category_ids, self.opts = category_ids, opts

    def entry(self, outcome: Outcome) -> dict[str, Any]:
        if outcome.error is not None:
            return {"error": outcome.error}
        pred, image, job = outcome.prediction, outcome.image, outcome.job
        assert pred is not None and image is not None
        f, image_id = self.files[job.key], self.ids[job.key]
        results = pred.to_coco(image_id, self.category_ids)
        anns = {ann["id"]: ann for ann in job.anns or []}
        for res, pid in zip(results, outcome.prompt_ids, strict=False):
            res["prompt_id"] = pid
            if anns[pid].get("category_id") is not None:  # the box's own category, as label
                res["category_id"] = anns[pid]["category_id"]
        file_name = job.entry["file_name"] if job.entry is not None else f.rel
        return {"file_name": file_name, "image_id": image_id, "height": int(image.shape[0]),
                "width": int(image.shape[1]), "results": results, "vis": self._vis(f, image, pred),
                "masks": self._masks(f, pred), "rejected": outcome.rejected}

    def _vis(self, f: ImageFile, image: np.ndarray, pred: Any) -> str | None:
        if not self.opts.save_vis:
            return None
        from ..formats.visualize import draw_predictions

        rel = f"vis/{f.name}.jpg"
        (self.out / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(draw_predictions(image, pred)).save(self.out / rel, quality=90)
        return rel

    def _masks(self, f: ImageFile, pred: Any) -> list[str] | None:
        if not self.opts.save_masks:
            return None
        paths = []
        for i in range(len(pred)):
            rel = f"masks/{f.name}_{i}.png"
            (self.out / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pred.mask(i).astype(np.uint8) * 255).save(self.out / rel)
            paths.append(rel)
        return paths


def write_outputs(out: Path, jobs: list[Job], records: dict[str, dict[str, Any]],
                  categories: list[dict[str, Any]]) -> None:
    """``results.json`` and ``images.json`` from the finished images' records, by image id."""
    recs = sorted((records[j.key] for j in jobs if j.key in records),
                  key=lambda r: r["image_id"])
    write_json(out / "results.json", [res for r in recs for res in r["results"]])
    write_json(out / "images.json", {
        "images": [{"id": r["image_id"], "file_name": r["file_name"], "height": r["height"],
                    "width": r["width"]} for r in recs],
        "categories": categories,
    })


def _clear(out: Path, log: ProgressLog) -> None:
    """``--overwrite``: delete what an earlier run in ``out`` wrote (and only that)."""
    for rec in log.every_record():
        for rel in [rec.get("vis")] + list(rec.get("masks") or []):
            if rel:
                (out / rel).unlink(missing_ok=True)
    for name in ("results.json", "images.json"):
        (out / name).unlink(missing_ok=True)


def _report(outcome: Outcome, shard: Shard) -> None:
    where = f"[process {shard.rank}] " if shard.world > 1 else ""
    path = str(outcome.job.path)
    if outcome.error is not None:
        line = outcome.error if path in outcome.error else f"image {path}: {outcome.error}"
        report(f"{where}skipped: {line}")
    for bad in outcome.rejected:
        report(f"{where}rejected: {path}: {bad['reason']}")


def _score_check(seg: Segmenter, records: WorkRecords, prompted: bool) -> list[str]:
    """The out-of-domain warning for the finished images' scores (see
    :func:`serving.inference.domain.score_advice`), as a list of at most one line."""
    results = [r["results"] for r in records.results.values()]
    if prompted:
        scores = [res["score"] for rs in results for res in rs]
    else:
        scores = [max((res["score"] for res in rs), default=0.0) for rs in results]
    advice = score_advice(calibration_of(seg), scores, "prompt" if prompted else "auto")
    return [advice] if advice else []


def _summarise(summary: PredictSummary, jobs: list[Job], records: WorkRecords) -> None:
    mine = [r for r in records.results.values() if r.get("run") == records.run]
    summary.done_now = len(mine)
    summary.instances = sum(len(r["results"]) for r in mine)
    summary.failed = [(key, r["error"]) for key, r in records.failures.items()]
    summary.rejected_boxes = sum(len(records.results[j.key].get("rejected") or [])
                                 for j in jobs if j.key in records.results)


def run_predict(model: str, inputs: Sequence[str], output: str, boxes: str | None = None,
                batch_size: int = 4, device: str = "auto", score_threshold: float | None = None,
                save_vis: bool = False, save_masks: str | None = None, workers: int = 2,
                overwrite: bool = False, progress: bool = True,
                image_size: Sequence[int] | None = None,
                shard: Shard | None = None) -> PredictSummary:
    """Run the ``predict`` command (see the module docstring); returns its summary.

    ``shard``: this process's place among several (default: from the launcher's environment).
    Raises :class:`SimError` subclasses (one-line messages) for problems found before any
    work; per-image problems are reported on stderr and counted instead.
    """
    opts = PredictOptions(boxes, batch_size, device, score_threshold, save_vis,
                          save_masks is not None, workers, overwrite, progress,
                          tuple(image_size) if image_size else None)
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size}: must be at least 1")
    out = check_writable_dir(output)
    model_path = check_model_path(model)
    shard = shard or current_shard(device)
    jobs, files, coco = _plan(inputs, out, opts, notes=shard.is_main)
    signature = {"command": "predict", "model": str(model_path.resolve()),
                 "model_stamp": file_stamp(model_path),
                 "boxes": str(Path(boxes).resolve()) if boxes else None,
                 "score_threshold": score_threshold,
                 "image_size": list(opts.image_size) if opts.image_size else None}

    def is_done(job: Job, rec: dict[str, Any]) -> bool:
        return (not save_vis or rec.get("vis") is not None) and \
            (not opts.save_masks or rec.get("masks") is not None)

    runner = JobRunner(RunPlan(out, PROGRESS_STEM, signature, jobs, is_done), shard, progress,
                       desc="predict")
    if overwrite:
        runner.clear(lambda log: _clear(out, log))
    mine = runner.start()
    summary = PredictSummary(len(jobs), runner.done_before, 0, 0, output=out)
    seg = load_model(model_path, shard.device or device, opts.image_size)
    if coco is not None and shard.is_main:
        sizes = box_sizes(boxes_by_image(coco), seg.cfg.min_size, seg.cfg.max_size)
        advice = size_advice(calibration_of(seg), sizes, seg.cfg.min_size, seg.cfg.max_size)
        if advice:
            summary.advice.append(advice)
            report(f"note: {advice}")
    category_ids, categories = _categories(seg.class_names, coco)
    writer = _Writer(out, files, _image_ids(jobs, runner.records), category_ids, opts)
    class_of = class_lookup(coco["categories"], seg.class_names) if coco else lambda a: -1
    last_write = time.monotonic()
    try:
        for outcome in run_jobs(seg, mine, class_of, batch_size, workers, score_threshold):
            _report(outcome, shard)
            runner.record(outcome.job, writer.entry(outcome))
            if shard.is_main and time.monotonic() - last_write > WRITE_EVERY_S:
                write_outputs(out, jobs, runner.records.results, categories)
                last_write = time.monotonic()
        records = runner.finish()
    except KeyboardInterrupt:
        runner.close()
        summary.interrupted = True
        report(f"interrupted: {summary.done_before + runner.records.this_run()} of {len(jobs)} "
               "images are saved; rerun the same command to continue")
        records = runner.records
    if shard.is_main:
        write_outputs(out, jobs, records.results, categories)
        _summarise(summary, jobs, records)
        summary.advice += _score_check(seg, records, prompted=coco is not None)
    else:
        summary.merged = False
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("python -m serving predict"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Segment images (automatic, or one mask per box of a COCO JSON) and write "
                    "COCO results with RLE masks. Exit codes: 0 ok, 1 error before work, "
                    "2 bad arguments, 3 some images failed or boxes were rejected, "
                    "130 interrupted (rerun to continue).",
        epilog="examples:\n"
               "  sim predict --model model.onnx --input photos/ --output out/ --save-vis\n"
               "  sim predict --model model.safetensors --input 'imgs/**/*.jpg' "
               "--boxes boxes.json --output out/\n"
               "  accelerate launch --multi_gpu --num_processes 2 -m serving predict ...  "
               "# 2 processes")
    parser.add_argument("--model", required=True, metavar="PATH",
                        help="checkpoint (.safetensors), ONNX file (.onnx) or TensorRT engine")
    parser.add_argument("--input", required=True, nargs="+", metavar="DIR|GLOB|FILE",
                        help="folders (searched recursively), glob patterns or image files")
    parser.add_argument("--output", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--boxes", metavar="COCO_JSON",
                        help="prompt boxes: COCO JSON whose images match inputs by file_name")
    parser.add_argument("--score-threshold", type=float, default=None, metavar="T",
                        help="automatic mode: drop instances scoring below T")
    parser.add_argument("--save-vis", action="store_true", help="write vis/<name>.jpg overlays")
    parser.add_argument("--save-masks", choices=["png"], default=None,
                        help="write masks/<name>_<i>.png per instance")
    add_run_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sim predict``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.processes < 1:
        print(f"error: --processes {args.processes}: must be at least 1", file=sys.stderr)
        return EXIT_ERROR
    return run_sharded("predict", argv, args.processes, args.device,
                       lambda shard: _predict_command(args, shard))


def _predict_command(args: argparse.Namespace, shard: Shard) -> int:
    try:
        summary = run_predict(args.model, args.input, args.output, boxes=args.boxes,
                              batch_size=args.batch_size, device=args.device,
                              score_threshold=args.score_threshold, save_vis=args.save_vis,
                              save_masks=args.save_masks, workers=args.workers,
                              overwrite=args.overwrite, progress=not args.no_progress,
                              image_size=args.image_size, shard=shard)
    except SimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:  # before the first image (while loading the model, ...)
        print("interrupted before any image was finished", file=sys.stderr)
        return EXIT_INTERRUPTED
    if not summary.merged:
        return summary.exit_code
    print(f"predict: {summary.done_now} images segmented now, {summary.done_before} earlier, "
          f"{len(summary.failed)} failed, {summary.rejected_boxes} boxes rejected; "
          f"{summary.instances} instances")
    print(f"results: {summary.output / 'results.json'} (images: "
          f"{summary.output / 'images.json'})")
    for advice in summary.advice:
        print(f"warning: {advice}", file=sys.stderr)
    return summary.exit_code
