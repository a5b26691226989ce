"""``sim label`` / ``python -m serving label``: turn a box-only dataset into a mask dataset.

The boxes come as COCO JSON, a YOLO detection folder or a Label Studio JSON export (picked by
the input's shape, or ``--input-format``; :mod:`serving.formats.boxsets` reads each into the
COCO form below) and the labels go out as COCO (below), a YOLO segmentation folder or Label
Studio predictions (``--format``; default: the input's own format).

Every non-crowd box annotation gets the box-prompted mask of the model (the annotation's
category is the prompt's class when its name is one of the model's classes; otherwise the
model predicts it). The output is the input JSON with, on each labelled annotation:

- ``segmentation``: RLE ``{"size": [h, w], "counts": str}`` (default) or polygons
  (``--format polygon``, outer boundaries only; a mask with no polygon of 3+ vertices keeps
  RLE);
- ``area``: the mask's pixel count;
- ``score``: the label's quality estimate in [0, 1] (:mod:`serving.inference.quality`: it
  ranks masks by their expected IoU with the object; 0 for a regrown empty mask).

Everything else (images, categories, ids, other fields, crowd annotations) is kept. An
annotation with a bad box (reversed, zero-area, NaN, outside the image) or on an image that
cannot be read is reported on stderr with its id and left as it was.

Resuming: finished images are logged next to the output (``.<output name>.progress.jsonl``,
one log per process). A rerun of the same command skips an image whose annotations and file
are unchanged and redoes one whose annotations or file changed; a log written with another
model or options is refused (``--overwrite`` starts again).

Several processes: ``accelerate launch --num_processes N -m serving label ...`` (add
``--multi_gpu`` on a machine without GPUs) splits the images between N processes and writes
the same output one process writes (docs/cli.md, "Label a large dataset").

``--evaluate``: mask AP of the labels against the input's own masks (they are never read
for labelling), or ``--evaluate MASKS_JSON`` against withheld masks of the same images (same
image ids), with :func:`serving.formats.cocoeval.evaluate_coco`, the evaluation command's code.

Exit codes: 0 every box labelled; 1 error before any work; 2 bad command line; 3 done, but some
images failed or some boxes were rejected; 130 interrupted (rerun to continue).
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..backends.locate import MODEL_HELP
from ..errors import InputError
from ..files import check_writable_dir, check_writable_file
from ..formats.box_dataset import BoxSet
from ..formats.boxsets import (
    INPUT_FORMATS,
    OUTPUT_ENCODING,
    output_format,
    read_boxes,
    write_labels,
)
from ..formats.coco import boxes_by_image, read_coco_json
from ..formats.labelstudio import read_label_config, result_names
from ..inference.domain import box_sizes, calibration_of, score_advice, size_advice
from ..segmenter import Segmenter
from ..sharding.progress import WorkRecords, file_stamp, fingerprint
from ..sharding.runner import JobRunner, RunPlan
from ..sharding.shards import Shard, batch_command, current_shard
from .common import (
    add_run_options,
    check_model_path,
    load_model,
    report,
    run_exit_code,
)
from .jobs import Job, Outcome, class_lookup, note_unknown_categories, run_jobs
from .label_report import EMPTY_FRACTION, LabelReport, is_empty


@dataclass
class LabelSummary:
    """What a ``label`` run did. ``metrics``: ``evaluate_coco`` keys (``segm/AP`` ...)."""

    labelled: int
    failed_images: list[tuple[str, str]] = field(default_factory=list)
    rejected: list[tuple[Any, str]] = field(default_factory=list)
    rle_fallback: int = 0
    #: Annotations whose mask is empty or near-empty (see :mod:`serving.cli.label_report`).
    empty: list[Any] = field(default_factory=list)
    report: LabelReport | None = None
    #: One-line warnings about the input against the model's own data (sizes, scores).
    advice: list[str] = field(default_factory=list)
    metrics: dict[str, float] | None = None
    #: One-line notes from writing the output format (masks it could not hold).
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False
    output: Path = Path(".")
    #: False in the processes other than 0 of a multi-process run: they write no output.
    merged: bool = True

    @property
    def exit_code(self) -> int:
        return run_exit_code(self.interrupted, self.failed_images, self.rejected)


@dataclass(frozen=True)
class LabelOptions:
    """The ``label`` command's options (see :func:`build_parser`)."""

    fmt: str = "rle"
    evaluate: bool | str = False
    batch_size: int = 4
    device: str = "auto"
    workers: int = 2
    overwrite: bool = False
    progress: bool = True
    skip_empty: bool = False
    image_size: tuple[int, ...] | None = None
    dtype: str = "fp32"
    #: ``auto``, ``coco``, ``yolo`` or ``labelstudio`` (:mod:`serving.formats.boxsets`).
    input_format: str = "auto"
    #: A Label Studio labelling config (XML text) naming the results written.
    label_config: str | None = None
    box_scale: bool = True

    @property
    def encoding(self) -> str:
        """The COCO mask encoding the output format is made from (``rle`` or ``polygon``)."""
        return OUTPUT_ENCODING[self.fmt]


