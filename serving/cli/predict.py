"""``python -m serving predict``: batch inference on a folder, glob or list of images.

Writes into ``--output``:

- ``results.json``: COCO results (``image_id``, ``category_id``, ``bbox`` [x, y, w, h],
  ``score``, ``segmentation`` RLE with str counts; ``prompt_id`` = the box annotation id in
  box-prompted mode), rewritten atomically every 30 s and at the end;
- ``images.json``: the ``images`` (id, file_name, height, width) and ``categories`` those
  results refer to, so ``COCO("images.json").loadRes("results.json")`` works without a GT;
- ``vis/<name>.jpg`` overlays (``--save-vis``) and ``masks/<name>_<i>.png`` instance masks
  (``--save-masks png``; 0/255, ``i`` = the result's index within the image);
- ``.progress.jsonl``: one line per finished image (fsync'ed); a rerun skips those images.

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

from ..errors import BoxError, ImageError, InputError, SimError
from ..files import write_json
from ..formats.coco import check_image_size, coco_box, read_coco_json
from ..inference.images import load_image
from ..prediction import Prediction
from ..segmenter import Segmenter
from .common import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    ImageFile,
    ProgressLog,
    add_run_options,
    check_model_path,
    check_writable_dir,
    find_images,
    one_line,
    prefetch,
    report,
    run_batch,
    run_exit_code,
)

PROGRESS_FILE = ".progress.jsonl"
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

    @property
    def exit_code(self) -> int:
        return run_exit_code(self.interrupted, self.failed, self.rejected_boxes)


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


class _PredictRun:
    """State of one run: where outputs go and what has been finished."""

    def __init__(self, seg: Segmenter, out: Path, log: ProgressLog,
                 records: dict[str, dict[str, Any]], category_ids: list[int],
                 save_vis: bool, save_masks: bool) -> None:
        self.seg, self.out, self.log, self.records = seg, out, log, records
        self.category_ids, self.save_vis, self.save_masks = category_ids, save_vis, save_masks
        self.instances = 0

    def is_done(self, key: str) -> bool:
        rec = self.records.get(key)
        return (rec is not None and (not self.save_vis or rec.get("vis") is not None)
                and (not self.save_masks or rec.get("masks") is not None))

    def finish(self, f: ImageFile, image_id: int, file_name: str, image: np.ndarray,
               pred: Prediction, prompt_ids: list[Any] | None,
               rejected: list[dict[str, Any]]) -> None:
        results = pred.to_coco(image_id, self.category_ids)
        for res, pid in zip(results, prompt_ids or [], strict=False):
            res["prompt_id"] = pid
        vis = masks = None
        if self.save_vis:
            vis = f"vis/{f.name}.jpg"
            (self.out / vis).parent.mkdir(parents=True, exist_ok=True)
            from ..formats.visualize import draw_predictions

            Image.fromarray(draw_predictions(image, pred)).save(self.out / vis, quality=90)
        if self.save_masks:
            masks = []
            for i in range(len(pred)):
                rel = f"masks/{f.name}_{i}.png"
                (self.out / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pred.masks[i].astype(np.uint8) * 255).save(self.out / rel)
                masks.append(rel)
        record = {"key": str(f.path), "file_name": file_name, "image_id": image_id,
                  "height": int(image.shape[0]), "width": int(image.shape[1]),
                  "results": results, "vis": vis, "masks": masks, "rejected": rejected}
        self.log.append(record)  # the record is written last: it implies the files exist
        self.records[record["key"]] = record
        self.instances += len(results)

    def write_outputs(self, files: list[ImageFile], categories: list[dict[str, Any]]) -> None:
        recs = [self.records[str(f.path)] for f in files if str(f.path) in self.records]
        recs.sort(key=lambda r: r["image_id"])
        write_json(self.out / "results.json", [res for r in recs for res in r["results"]])
        write_json(self.out / "images.json", {
            "images": [{"id": r["image_id"], "file_name": r["file_name"], "height": r["height"],
                        "width": r["width"]} for r in recs],
            "categories": categories,
        })


def _clear(out: Path, log: ProgressLog) -> None:
    """``--overwrite``: delete what an earlier run in ``out`` wrote (and only that)."""
    for rec in log.read_any():
        for rel in [rec.get("vis")] + list(rec.get("masks") or []):
            if rel:
                (out / rel).unlink(missing_ok=True)
    for name in (PROGRESS_FILE, "results.json", "images.json"):
        (out / name).unlink(missing_ok=True)


def run_predict(model: str, inputs: Sequence[str], output: str, boxes: str | None = None,
                batch_size: int = 4, device: str = "auto", score_threshold: float | None = None,
                dtype: str = "fp32",
                save_vis: bool = False, save_masks: str | None = None, workers: int = 2,
                overwrite: bool = False, progress: bool = True) -> PredictSummary:
    """Run the ``predict`` command (see the module docstring); returns its summary.

    Raises :class:`SimError` subclasses (one-line messages) for problems found before any
    work; per-image problems are reported on stderr and counted instead.
    """
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size}: must be at least 1")
    out = check_writable_dir(output)
    model_path = check_model_path(model)
    files = find_images(inputs, exclude=out)
    coco = read_coco_json(boxes, "boxes") if boxes else None
    matched = {}
    if coco is not None:
        matched = _match_boxes(files, coco)
        if not matched:
            raise InputError(f"boxes {boxes}: no input image matches a file_name in it; check "
                             "--input or the JSON's file names")
        if len(matched) < len(files):
            report(f"note: {len(files) - len(matched)} images have no entry in {boxes}; "
                   "skipped")
        files = [f for f in files if f.path in matched]
    signature = {"command": "predict", "model": str(model_path.resolve()),
                 "boxes": str(Path(boxes).resolve()) if boxes else None,
                 "score_threshold": score_threshold}
    log = ProgressLog(out / PROGRESS_FILE, signature)
    if overwrite:
        _clear(out, log)
    records = log.load()

    seg = Segmenter.load(model_path, device=device, dtype=dtype)
    category_ids, categories = _categories(seg.class_names, coco)
    run = _PredictRun(seg, out, log, records, category_ids, save_vis, save_masks is not None)
    ids = {r["key"]: r["image_id"] for r in records.values()}
    next_id = max(ids.values(), default=0) + 1
    for f in files:
        if coco is not None:
            ids[str(f.path)] = matched[f.path][0]["id"]
        elif str(f.path) not in ids:
            ids[str(f.path)], next_id = next_id, next_id + 1
    todo = [f for f in files if not run.is_done(str(f.path))]
    summary = PredictSummary(len(files), len(files) - len(todo), 0, 0, output=out)

    from tqdm import tqdm

    bar = tqdm(total=len(files), initial=summary.done_before, unit="img", desc="predict",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)

    def fail(f: ImageFile, exc: BaseException) -> None:
        reason = one_line(exc)
        line = reason if str(f.path) in reason else f"image {f.path}: {reason}"
        report(f"skipped: {line}")
        summary.failed.append((str(f.path), reason))
        bar.update(1)

    def flush(batch: list[tuple[ImageFile, np.ndarray]]) -> None:
        prompts, prompt_ids, rejected = [], [], []
        cats = {c["id"]: str(c["name"]) for c in coco["categories"]} if coco else {}
        checked = []
        for f, image in batch:
            try:
                if coco is not None:
                    check_image_size(matched[f.path][0], image, str(f.path))
                checked.append((f, image))
            except ImageError as exc:
                fail(f, exc)
        batch = checked
        if not batch:
            return
        for f, image in batch:
            if coco is None:
                prompts.append(None)
                prompt_ids.append(None)
                rejected.append([])
                continue
            kept, pids, labels, bad = [], [], [], []
            for ann in matched[f.path][1]:
                try:
                    kept.append(coco_box(ann, image.shape[:2]))
                except BoxError as exc:
                    report(f"rejected: {f.path}: {exc}")
                    bad.append({"id": ann["id"], "reason": str(exc)})
                    continue
                pids.append(ann["id"])
                name = cats.get(ann.get("category_id"))
                labels.append(seg.class_names.index(name) if name in seg.class_names else -1)
            prompts.append((np.array(kept, np.float32).reshape(-1, 4),
                            np.array(labels, np.int64)))
            prompt_ids.append(pids)
            rejected.append(bad)
        preds = run_batch(seg, [im for _, im in batch], prompts, batch_size, score_threshold)
        for (f, image), pred, pids, bad in zip(batch, preds, prompt_ids, rejected, strict=True):
            if isinstance(pred, Exception):
                fail(f, pred)
                continue
            file_name = matched[f.path][0]["file_name"] if coco is not None else f.rel
            run.finish(f, ids[str(f.path)], file_name, image, pred, pids, bad)
            summary.done_now += 1
            bar.update(1)

    last_write = time.monotonic()
    batch: list[tuple[ImageFile, np.ndarray]] = []
    try:
        for f, image, error in prefetch(todo, lambda f: load_image(f.path), workers,
                                        depth=2 * batch_size + max(workers, 0)):
            if error is not None:
                fail(f, error)
                continue
            batch.append((f, image))  # type: ignore[arg-type]
            if len(batch) == batch_size:
                flush(batch)
                batch = []
                if time.monotonic() - last_write > WRITE_EVERY_S:
                    run.write_outputs(files, categories)
                    last_write = time.monotonic()
        if batch:
            flush(batch)
    except KeyboardInterrupt:
        summary.interrupted = True
        report(f"interrupted: {summary.done_before + summary.done_now} of {len(files)} images "
               "are saved; rerun the same command to continue")
    finally:
        bar.close()
        run.write_outputs(files, categories)
    summary.instances = run.instances
    summary.rejected_boxes = sum(len(records[str(f.path)].get("rejected") or [])
                                 for f in files if str(f.path) in records)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serving predict",
        description="Segment images (automatic, or one mask per box of a COCO JSON) and write "
                    "COCO results with RLE masks. Exit codes: 0 ok, 1 error before work, "
                    "2 bad arguments, 3 some images failed or boxes were rejected, "
                    "130 interrupted (rerun to continue).")
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
    """Entry point of ``python -m serving predict``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        summary = run_predict(args.model, args.input, args.output, boxes=args.boxes,
                              batch_size=args.batch_size, device=args.device,
                              dtype=args.dtype,
                              score_threshold=args.score_threshold, save_vis=args.save_vis,
                              save_masks=args.save_masks, workers=args.workers,
                              overwrite=args.overwrite, progress=not args.no_progress)
    except SimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:  # before the first image (while loading the model, ...)
        print("interrupted before any image was finished", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"predict: {summary.done_now} images segmented now, {summary.done_before} earlier, "
          f"{len(summary.failed)} failed, {summary.rejected_boxes} boxes rejected; "
          f"{summary.instances} instances")
    print(f"results: {summary.output / 'results.json'} (images: "
          f"{summary.output / 'images.json'})")
    return summary.exit_code
