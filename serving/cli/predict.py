"""``sim predict`` / ``python -m serving predict``: batch inference on a folder, glob or list of
images.

Writes into ``--output``:

- ``results.json``: COCO results (``image_id``, ``category_id``, ``bbox`` [x, y, w, h],
  ``score``, ``segmentation`` RLE with str counts; ``prompt_id`` = the box annotation id in
  box-prompted mode), rewritten atomically every 30 s and at the end;
- ``images.json``: the ``images`` (id, file_name, height, width) and ``categories`` those
  results refer to, so ``COCO("images.json").loadRes("results.json")`` works without a GT;
- ``vis/<name>.jpg`` (or ``.png``) pictures (``--save-vis [jpg|png]``): in automatic mode only
  the instances scoring at least ``--vis-threshold`` (default: the model's calibrated
  F1-best threshold; ``results.json`` keeps every instance), labels sized to the image
  (``--vis-labels off`` hides them); ``masks/<name>_<i>.png`` instance masks
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from ..backends.locate import MODEL_HELP
from ..errors import InputError
from ..files import check_writable_dir, write_json
from ..formats.boxsets import OUTPUT_ENCODING, labelled_dataset, read_boxes, write_labels
from ..formats.coco import boxes_by_image
from ..inference.domain import box_sizes, calibration_of, score_advice, size_advice
from ..prediction import Prediction
from ..prompts import (
    ALL,
    CALIBRATED,
    SHOWN_THRESHOLD,
    ScoreThreshold,
    parse_threshold,
    threshold_value,
)
from ..segmenter import Segmenter
from ..sharding.progress import ProgressLog, WorkRecords, file_stamp, fingerprint
from ..sharding.runner import JobRunner, RunPlan
from ..sharding.shards import Shard, batch_command, current_shard
from .common import (
    ImageFile,
    add_run_options,
    check_model_path,
    find_images,
    load_model,
    report,
    run_exit_code,
)
from .jobs import Job, Outcome, class_lookup, note_unknown_categories, run_jobs

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
    """The ``predict`` command's options (see :func:`build_parser`).

    ``save_vis``: ``"jpg"``, ``"png"`` or ``None`` (``True`` means ``"jpg"``); ``save_masks``:
    ``"png"``/``True`` or ``None``/``False``.
    """

    boxes: str | None = None
    batch_size: int = 4
    device: str = "auto"
    score_threshold: ScoreThreshold = None  # None / "all": every instance
    save_vis: str | bool | None = None
    save_masks: str | bool | None = None
    workers: int = 2
    overwrite: bool = False
    progress: bool = True
    image_size: tuple[int, ...] | None = None
    vis_labels: bool = True
    vis_threshold: ScoreThreshold = None  # None: SHOWN_THRESHOLD ("calibrated")
    dtype: str = "fp32"
    #: Prompted masks also as ``yolo`` / ``labelstudio`` / ``labelstudio-polygon`` labels.
    fmt: str = "coco"
    box_scale: bool = True

    def __post_init__(self) -> None:
        vis = "jpg" if self.save_vis is True else (self.save_vis or None)
        if vis not in (None, "jpg", "png"):
            raise InputError(f"--save-vis {vis}: choose jpg or png")
        object.__setattr__(self, "save_vis", vis)
        object.__setattr__(self, "save_masks", bool(self.save_masks))
        if self.image_size:
            object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        if self.batch_size < 1:
            raise InputError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.fmt != "coco" and not self.boxes:
            raise InputError(f"--format {self.fmt}: labels need prompt boxes; add --boxes")
        for name in ("score_threshold", "vis_threshold"):
            value = getattr(self, name)
            try:
                threshold_value(value, 0.0)
            except InputError:
                raise InputError(f"--{name.replace('_', '-')} {value}: give a score in [0, 1], "
                                 f"{CALIBRATED} or {ALL}") from None
        if self.score_threshold == ALL or self.score_threshold == 0:
            object.__setattr__(self, "score_threshold", None)  # one spelling of "everything"


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
    coco = _read_prompt_boxes(opts.boxes, inputs) if opts.boxes else None
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


def _box_images(inputs: Sequence[str]) -> Path:
    """The folder YOLO and Label Studio boxes are scaled by: the first input folder."""
    return next((Path(i) for i in inputs if Path(i).is_dir()), Path("."))


def _read_prompt_boxes(boxes: str, inputs: Sequence[str]) -> dict[str, Any]:
    """``--boxes`` in any box format (:func:`serving.formats.boxsets.read_boxes`; YOLO and
    Label Studio boxes are scaled by the images in the first input folder), as COCO. Entries
    the reader refuses are reported and left out."""
    boxset = read_boxes(boxes, _box_images(inputs), "auto", "boxes")
    for where, reason in boxset.skipped:
        report(f"skipped: {where}: {reason}")
    return boxset.dataset


def _write_labels(out: Path, inputs: Sequence[str], records: WorkRecords,
                  opts: PredictOptions) -> None:
    """``--format``: the prompted masks as labels of the boxes' dataset, in ``out/yolo`` or
    ``out/labelstudio.json`` (:func:`serving.formats.boxsets.write_labels`)."""
    folder = _box_images(inputs)
    assert opts.boxes is not None
    boxset = read_boxes(opts.boxes, folder, "auto", "boxes")
    results = [res for rec in records.results.values() for res in rec["results"]]
    labelled = labelled_dataset(boxset.dataset, results, OUTPUT_ENCODING[opts.fmt])
    target = out / ("yolo" if opts.fmt == "yolo" else "labelstudio.json")
    for note in write_labels(target, labelled, boxset, opts.fmt, folder):
        report(f"note: {note}")


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
                 category_ids: list[int], opts: PredictOptions,
                 vis_threshold: float | None) -> None:
        self.out, self.files, self.ids = out, files, ids
        self.category_ids, self.opts, self.vis_threshold = category_ids, opts, vis_threshold

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
                "width": int(image.shape[1]), "results": results,
                "vis": self._vis(f, image, pred, automatic=job.anns is None),
                "masks": self._masks(f, pred), "rejected": outcome.rejected}

    def _vis(self, f: ImageFile, image: np.ndarray, pred: Prediction,
             automatic: bool) -> str | None:
        """The picture of one image; automatic mode shows what scores at least the display
        threshold (``--vis-threshold``, else the model's calibrated one)."""
        if not self.opts.save_vis:
            return None
        from ..formats.visualize import draw_predictions

        if automatic and self.vis_threshold is not None:
            pred = pred.select(pred.scores >= self.vis_threshold)
        rel = f"vis/{f.name}.{self.opts.save_vis}"
        (self.out / rel).parent.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(draw_predictions(image, pred, show_labels=self.opts.vis_labels))
        picture.save(self.out / rel, **({"quality": 90} if self.opts.save_vis == "jpg" else {}))
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
    advice = score_advice(calibration_of(seg), scores, "prompt" if prompted else "auto",
                          version=seg.prompt_score)
    return [advice] if advice else []


def _summarise(summary: PredictSummary, jobs: list[Job], records: WorkRecords) -> None:
    mine = [r for r in records.results.values() if r.get("run") == records.run]
    summary.done_now = len(mine)
    summary.instances = sum(len(r["results"]) for r in mine)
    summary.failed = [(key, r["error"]) for key, r in records.failures.items()]
    summary.rejected_boxes = sum(len(records.results[j.key].get("rejected") or [])
                                 for j in jobs if j.key in records.results)


def _runner(model_path: Path, out: Path, jobs: list[Job], opts: PredictOptions,
            shard: Shard) -> JobRunner:
    """The job runner; its signature holds what shapes every result (per-image inputs are in
    each job's fingerprint); an image counts as done once its asked-for files exist."""
    signature = {"command": "predict", "model": str(model_path.resolve()),
                 "model_stamp": file_stamp(model_path),
                 "boxes": str(Path(opts.boxes).resolve()) if opts.boxes else None,
                 "score_threshold": opts.score_threshold,
                 "image_size": list(opts.image_size) if opts.image_size else None,
                 "dtype": opts.dtype, "box_scale": opts.box_scale}

    def is_done(job: Job, rec: dict[str, Any]) -> bool:
        vis = rec.get("vis")
        return (not opts.save_vis or (vis is not None and vis.endswith("." + opts.save_vis))) \
            and (not opts.save_masks or rec.get("masks") is not None)

    runner = JobRunner(RunPlan(out, PROGRESS_STEM, signature, jobs, is_done), shard,
                       opts.progress, desc="predict")
    if opts.overwrite:
        runner.clear(lambda log: _clear(out, log))
    return runner


def _size_check(seg: Segmenter, coco: dict[str, Any] | None, summary: PredictSummary) -> None:
    """Process 0, with prompt boxes: warn when their sizes do not suit the model's input
    (not with the per-box scale, which puts every box at the trained size itself)."""
    if coco is None or seg.box_scale:
        return
    sizes = box_sizes(boxes_by_image(coco), seg.cfg.min_size, seg.cfg.max_size)
    advice = size_advice(calibration_of(seg), sizes, seg.cfg.min_size, seg.cfg.max_size)
    if advice:
        summary.advice.append(advice)
        report(f"note: {advice}")


def _predict_share(seg: Segmenter, mine: list[Job], runner: JobRunner, writer: _Writer,
                   coco: dict[str, Any] | None, opts: PredictOptions,
                   flush: Callable[[dict[str, dict[str, Any]]], None]) -> WorkRecords | None:
    """Segment this process's images; process 0 rewrites the outputs every 30 s. Returns the
    whole job's records, or None when interrupted (the work so far is kept)."""
    shard = runner.shard
    class_of = class_lookup(coco["categories"], seg.class_names) if coco else lambda a: -1
    last_write = time.monotonic()
    try:
        for outcome in run_jobs(seg, mine, class_of, opts.batch_size, opts.workers,
                                opts.score_threshold):
            _report(outcome, shard)
            runner.record(outcome.job, writer.entry(outcome))
            if shard.is_main and time.monotonic() - last_write > WRITE_EVERY_S:
                flush(runner.records.results)
                last_write = time.monotonic()
        return runner.finish()
    except KeyboardInterrupt:
        runner.close()
        return None


def run_predict(model: str, inputs: Sequence[str], output: str, shard: Shard | None = None,
                **options: Any) -> PredictSummary:
    """Run the ``predict`` command (see the module docstring); returns its summary.

    ``options``: the fields of :class:`PredictOptions` (``boxes``, ``batch_size``, ``device``,
    ``save_vis``, ``image_size``, ...). ``shard``: this process's place among several
    (default: from the launcher's environment). Raises :class:`SimError` subclasses
    (one-line messages) for problems found before any work; per-image problems are reported
    on stderr and counted instead.
    """
    opts = PredictOptions(**options)
    out = check_writable_dir(output)
    model_path = check_model_path(model)
    shard = shard or current_shard(opts.device)
    jobs, files, coco = _plan(inputs, out, opts, notes=shard.is_main)
    runner = _runner(model_path, out, jobs, opts, shard)
    mine = runner.start()
    summary = PredictSummary(len(jobs), runner.done_before, 0, 0, output=out)
    seg = load_model(model_path, shard.device or opts.device, opts.image_size, opts.dtype,
                     opts.box_scale)
    if shard.is_main:
        _size_check(seg, coco, summary)
    category_ids, categories = _categories(seg.class_names, coco)
    shown = seg.score_cut(SHOWN_THRESHOLD if opts.vis_threshold is None else opts.vis_threshold)
    writer = _Writer(out, files, _image_ids(jobs, runner.records), category_ids, opts, shown)
    records = _predict_share(seg, mine, runner, writer, coco, opts,
                             lambda done: write_outputs(out, jobs, done, categories))
    if records is None:
        summary.interrupted = True
        report(f"interrupted: {summary.done_before + runner.records.this_run()} of {len(jobs)} "
               "images are saved; rerun the same command to continue")
        records = runner.records
    if not shard.is_main:
        summary.merged = False
        return summary
    write_outputs(out, jobs, records.results, categories)
    if opts.fmt != "coco":
        _write_labels(out, inputs, records, opts)
    _summarise(summary, jobs, records)
    if not summary.interrupted:
        summary.advice += _score_check(seg, records, prompted=coco is not None)
    return summary


def build_parser(prog: str = "python -m serving predict") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
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
                        help=MODEL_HELP)
    parser.add_argument("--input", required=True, nargs="+", metavar="DIR|GLOB|FILE",
                        help="folders (searched recursively), glob patterns or image files")
    parser.add_argument("--output", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--boxes", metavar="BOXES",
                        help="prompt boxes: a COCO JSON, YOLO labels folder or Label Studio "
                             "export whose images match the inputs by file name")
    parser.add_argument("--format", default="coco",
                        choices=["coco", "yolo", "labelstudio", "labelstudio-polygon"],
                        help="with --boxes: also write the masks as YOLO segmentation labels "
                             "(OUT/yolo) or Label Studio predictions (OUT/labelstudio.json)")
    parser.add_argument("--score-threshold", type=parse_threshold, default=ALL, metavar="T",
                        help="automatic mode, results.json: keep instances scoring at least T "
                             f"(a number in [0, 1]), '{CALIBRATED}' (the model's F1-best "
                             f"threshold; see 'sim info') or '{ALL}' (default: every instance)")
    parser.add_argument("--save-vis", nargs="?", const="jpg", default=None,
                        choices=["jpg", "png"],
                        help="write vis/<name>.jpg (or .png) pictures of the masks")
    parser.add_argument("--vis-threshold", type=parse_threshold, default=SHOWN_THRESHOLD,
                        metavar="T",
                        help="pictures of automatic mode show instances scoring at least T: a "
                             f"number, '{CALIBRATED}' (default, as the app and the server) or "
                             f"'{ALL}'")
    parser.add_argument("--vis-labels", choices=["on", "off"], default="on",
                        help="write class and score labels on the pictures (default on)")
    parser.add_argument("--save-masks", choices=["png"], default=None,
                        help="write masks/<name>_<i>.png per instance")
    add_run_options(parser)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m serving predict") -> int:
    """Entry point of ``sim predict`` (``prog``: the name ``--help`` shows); returns the exit
    code."""
    return batch_command("predict", argv, build_parser(prog), _run_from_args, _print_summary)


def _run_from_args(args: argparse.Namespace, shard: Shard) -> PredictSummary:
    return run_predict(args.model, args.input, args.output, shard=shard, boxes=args.boxes,
                       batch_size=args.batch_size, device=args.device,
                       score_threshold=args.score_threshold, save_vis=args.save_vis,
                       save_masks=args.save_masks, workers=args.workers,
                       overwrite=args.overwrite, progress=not args.no_progress,
                       image_size=args.image_size, vis_labels=args.vis_labels == "on",
                       vis_threshold=args.vis_threshold, dtype=args.dtype, fmt=args.format,
                       box_scale=args.box_scale == "on")


def _print_summary(summary: PredictSummary) -> None:
    print(f"predict: {summary.done_now} images segmented now, {summary.done_before} earlier, "
          f"{len(summary.failed)} failed, {summary.rejected_boxes} boxes rejected; "
          f"{summary.instances} instances")
    print(f"results: {summary.output / 'results.json'} (images: "
          f"{summary.output / 'images.json'})")
    for advice in summary.advice:
        print(f"warning: {advice}", file=sys.stderr)