def _encode(mask: np.ndarray, fmt: str) -> tuple[Any, bool]:
    """COCO segmentation of an (H, W) bool mask; returns (segmentation, fell back to RLE)."""
    if fmt == "polygon":
        from ..formats.polygons import mask_to_polygons

        polygons = mask_to_polygons(mask)
        if polygons:
            return polygons, False
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}, fmt != "rle"


def labels_to_results(dataset: dict[str, Any], ann_ids: set[Any] | None = None,
                      ) -> list[dict[str, Any]]:
    """COCO results list from labelled annotations (those with a ``score``, or ``ann_ids``):
    ``image_id``, ``category_id``, ``bbox``, ``segmentation`` and ``score`` copied over."""
    results = []
    for ann in dataset["annotations"]:
        chosen = ann["id"] in ann_ids if ann_ids is not None else "score" in ann
        if chosen and ann.get("segmentation") and "score" in ann:
            results.append({k: ann[k] for k in ("image_id", "category_id", "bbox",
                                                 "segmentation", "score") if k in ann})
    return results


def _has_masks(dataset: dict[str, Any]) -> bool:
    anns = [a for a in dataset["annotations"] if not a.get("iscrowd", 0)]
    return bool(anns) and all(a.get("segmentation") for a in anns)


def _checked_inputs(model: str, annotations: str, images: str, output: str,
                    opts: LabelOptions) -> tuple[Path, Path, Path, BoxSet, LabelOptions]:
    """Check every path and option before any work; returns (model, images, output, boxes,
    the options with the output format settled)."""
    if opts.batch_size < 1:
        raise InputError(f"--batch-size {opts.batch_size}: must be at least 1")
    model_path = check_model_path(model)
    image_dir = Path(images)
    if not image_dir.is_dir():
        raise InputError(f"images {image_dir}: not a folder; pass the dataset's image folder")
    boxes = read_boxes(annotations, image_dir, opts.input_format)
    opts = replace(opts, fmt=output_format(opts.fmt, boxes.source))
    out = check_writable_dir(output) if opts.fmt == "yolo" else check_writable_file(output)
    if out.exists() and Path(annotations).exists() and out.samefile(annotations):
        raise InputError(f"output {out}: is the input annotations file; write the labels to "
                         "another file")
    if opts.fmt == "labelstudio":
        from ..formats.labelstudio import brush_module

        brush_module()
    if opts.label_config is not None:
        result_names(opts.label_config, "brush")  # not XML: stop before any work
    if opts.encoding == "polygon":
        from ..formats.polygons import require_polygon_support

        require_polygon_support()
    return model_path, image_dir, out, boxes, opts


