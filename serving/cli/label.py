"""``python -m serving label``: turn a box-only COCO dataset into a mask dataset.

Every non-crowd box annotation gets the box-prompted mask of the model (the annotation's
category is the prompt's class when its name is one of the model's classes; otherwise the
model predicts it). The output is the input JSON with, on each labelled annotation:

- ``segmentation``: RLE ``{"size": [h, w], "counts": str}`` (default) or polygons
  (``--format polygon``, outer boundaries only; a mask with no polygon of 3+ vertices keeps
  RLE);
- ``area``: the mask's pixel count;
- ``score``: the Segmenter's prompt score in [0, 1] (the label's quality estimate).

Everything else (images, categories, ids, other fields, crowd annotations) is kept. An
annotation with a bad box (reversed, zero-area, NaN, outside the image) or on an image that
cannot be read is reported on stderr with its id and left as it was. Finished images are
logged in ``.<output name>.progress.jsonl`` next to the output, so an interrupted run resumes.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BoxError, InputError, SimError
from ..files import write_json
from ..formats.coco import check_image_size, coco_box, read_coco_json
from ..inference.images import load_image
from ..segmenter import Segmenter
from .common import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    ProgressLog,
    add_run_options,
    check_model_path,
    check_writable_file,
    one_line,
    prefetch,
    report,
    run_batch,
    run_exit_code,
)


@dataclass
class LabelSummary:
    """What a ``label`` run did. ``metrics``: ``evaluate_coco`` keys (``segm/AP`` ...)."""

    labelled: int
    failed_images: list[tuple[str, str]] = field(default_factory=list)
    rejected: list[tuple[Any, str]] = field(default_factory=list)
    rle_fallback: int = 0
    metrics: dict[str, float] | None = None
    interrupted: bool = False
    output: Path = Path(".")

    @property
    def exit_code(self) -> int:
        return run_exit_code(self.interrupted, self.failed_images, self.rejected)


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


def run_label(model: str, annotations: str, images: str, output: str, fmt: str = "rle",
              evaluate: bool | str = False, batch_size: int = 4, device: str = "auto",
              dtype: str = "fp32",
              workers: int = 2, overwrite: bool = False, progress: bool = True,
              ) -> LabelSummary:
    """Run the ``label`` command (see the module docstring); returns its summary.

    ``evaluate``: ``True`` compares with the input's masks, a path with that COCO JSON's.

    Raises :class:`SimError` subclasses (one-line messages) for problems found before work.
    """
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size}: must be at least 1")
    if fmt not in ("rle", "polygon"):
        raise InputError(f"--format {fmt}: choose rle or polygon")
    out = check_writable_file(output)
    if out.exists() and Path(annotations).exists() and out.samefile(annotations):
        raise InputError(f"output {out}: is the input annotations file; write the labels to "
                         "another file")
    model_path = check_model_path(model)
    image_dir = Path(images)
    if not image_dir.is_dir():
        raise InputError(f"images {image_dir}: not a folder; pass the dataset's image folder")
    dataset = read_coco_json(annotations, "annotations")
    if fmt == "polygon":
        from ..formats.polygons import require_polygon_support

        require_polygon_support()
    gt = None
    if evaluate:
        gt_name = annotations if evaluate is True else str(evaluate)
        gt = dataset if evaluate is True else read_coco_json(gt_name, "masks")
        if not _has_masks(gt):
            raise InputError(f"--evaluate: {gt_name} lacks masks on some annotations, so there "
                             "is nothing to compare with; pass --evaluate MASKS_JSON")
    signature = {"command": "label", "model": str(model_path.resolve()),
                 "annotations": str(Path(annotations).resolve()), "format": fmt}
    log = ProgressLog(out.parent / f".{out.name}.progress.jsonl", signature)
    if overwrite:
        log.path.unlink(missing_ok=True)
    records = log.load()

    seg = Segmenter.load(model_path, device=device, dtype=dtype)
    cat_names = {c["id"]: str(c["name"]) for c in dataset["categories"]}
    anns_by_image: dict[Any, list[dict[str, Any]]] = {img["id"]: [] for img in dataset["images"]}
    summary = LabelSummary(0, output=out)
    for ann in dataset["annotations"]:
        if ann["image_id"] not in anns_by_image:
            summary.rejected.append((ann["id"], f"image id {ann['image_id']} not in 'images'"))
            report(f"rejected: annotation {ann['id']}: image id {ann['image_id']} is not in "
                   "'images'; left unchanged")
        elif not ann.get("iscrowd", 0):
            anns_by_image[ann["image_id"]].append(ann)
    todo = [img for img in dataset["images"] if str(img["id"]) not in records]

    def load(img: dict[str, Any]) -> np.ndarray:
        if not anns_by_image[img["id"]]:
            return np.zeros((0, 0, 3), np.uint8)  # nothing to label: do not decode
        image = load_image(image_dir / str(img["file_name"]))
        check_image_size(img, image, str(image_dir / str(img["file_name"])))
        return image

    from tqdm import tqdm

    bar = tqdm(total=len(dataset["images"]), initial=len(dataset["images"]) - len(todo),
               unit="img", desc="label", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)

    def flush(batch: list[tuple[dict[str, Any], np.ndarray]]) -> None:
        prompts, kept_ids, rejected = [], [], []
        for img, image in batch:
            boxes, labels, ids, bad = [], [], [], []
            for ann in anns_by_image[img["id"]]:
                try:
                    boxes.append(coco_box(ann, image.shape[:2]))
                except BoxError as exc:
                    report(f"rejected: {exc}; left without segmentation")
                    bad.append({"id": ann["id"], "reason": str(exc)})
                    continue
                name = cat_names.get(ann.get("category_id"))
                labels.append(seg.class_names.index(name) if name in seg.class_names else -1)
                ids.append(ann["id"])
            prompts.append((np.array(boxes, np.float32).reshape(-1, 4),
                            np.array(labels, np.int64)))
            kept_ids.append(ids)
            rejected.append(bad)
        preds = run_batch(seg, [im for _, im in batch], prompts, batch_size)
        for (img, _), pred, ids, bad in zip(batch, preds, kept_ids, rejected, strict=True):
            if isinstance(pred, Exception):
                report(f"skipped: image {img['file_name']} (id {img['id']}): {one_line(pred)}")
                summary.failed_images.append((str(img["file_name"]), one_line(pred)))
                bar.update(1)
                continue
            labelled = []
            for i, ann_id in enumerate(ids):
                segm, fallback = _encode(pred.masks[i], fmt)
                labelled.append({"id": ann_id, "segmentation": segm,
                                 "area": int(pred.masks[i].sum()),
                                 "score": round(float(pred.scores[i]), 5), "rle": fallback})
            record = {"key": str(img["id"]), "anns": labelled, "rejected": bad}
            log.append(record)
            records[record["key"]] = record
            bar.update(1)

    batch: list[tuple[dict[str, Any], np.ndarray]] = []
    try:
        for img, image, error in prefetch(todo, load, workers, 2 * batch_size + workers):
            if error is not None:
                reason = one_line(error)
                report(f"skipped: {reason}; its {len(anns_by_image[img['id']])} boxes are left "
                       "without segmentation")
                summary.failed_images.append((str(img["file_name"]), reason))
                bar.update(1)
                continue
            if image.size == 0:  # no boxes on this image
                record = {"key": str(img["id"]), "anns": [], "rejected": []}
                log.append(record)
                records[record["key"]] = record
                bar.update(1)
                continue
            batch.append((img, image))  # type: ignore[arg-type]
            if len(batch) == batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    except KeyboardInterrupt:
        summary.interrupted = True
        report("interrupted: finished images are saved in the progress log; rerun the same "
               "command to continue")
    finally:
        bar.close()
    if summary.interrupted:
        return summary

    result = copy.deepcopy(dataset)
    by_id = {ann["id"]: ann for ann in result["annotations"]}
    labelled_ids = set()
    for img in dataset["images"]:
        record = records.get(str(img["id"]))
        if record is None:
            continue
        for entry in record["anns"]:
            ann = by_id[entry["id"]]
            ann.update(segmentation=entry["segmentation"], area=entry["area"],
                       score=entry["score"])
            labelled_ids.add(entry["id"])
            summary.rle_fallback += bool(entry["rle"])
        summary.rejected += [(bad["id"], bad["reason"]) for bad in record["rejected"]]
    summary.labelled = len(labelled_ids)
    write_json(out, result)
    if gt is not None:
        from ..formats.cocoeval import evaluate_coco

        summary.metrics = evaluate_coco(gt, labels_to_results(result, labelled_ids),
                                        iou_types=("segm",))
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serving label",
        description="Auto-label a box-only COCO dataset: one box-prompted mask per box. Exit "
                    "codes: 0 ok, 1 error before work, 2 bad arguments, 3 some images failed "
                    "or boxes were rejected, 130 interrupted (rerun to continue).")
    parser.add_argument("--model", required=True, metavar="PATH",
                        help="checkpoint (.safetensors), ONNX file (.onnx) or TensorRT engine")
    parser.add_argument("--annotations", required=True, metavar="BOXES_COCO_JSON",
                        help="COCO JSON with box annotations")
    parser.add_argument("--images", required=True, metavar="DIR",
                        help="folder the JSON's file_name entries are relative to")
    parser.add_argument("--output", required=True, metavar="OUT_JSON",
                        help="where to write the labelled COCO JSON")
    parser.add_argument("--format", default="rle", choices=["rle", "polygon"],
                        help="segmentation encoding (polygon needs scikit-image)")
    parser.add_argument("--evaluate", nargs="?", const=True, default=False,
                        metavar="MASKS_JSON",
                        help="report mask AP of the labels against the input's masks, or "
                             "against MASKS_JSON (same image ids)")
    add_run_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m serving label``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        summary = run_label(args.model, args.annotations, args.images, args.output,
                            fmt=args.format, evaluate=args.evaluate,
                            batch_size=args.batch_size, device=args.device,
                            dtype=args.dtype,
                            workers=args.workers, overwrite=args.overwrite,
                            progress=not args.no_progress)
    except SimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:  # before the first image (while loading the model, ...)
        print("interrupted before any image was finished", file=sys.stderr)
        return EXIT_INTERRUPTED
    if summary.interrupted:
        return summary.exit_code
    print(f"label: {summary.labelled} annotations labelled, {len(summary.rejected)} rejected, "
          f"{len(summary.failed_images)} images failed; wrote {summary.output}")
    if summary.rle_fallback:
        print(f"note: {summary.rle_fallback} masks had no polygon (empty or too thin) and "
              "were written as RLE")
    if summary.metrics is not None:
        print("mask AP of the labels (pycocotools COCOeval; -1 = no instance of that size):")
        for key, value in summary.metrics.items():
            print(f"{key:<10} {value:.4f}")
    return summary.exit_code
