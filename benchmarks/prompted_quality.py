"""Box-prompted mask quality: every validation box as the prompt, each mask against its true mask.

For every box of a validation split with masks, the box-prompted mask's IoU with the object's
true mask. Per row (a way of prompting): mean and median IoU, the share of boxes under 0.5
IoU, mean IoU by box size (``sqrt(w * h)`` under 16, 16-32, 32-64, 64+ px), empty masks on
boxes of 8 px or more (``serving.cli.label_report.is_empty``: what ``sim label`` flags
``sim_empty``), COCO mask AP and AP75 of the labels (each box's mask with its score), Spearman's
rank correlation of the score with the IoU with its 95 % bootstrap interval (the boxes
resampled: how far the figure could move on another sample of boxes like these), and the time
per box against today's path (rows run side by side per image, so load hits every row alike).
The filled box is the floor.

Rows: ``today`` (the whole image at the model's size, ``box_scale`` off), ``today @ N`` (the
same at ``--image-size N`` for each of ``--sizes``, the best of them is the hand-picked size),
``default`` (the product's per-box scale) and ablations of its parts (``--rows``; always: "no
colour model", "+ largest component" and "score without crowding", the default's masks scored
without :func:`serving.inference.quality.crowding`).
``--upscale F`` runs every image, box and true mask F times larger (the image resized
bilinearly, the masks' pixels repeated): large images with large boxes.

    python benchmarks/prompted_quality.py --data nuclei \
        --model runs/quickstart_nuclei/model_final.safetensors
    python benchmarks/prompted_quality.py --data synthetic \
        --model runs/quickstart/model_final.safetensors --quick

Writes ``benchmarks/results/prompted_quality_<data>[_<tag>].{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    bootstrap_interval,
    coco_rle,
    interval_text,
    machine_info,
    machine_markdown,
    markdown_table,
    write_results,
)
from serving import Segmenter  # noqa: E402
from serving.cli.label_report import is_empty  # noqa: E402
from serving.formats.cocoeval import evaluate_coco  # noqa: E402
from serving.inference import quality, refine  # noqa: E402
from serving.inference.box_scale import BoxScaleOptions, segment_per_box, trained_sizes  # noqa: E402
from serving.inference.domain import calibration_of  # noqa: E402

DATA = {"nuclei": ("data/nuclei/val.json", "data/nuclei/images"),
        "synthetic": ("data/synthetic/val.json", "data/synthetic/images")}
SIZE_BINS = ((0, 16), (16, 32), (32, 64), (64, float("inf")))
#: Bins of a box's crowding (its highest IoU with another box of its image,
#: ``serving.inference.quality.crowding``): none, then (lo, hi].
CROWDING_BINS = ((0.0, 0.0), (0.0, 0.1), (0.1, 0.2), (0.2, 0.4), (0.4, 1.0))
#: Resamples of the boxes for Spearman's bootstrap interval.
RESAMPLES = 1000
#: Ablation rows: name -> BoxScaleOptions (the product's default is ``BoxScaleOptions()``).
ABLATIONS: dict[str, BoxScaleOptions] = {
    "crops only (no whole-image group)": BoxScaleOptions(group=False),
    "aim at the trained median": BoxScaleOptions(fit="median"),
    "aim at 0.8x the trained median": BoxScaleOptions(fit="median", target=0.8),
    "upsample at most 2x": BoxScaleOptions(max_upsample=2.0),
    "no fallback": BoxScaleOptions(fallback=False),
    "no refinement": BoxScaleOptions(refine=False),
    "+ test-time flip": BoxScaleOptions(flip=True),
}


def load_split(annotations: Path, images: Path, limit: int | None) -> list[dict[str, Any]]:
    """Per image: its path, (M, 4) float32 XYXY boxes, class names, annotation ids and (M, H, W)
    bool true masks (pycocotools)."""
    from pycocotools.coco import COCO

    coco = COCO(str(annotations))
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    out = []
    for image_id in sorted(coco.getImgIds())[:limit]:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False))
        if not anns:
            continue
        info = coco.loadImgs(image_id)[0]
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                           a["bbox"][1] + a["bbox"][3]] for a in anns], np.float32)
        out.append({"id": image_id, "path": images / info["file_name"], "boxes": boxes,
                    "labels": [names[a["category_id"]] for a in anns],
                    "ann_ids": [a["id"] for a in anns],
                    "masks": np.stack([coco.annToMask(a).astype(bool) for a in anns])})
    return out


def upscale_split(split: list[dict[str, Any]], gt: dict[str, Any], factor: int,
                  ) -> dict[str, Any]:
    """The split as if photographed ``factor`` times larger (large images, large boxes): each
    item's boxes times ``factor``, its true masks' pixels repeated ``factor`` x ``factor``
    (in place), ``item["upscale"]`` for :func:`measure` (which resizes the image bilinearly);
    returns ``gt`` with the same masks (RLE), boxes, areas and image sizes."""
    anns = {}
    for item in split:
        item["boxes"] = item["boxes"] * factor
        item["masks"] = item["masks"].repeat(factor, 1).repeat(factor, 2)
        item["upscale"] = factor
        for ann_id, mask, box in zip(item["ann_ids"], item["masks"], item["boxes"]):
            anns[ann_id] = {"segmentation": coco_rle(mask), "area": int(mask.sum()),
                            "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]),
                                     float(box[3] - box[1])]}
    images = [{**i, "width": i["width"] * factor, "height": i["height"] * factor}
              for i in gt["images"]]
    return {**gt, "images": images,
            "annotations": [{**a, **anns[a["id"]]} for a in gt["annotations"]]}


def filled_boxes(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(M, H, W) bool: each box's pixels (pixel centres inside the box)."""
    ys, xs = np.arange(size[0]) + 0.5, np.arange(size[1]) + 0.5
    return np.stack([(ys[:, None] > b[1]) & (ys[:, None] < b[3]) & (xs > b[0]) & (xs < b[2])
                     for b in boxes])