def _ground_truth(dataset: dict[str, Any], annotations: str,
                  evaluate: bool | str) -> dict[str, Any] | None:
    """The masks ``--evaluate`` compares with (checked before any work), or ``None``."""
    if not evaluate:
        return None
    gt_name = annotations if evaluate is True else str(evaluate)
    gt = dataset if evaluate is True else read_coco_json(gt_name, "masks")
    if not _has_masks(gt):
        raise InputError(f"--evaluate: {gt_name} lacks masks on some annotations, so there "
                         "is nothing to compare with; pass --evaluate MASKS_JSON")
    return gt


def label_jobs(dataset: dict[str, Any], image_dir: Path,
               ) -> tuple[list[Job], list[tuple[Any, str]]]:
    """One job per image (its non-crowd annotations prompt the model), and the annotations
    that name an image id missing from ``images`` (rejected: ``(id, reason)``)."""
    anns: dict[Any, list[dict[str, Any]]] = {img["id"]: [] for img in dataset["images"]}
    orphans = []
    for ann in dataset["annotations"]:
        if ann["image_id"] not in anns:
            orphans.append((ann["id"], f"image id {ann['image_id']} not in 'images'"))
        elif not ann.get("iscrowd", 0):
            anns[ann["image_id"]].append(ann)
    jobs = []
    for img in dataset["images"]:
        path = image_dir / str(img["file_name"])
        own = anns[img["id"]]
        stamp = file_stamp(path) if own else None
        jobs.append(Job(str(img["id"]), path, fingerprint(img, own, stamp), img, own,
                        skip=not own))
    return jobs, orphans


def _entry(outcome: Outcome, fmt: str) -> dict[str, Any]:
    """The progress-log entry of a finished image: its labelled annotations and rejections."""
    if outcome.error is not None:
        return {"error": outcome.error}
    labelled = []
    pred = outcome.prediction
    areas = pred.areas if pred is not None else None
    for i, ann_id in enumerate(outcome.prompt_ids):
        assert pred is not None and areas is not None
        segm, fallback = _encode(pred.mask(i), OUTPUT_ENCODING[fmt])  # one full-size mask at a time
        area = int(areas[i])
        labelled.append({"id": ann_id, "segmentation": segm, "area": area,
                         "score": round(float(pred.scores[i]), 5), "rle": fallback,
                         "empty": is_empty(area, pred.boxes[i])
                         or float(pred.scores[i]) == 0.0})  # 0: a fallback mask
    return {"anns": labelled, "rejected": outcome.rejected}


def _report(outcome: Outcome, shard: Shard) -> None:
    """Tell the user at once about a failed image or a refused box."""
    where = f"[process {shard.rank}] " if shard.world > 1 else ""
    img = outcome.job.entry or {}
    if outcome.error is not None:
        report(f"{where}skipped: image {img.get('file_name')} (id {img.get('id')}): "
               f"{outcome.error}; its {len(outcome.job.anns or [])} boxes are left without "
               "segmentation")
    for bad in outcome.rejected:
        report(f"{where}rejected: {bad['reason']}; left without segmentation")


def merge_labels(dataset: dict[str, Any], jobs: list[Job], records: dict[str, dict[str, Any]],
                 summary: LabelSummary, skip_empty: bool = False) -> dict[str, Any]:
    """The output dataset: ``dataset`` with every logged mask written into its annotation
    (an empty one flagged ``"sim_empty": true``, or left out with ``skip_empty``); fills the
    summary's counts and per-class / per-image report."""
    result = copy.deepcopy(dataset)
    by_id = {ann["id"]: ann for ann in result["annotations"]}
    names = {c["id"]: str(c["name"]) for c in dataset["categories"]}
    report = summary.report = LabelReport()
    for job in jobs:
        record = records.get(job.key)
        if record is None:
            continue
        for entry in record["anns"]:
            ann = by_id[entry["id"]]
            empty = bool(entry.get("empty"))
            report.add(names.get(ann.get("category_id"), "(unknown)"),
                       str(job.entry.get("file_name") if job.entry else job.key), entry["id"],
                       entry["score"], empty)
            summary.rle_fallback += bool(entry["rle"])
            if empty and skip_empty:
                continue
            ann.update(segmentation=entry["segmentation"], area=entry["area"],
                       score=entry["score"])
            if empty:
                ann["sim_empty"] = True
        summary.rejected += [(bad["id"], bad["reason"]) for bad in record["rejected"]]
    summary.empty = list(report.empty)
    summary.labelled = len(report.scores) - (len(report.empty) if skip_empty else 0)
    return result


def _runner(model_path: Path, annotations: str, out: Path, opts: LabelOptions,
            jobs: list[Job], shard: Shard) -> JobRunner:
    """The job runner; its signature holds everything that shapes a label but the
    per-image inputs (those are in each job's fingerprint)."""
    signature = {"command": "label", "model": str(model_path.resolve()),
                 "model_stamp": file_stamp(model_path), "format": opts.fmt,
                 "annotations": str(Path(annotations).resolve()),
                 "image_size": list(opts.image_size) if opts.image_size else None,
                 "dtype": opts.dtype, "box_scale": opts.box_scale}
    runner = JobRunner(RunPlan(out.parent, f".{out.name}.progress", signature, jobs), shard,
                       opts.progress, desc="label")
    if opts.overwrite:
        runner.clear(lambda log: None)
    return runner


def _before_work(seg: Segmenter, boxes: BoxSet, orphans: list[tuple[Any, str]],
                 summary: LabelSummary) -> None:
    """Process 0's notes before the work: entries the reader skipped, refused annotations,
    unknown categories, and whether the boxes' sizes suit the model's input size."""
    dataset = boxes.dataset
    for where, reason in boxes.skipped:
        report(f"skipped: {where}: {reason}")
    for ann_id, reason in orphans:
        report(f"rejected: annotation {ann_id}: {reason}; left unchanged")
    note_unknown_categories(dataset)
    if seg.box_scale:  # every box is put at the trained size: no size to choose
        return
    sizes = box_sizes(boxes_by_image(dataset), seg.cfg.min_size, seg.cfg.max_size)
    advice = size_advice(calibration_of(seg), sizes, seg.cfg.min_size, seg.cfg.max_size)
    if advice:
        summary.advice.append(advice)
        report(f"note: {advice}")


def _label_share(seg: Segmenter, jobs: list[Job], runner: JobRunner, dataset: dict[str, Any],
                 opts: LabelOptions, shard: Shard) -> bool:
    """Label this process's images; False when interrupted (the work so far is kept)."""
    class_of = class_lookup(dataset["categories"], seg.class_names)
    try:
        for outcome in run_jobs(seg, jobs, class_of, opts.batch_size, opts.workers):
            _report(outcome, shard)
            runner.record(outcome.job, _entry(outcome, opts.fmt))
    except KeyboardInterrupt:
        runner.close()
        report("interrupted: finished images are saved in the progress log; rerun the same "
               "command to continue")
        return False
    return True


def _write_output(seg: Segmenter, summary: LabelSummary, boxes: BoxSet, image_dir: Path,
                  jobs: list[Job], records: WorkRecords, gt: dict[str, Any] | None,
                  opts: LabelOptions) -> None:
    """Process 0: merge every process's labels into the output (in the output format),
    report and evaluate."""
    dataset = boxes.dataset
    names = {job.key: str((job.entry or {}).get("file_name")) for job in jobs}
    summary.failed_images += [(names[k], r["error"]) for k, r in records.failures.items()]
    result = merge_labels(dataset, jobs, records.results, summary, opts.skip_empty)
    result.setdefault("info", {})
    if isinstance(result["info"], dict):
        result["info"]["sim_label"] = {"model": str(seg.info.get("path", "")),
                                       "image_size": [seg.cfg.min_size, seg.cfg.max_size],
                                       "box_scale": seg.box_scale,
                                       "empty_fraction": EMPTY_FRACTION}
    summary.notes += write_labels(summary.output, result, boxes, opts.fmt, image_dir,
                                  {"label_config": opts.label_config,
                                   "model_version": _model_version(seg)})
    if opts.fmt not in ("rle", "polygon"):
        summary.rle_fallback = 0  # the writer's own note counts the masks it left out
    assert summary.report is not None
    summary.report.write(report_path(summary.output))
    advice = score_advice(calibration_of(seg), summary.report.scores,
                          version=seg.prompt_score)
    if advice:
        summary.advice.append(advice)
    if gt is not None:
        from ..formats.cocoeval import evaluate_coco

        ids = {e["id"] for r in records.results.values() for e in r["anns"]}
        summary.metrics = evaluate_coco(gt, labels_to_results(result, ids), iou_types=("segm",))