def ious(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(M,) IoU of paired (M, H, W) bool masks."""
    inter = (pred & true).reshape(len(pred), -1).sum(1)
    union = (pred | true).reshape(len(pred), -1).sum(1)
    return inter / np.maximum(union, 1)


Row = Callable[[np.ndarray, dict[str, Any]], tuple[np.ndarray, np.ndarray]]


def segmenter_row(seg: Segmenter) -> Row:
    """A row that runs ``seg.predict`` with the image's boxes and class names."""
    def run(array: np.ndarray, item: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        pred = seg.predict(array, boxes=item["boxes"], labels=item["labels"])
        return pred.masks, pred.scores
    return run


def options_row(seg: Segmenter, options: BoxScaleOptions) -> Row:
    """A row that runs the per-box scale with ``options`` instead of the default."""
    size = trained_sizes(calibration_of(seg))

    def run(array: np.ndarray, item: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        labels = np.array([seg.class_names.index(n) for n in item["labels"]], np.int64)
        out = segment_per_box(seg.backend, array, item["boxes"], labels, seg.cfg, size, options)
        return out.masks.dense(), out.scores
    return run


def largest_component(row: Row) -> Row:
    """``row`` with each mask cut to its largest 8-connected component (scipy; a benchmark
    row: shipped only if it gains on both datasets)."""
    from scipy import ndimage

    def run(array: np.ndarray, item: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        masks, scores = row(array, item)
        out = masks.copy()
        for k, mask in enumerate(masks):
            labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
            if count > 1:
                sizes = np.bincount(labelled.ravel())[1:]
                out[k] = labelled == 1 + int(np.argmax(sizes))
        return out, scores
    return run


def switched(row: Row, module: Any, name: str, value: float) -> Row:
    """``row`` with ``module.name`` set to ``value`` during each call (a benchmark switch,
    not a product option), e.g. the refinement's ``COLOUR_WEIGHT`` 0: no colour model (the
    guided filter still runs), or the score's ``CROWDING_POWER`` 0: the score without
    :func:`serving.inference.quality.crowding` (the same masks)."""
    def run(array: np.ndarray, item: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        kept = getattr(module, name)
        setattr(module, name, value)
        try:
            return row(array, item)
        finally:
            setattr(module, name, kept)
    return run


def measure(rows: dict[str, Row], split: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Run every row on every image (rows side by side per image); per row the per-box IoUs,
    scores, emptiness and COCO results, and its total seconds."""
    from serving.inference.images import load_image

    out = {name: {"iou": [], "score": [], "empty": [], "results": [], "seconds": 0.0}
           for name in rows}
    for item in split:
        array = load_image(item["path"])
        if item.get("upscale", 1) > 1:
            from PIL import Image

            h, w = array.shape[:2]
            size = (w * item["upscale"], h * item["upscale"])
            array = np.asarray(Image.fromarray(array).resize(size, Image.BILINEAR))
        for name, run in rows.items():
            start = time.perf_counter()
            masks, scores = run(array, item)
            out[name]["seconds"] += time.perf_counter() - start
            rec = out[name]
            rec["iou"] += ious(masks, item["masks"]).tolist()
            rec["score"] += [float(s) for s in scores]
            rec["empty"] += [is_empty(int(m.sum()), b) for m, b in zip(masks, item["boxes"])]
            for m, s, ann_id in zip(masks, scores, item["ann_ids"]):
                rec["results"].append({"image_id": item["id"], "ann_id": ann_id,
                                       "segmentation": coco_rle(m), "score": float(s)})
    return out


def spearman_interval(score: np.ndarray, iou: np.ndarray,
                      resamples: int = RESAMPLES) -> tuple[float, float] | None:
    """The 95 % :func:`benchmarks.common.bootstrap_interval` of Spearman's rho of (N,)
    ``score`` and ``iou`` over the boxes, rounded to 3 decimals; ``None`` when the scores or
    the IoUs are all equal."""
    from scipy.stats import spearmanr

    score, iou = np.asarray(score, np.float64), np.asarray(iou, np.float64)
    if np.ptp(score) == 0 or np.ptp(iou) == 0:
        return None

    def rho(s: np.ndarray, i: np.ndarray) -> float:
        return float(spearmanr(s, i).statistic) if np.ptp(s) and np.ptp(i) else np.nan

    low, high = bootstrap_interval((score, iou), rho, resamples=resamples)
    return round(low, 3), round(high, 3)


def crowding_bins(iou: np.ndarray, crowded: np.ndarray) -> dict[str, list[float] | None]:
    """Per :data:`CROWDING_BINS` bin of the boxes' ``crowded``: [boxes, mean IoU] (3
    decimals), ``None`` for an empty bin."""
    out: dict[str, list[float] | None] = {}
    for lo, hi in CROWDING_BINS:
        inside = crowded == 0 if hi == 0 else (crowded > lo) & (crowded <= hi)
        out["none" if hi == 0 else f"{lo}-{hi}"] = (
            [int(inside.sum()), round(float(iou[inside].mean()), 3)] if inside.any() else None)
    return out


def summarize(rec: dict[str, Any], sides: np.ndarray, gt: dict[str, Any],
              category_of: dict[int, int], baseline_seconds: float,
              crowded: np.ndarray) -> dict[str, Any]:
    """The table's columns for one row (``crowded``: each box's crowding, for the mean IoU
    by crowding)."""
    from scipy.stats import spearmanr

    iou, score = np.array(rec["iou"]), np.array(rec["score"])
    by_size = {f"{lo}-{hi}": (round(float(iou[(sides >= lo) & (sides < hi)].mean()), 3)
                              if ((sides >= lo) & (sides < hi)).any() else None)
               for lo, hi in SIZE_BINS}
    results = [{"image_id": r["image_id"], "category_id": category_of[r["ann_id"]],
                "segmentation": r["segmentation"], "score": r["score"]}
               for r in rec["results"]]
    metrics = evaluate_coco(gt, results, iou_types=("segm",))
    rho = spearmanr(score, iou).statistic if np.ptp(score) > 0 else None
    empty8 = int(sum(e for e, s in zip(rec["empty"], sides) if s >= 8))
    return {"mean_iou": round(float(iou.mean()), 3), "median_iou": round(float(np.median(iou)), 3),
            "under_0.5": round(float((iou < 0.5).mean()), 3), "by_size": by_size,
            "empty_8px": empty8, "mask_ap": round(100 * metrics["segm/AP"], 1),
            "ap75": round(100 * metrics["segm/AP75"], 1),
            "by_crowding": crowding_bins(iou, crowded),
            "spearman": None if rho is None else round(float(rho), 3),
            "spearman_95": None if rho is None else spearman_interval(score, iou),
            "seconds_per_box": rec["seconds"] / len(iou),
            "time_vs_today": round(rec["seconds"] / baseline_seconds, 2)
            if baseline_seconds else None}


def build_rows(model: str, sizes: list[int], ablations: list[str]) -> dict[str, Row]:
    base = Segmenter.load(model, device="cpu")
    rows: dict[str, Row] = {
        "filled box": lambda array, item: (filled_boxes(item["boxes"], array.shape[:2]),
                                           np.ones(len(item["boxes"]))),
        "today": segmenter_row(base.with_box_scale(False)),
    }
    for size in sizes:
        rows[f"today @ {size}"] = segmenter_row(base.with_image_size(size))
    rows["default"] = segmenter_row(base)
    for name in ablations:
        rows[name] = options_row(base, ABLATIONS[name])
    rows["no colour model"] = switched(rows["default"], refine, "COLOUR_WEIGHT", 0.0)
    rows["score without crowding"] = switched(rows["default"], quality, "CROWDING_POWER", 0)
    rows["+ largest component"] = largest_component(rows["default"])
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    annotations, images = (ROOT / p for p in DATA[args.data])
    annotations = annotations.with_name(f"{args.split}.json")
    split = load_split(annotations, images, 5 if args.quick else args.limit)
    gt = json.loads(annotations.read_text())
    keep = {item["id"] for item in split}
    gt = {**gt, "images": [i for i in gt["images"] if i["id"] in keep],
          "annotations": [a for a in gt["annotations"] if a["image_id"] in keep]}
    if args.upscale > 1:
        gt = upscale_split(split, gt, args.upscale)
    category_of = {a["id"]: a["category_id"] for a in gt["annotations"]}
    rows = build_rows(args.model, args.sizes, args.rows)
    recs = measure(rows, split)
    boxes = np.concatenate([item["boxes"] for item in split]) / args.upscale
    sides = np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))  # size bins
    crowded = np.concatenate([quality.crowding(item["boxes"]) for item in split])
    table = {name: summarize(rec, sides, gt, category_of, recs["today"]["seconds"], crowded)
             for name, rec in recs.items()}
    table["filled box"]["spearman"] = table["filled box"]["spearman_95"] = None
    table["filled box"]["time_vs_today"] = None
    return {"data": args.data, "split": args.split, "model": args.model, "images": len(split),
            "boxes": int(len(sides)), "upscale": args.upscale, "rows": table}


def crowding_table(rows: dict[str, Any]) -> str:
    """Mean IoU by the boxes' crowding, one line per row (empty for results written before
    the rows had it)."""
    first = next((r["by_crowding"] for r in rows.values() if "by_crowding" in r), None)
    if first is None:
        return ""
    bins = list(first)
    counts = [f"{first[b][0] if first[b] else 0}" for b in bins]
    lines = [["boxes", *counts]] + [[name, *((r["by_crowding"][b] or [0, None])[1] for b in bins)]
                                    for name, r in rows.items() if "by_crowding" in r]
    header = ["mean IoU by the box's highest IoU with another box of its image",
              *(b if b == "none" else f"({b.replace('-', ', ')}]" for b in bins)]
    return markdown_table(header, lines)


def write(results: dict[str, Any], name: str, command: str) -> None:
    bins = [f"{lo}-{hi}" for lo, hi in SIZE_BINS]
    rows = [[row, r["mean_iou"], r["median_iou"], f"{100 * r['under_0.5']:.1f} %",
             *(r["by_size"][b] for b in bins), r["empty_8px"], r["mask_ap"], r["ap75"],
             r["spearman"], interval_text(r.get("spearman_95")), r["time_vs_today"]]
            for row, r in results["rows"].items()]
    header = ["row", "mean IoU", "median IoU", "under 0.5", "IoU <16 px", "16-32", "32-64",
              "64+", "empty (>= 8 px)", "mask AP", "AP75", "Spearman(score, IoU)",
              "95 % interval", "time / today"]
    split = "training" if results.get("split") == "train" else "validation"
    text = (f"# Box-prompted masks: {results['data']} {split} boxes\n\n`{command}`\n\n"
            f"{machine_markdown(results['machine'])}\n\nModel `{results['model']}`, "
            f"{results['images']} images, {results['boxes']} boxes"
            + (f", every image, box and true mask {results['upscale']}x larger (the image "
               "resized bilinearly, the masks' pixels repeated; the size columns bin the boxes "
               "by their size before)" if results.get("upscale", 1) > 1
               else "") + ".\n\n"
            f"{markdown_table(header, rows)}\n\n{crowding_table(results['rows'])}\n")
    write_results(ROOT / "benchmarks" / "results", name, results, text.rstrip("\n"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=sorted(DATA), required=True)
    parser.add_argument("--model", required=True, help="checkpoint or export to measure")
    parser.add_argument("--sizes", type=int, nargs="*", default=[192, 320, 384],
                        help="--image-size values of the today rows (hand-picked size)")
    parser.add_argument("--rows", nargs="*", default=list(ABLATIONS), choices=list(ABLATIONS),
                        help="ablation rows of the per-box scale")
    parser.add_argument("--limit", type=int, default=None, help="first N images only")
    parser.add_argument("--split", choices=["val", "train"], default="val",
                        help="the split whose boxes prompt (train: where the score's form was "
                             "chosen)")
    parser.add_argument("--quick", action="store_true", help="5 images, to try it out")
    parser.add_argument("--upscale", type=int, default=1,
                        help="every image resized this many times larger (bilinear), its boxes "
                             "and true masks with it: large images and boxes")
    parser.add_argument("--tag", default="", help="suffix of the results' name")
    args = parser.parse_args()
    results = {**run(args), "machine": machine_info()}
    name = f"prompted_quality_{args.data}" + (f"_{args.tag}" if args.tag else "") + \
        ("_quick" if args.quick else "")
    write(results, name, "python benchmarks/prompted_quality.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