def _model_version(seg: Segmenter) -> str:
    """The ``model_version`` written into Label Studio predictions: the model file's name."""
    return Path(str(seg.info.get("path", "sim"))).name or "sim"


def report_path(output: Path) -> Path:
    """Where the per-class / per-image report of ``output`` goes."""
    return output.with_name(output.stem + ".report.json")


def run_label(model: str, annotations: str, images: str, output: str, fmt: str | None = None,
              evaluate: bool | str = False, batch_size: int = 4, device: str = "auto",
              workers: int = 2, overwrite: bool = False, progress: bool = True,
              skip_empty: bool = False, image_size: Sequence[int] | None = None,
              dtype: str = "fp32", shard: Shard | None = None, input_format: str = "auto",
              label_config: str | None = None, box_scale: bool = True) -> LabelSummary:
    """Run the ``label`` command (see the module docstring); returns its summary.

    ``fmt``: the output format (:data:`serving.formats.boxsets.OUTPUT_ENCODING`; ``None``:
    the input format's own); ``input_format``: ``auto`` or the input's format;
    ``label_config``: a Label Studio labelling config file naming the results written.

    ``evaluate``: ``True`` compares with the input's masks, a path with that COCO JSON's.
    ``image_size``: ``(short side, long-side cap)`` at inference, instead of the model's;
    ``dtype``: ``fp32``, ``bf16`` or ``fp16`` autocast for a checkpoint's network.
    ``box_scale``: each box at its own scale (``--box-scale``; an ``image_size`` turns it off).
    ``shard``: this process's place among several (default: from the launcher's environment).
    Only process 0 writes the output and evaluates; the others return an empty summary.

    Raises :class:`SimError` subclasses (one-line messages) for problems found before work.
    """
    config = read_label_config(label_config)
    opts = LabelOptions(fmt or "auto", evaluate, batch_size, device, workers, overwrite,
                        progress, skip_empty, tuple(image_size) if image_size else None, dtype,
                        input_format, config, box_scale)
    model_path, image_dir, out, boxes, opts = _checked_inputs(model, annotations, images,
                                                              output, opts)
    dataset = boxes.dataset
    gt = _ground_truth(dataset, annotations, evaluate)
    shard = shard or current_shard(device)
    jobs, orphans = label_jobs(dataset, image_dir)
    runner = _runner(model_path, annotations, out, opts, jobs, shard)
    summary = LabelSummary(0, rejected=list(orphans) + list(boxes.skipped), output=out)
    mine = runner.start()
    seg = load_model(model_path, shard.device or device, opts.image_size, opts.dtype,
                     opts.box_scale)
    if shard.is_main:
        _before_work(seg, boxes, orphans, summary)
    if not _label_share(seg, mine, runner, dataset, opts, shard):
        summary.interrupted = True
        return summary
    records = runner.finish()
    if shard.is_main:
        _write_output(seg, summary, boxes, image_dir, jobs, records, gt, opts)
    else:
        summary.merged = False
    return summary


def build_parser(prog: str = "python -m serving label") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Auto-label a box-only dataset (COCO, YOLO or a Label Studio export): one "
                    "box-prompted mask per box. Exit "
                    "codes: 0 ok, 1 error before work, 2 bad arguments, 3 some images failed "
                    "or boxes were rejected, 130 interrupted (rerun to continue).",
        epilog="examples:\n"
               "  sim label --model model.safetensors --annotations boxes.json --images imgs/ "
               "--output labelled.json\n"
               "  sim label ... --evaluate              # mask AP against the input's masks\n"
               "  accelerate launch --multi_gpu --num_processes 2 -m serving label ...  "
               "# 2 processes")
    parser.add_argument("--model", required=True, metavar="PATH",
                        help=MODEL_HELP)
    parser.add_argument("--annotations", required=True, metavar="BOXES",
                        help="the boxes: a COCO JSON, a YOLO labels folder (with classes.txt "
                             "or data.yaml) or a Label Studio JSON export")
    parser.add_argument("--input-format", default="auto", choices=list(INPUT_FORMATS),
                        help="format of --annotations (default: from its shape)")
    parser.add_argument("--images", required=True, metavar="DIR",
                        help="folder the JSON's file_name entries are relative to")
    parser.add_argument("--output", required=True, metavar="OUT",
                        help="where to write the labels: a JSON file, or a folder for yolo")
    parser.add_argument("--format", default=None, choices=list(OUTPUT_ENCODING),
                        help="output: COCO with rle or polygon masks, a YOLO segmentation "
                             "folder, Label Studio predictions as brush masks (labelstudio) "
                             "or polygons; default: the input's format (COCO: rle). Polygons "
                             "need scikit-image, labelstudio needs label-studio-converter")
    parser.add_argument("--label-config", default=None, metavar="XML",
                        help="Label Studio output: the project's labelling config, whose "
                             "BrushLabels/PolygonLabels name the results")
    parser.add_argument("--evaluate", nargs="?", const=True, default=False,
                        metavar="MASKS_JSON",
                        help="report mask AP of the labels against the input's masks, or "
                             "against MASKS_JSON (same image ids)")
    parser.add_argument("--skip-empty", action="store_true",
                        help="leave boxes whose mask is empty or near-empty without a "
                             "segmentation (default: write it, flagged \"sim_empty\": true)")
    add_run_options(parser)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m serving label") -> int:
    """Entry point of ``sim label`` (``prog``: the name ``--help`` shows); returns the exit
    code."""
    return batch_command("label", argv, build_parser(prog), _run_from_args, _print_summary)


def _run_from_args(args: argparse.Namespace, shard: Shard) -> LabelSummary:
    return run_label(args.model, args.annotations, args.images, args.output, fmt=args.format,
                     evaluate=args.evaluate, batch_size=args.batch_size, device=args.device,
                     workers=args.workers, overwrite=args.overwrite,
                     progress=not args.no_progress, skip_empty=args.skip_empty,
                     image_size=args.image_size, dtype=args.dtype, shard=shard,
                     input_format=args.input_format, label_config=args.label_config,
                     box_scale=args.box_scale == "on")


def _print_summary(summary: LabelSummary) -> None:
    """The end-of-run report on stdout (warnings on stderr)."""
    empty = len(summary.empty)
    left_out = summary.report is not None and summary.labelled < len(summary.report.scores)
    note = (f" ({empty} empty or near-empty left out)" if left_out else
            f" ({empty} of them empty or near-empty, flagged sim_empty)" if empty else "")
    print(f"label: {summary.labelled} annotations labelled{note}, {len(summary.rejected)} "
          f"rejected, {len(summary.failed_images)} images failed; wrote {summary.output}")
    if summary.report is not None and summary.report.scores:
        print("\n".join(summary.report.lines()))
        print(f"per-image report: {report_path(summary.output)}")
    for note in summary.notes:
        print(f"note: {note}")
    if summary.rle_fallback:
        print(f"note: {summary.rle_fallback} masks had no polygon (empty or too thin) and "
              "were written as RLE")
    for advice in summary.advice:
        print(f"warning: {advice}", file=sys.stderr)
    if summary.metrics is not None:
        print("mask AP of the labels in percent (pycocotools COCOeval; -1 = no instance of "
              "that size):")
        for key, value in summary.metrics.items():
            print(f"{key:<10} {value * 100 if value >= 0 else value:6.1f}")
