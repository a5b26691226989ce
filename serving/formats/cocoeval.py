"""COCO box and mask AP with pycocotools, shared by ``label --evaluate`` and training evaluation.

>>> metrics = evaluate_coco("val.json", results)          # results: a COCO results list
>>> metrics["segm/AP"], metrics["bbox/AP50"]

pycocotools is imported lazily inside :func:`evaluate_coco`, so importing this module costs
nothing. Values are fractions in [0, 1] (not percent). As in pycocotools, a metric whose area
range holds no ground-truth instance is ``-1.0``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DatasetError

#: The order of ``COCOeval.stats[0:6]``.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")


def metric_keys(iou_types: Sequence[str] = IOU_TYPES) -> list[str]:
    """The keys :func:`evaluate_coco` returns, e.g. ``["bbox/AP", ..., "segm/APl"]``."""
    return [f"{t}/{m}" for t in iou_types for m in METRIC_NAMES]


def _load_gt(gt: dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    if isinstance(gt, dict):
        data = copy.deepcopy(gt)  # COCOeval rewrites segmentations in place
    else:
        try:
            data = json.loads(Path(gt).read_text())
        except FileNotFoundError:
            raise DatasetError(f"ground truth {gt}: file not found; check the path") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DatasetError(f"ground truth {gt}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DatasetError("ground truth: expected a COCO JSON object with 'images'")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"ground truth: missing '{key}' list; give a COCO dataset JSON")
    data.setdefault("annotations", [])
    return data


def _complete_gt(data: dict[str, Any], iou_types: Sequence[str]) -> None:
    """Fill the optional fields COCOeval needs (``iscrowd``, ``area``, ``id``) in place."""
    sizes = {img["id"]: (img.get("height"), img.get("width")) for img in data["images"]}
    for i, ann in enumerate(data["annotations"]):
        ann.setdefault("id", i + 1)
        ann.setdefault("iscrowd", 0)
        segm = ann.get("segmentation")
        if "segm" in iou_types and not segm:
            raise DatasetError(
                f"ground truth: annotation {ann['id']} has no segmentation; mask AP needs "
                "masks for every annotation (evaluate iou_types=('bbox',) instead)"
            )
        if "bbox" not in ann:
            if not segm:
                raise DatasetError(f"ground truth: annotation {ann['id']} has no bbox")
            ann["bbox"] = _segm_bbox(segm, *sizes.get(ann["image_id"], (None, None)))
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])


def _segm_bbox(segm: Any, height: int | None, width: int | None) -> list[float]:
    """[x, y, w, h] of an RLE (str/bytes counts) or polygon segmentation."""
    from pycocotools import mask as mask_util

    if isinstance(segm, dict):
        rle = segm
        if isinstance(rle.get("counts"), list):  # uncompressed RLE
            rle = mask_util.frPyObjects(rle, *rle["size"])
    else:
        if height is None or width is None:
            raise DatasetError("results: polygon segmentation on an image without height/width")
        rle = mask_util.merge(mask_util.frPyObjects(segm, height, width))
    return [float(v) for v in mask_util.toBbox(rle)]


def best_f1(evaluator: Any) -> tuple[float, float]:
    """The score threshold that maximises F1 at IoU 0.5, over every class and image of an
    evaluated ``COCOeval`` (area "all", the largest ``maxDets``), and that F1.

    Keeping the detections scoring at or above the threshold gives the best F1: precision
    ``TP / (TP + FP)`` and recall ``TP / GT`` over the whole dataset, a detection being a true
    positive when COCOeval matched it to a ground-truth instance at IoU 0.5. Only cuts between
    different scores are considered (ties stay together). Returns ``(threshold, F1)``;
    ``(1.0, 0.0)`` when there is no detection or no ground truth.
    """
    area_all = evaluator.params.areaRng[0]
    max_det = evaluator.params.maxDets[-1]
    scores, hits, total_gt = [], [], 0
    for entry in evaluator.evalImgs:
        if entry is None or entry["aRng"] != area_all or entry["maxDet"] != max_det:
            continue
        total_gt += int((np.asarray(entry["gtIgnore"]) == 0).sum())
        count = len(entry["dtIds"])
        if not count:  # objects of this class and image, none detected: missed
            continue
        keep = ~np.asarray(entry["dtIgnore"], dtype=bool).reshape(-1, count)[0]
        matched = np.asarray(entry["dtMatches"]).reshape(-1, count)[0] > 0
        scores += list(np.asarray(entry["dtScores"], dtype=float)[keep])
        hits += list(matched[keep])
    if not scores or total_gt == 0:
        return 1.0, 0.0
    order = np.argsort(-np.asarray(scores), kind="stable")
    ranked = np.asarray(scores)[order]
    tp = np.cumsum(np.asarray(hits)[order])
    kept = np.arange(1, len(ranked) + 1)
    f1 = 2 * tp / (kept + total_gt)  # = 2PR / (P + R)
    cut = np.append(ranked[1:] != ranked[:-1], True)  # the last of each group of equal scores
    best = int(np.flatnonzero(cut)[np.argmax(f1[cut])])
    return float(ranked[best]), float(f1[best])


def evaluate_coco(gt: dict[str, Any] | str | os.PathLike, results: Sequence[dict[str, Any]],
                  iou_types: Sequence[str] = IOU_TYPES, verbose: bool = False,
                  f1: bool = False) -> dict[str, float]:
    """COCO AP of ``results`` against ``gt``.

    Args:
        gt: a COCO dataset (dict or JSON path) with ``images``, ``annotations`` (``bbox``,
            and ``segmentation`` for ``"segm"``) and ``categories``. Not modified.
        results: COCO results list: dicts with ``image_id``, ``category_id``, ``score`` and
            ``bbox`` [x, y, w, h] and/or ``segmentation`` (RLE, str or bytes counts). Results on
            images absent from ``gt`` are dropped. Not modified.
        iou_types: any of ``"bbox"``, ``"segm"``.
        verbose: print pycocotools' summary tables to stdout.
        f1: also return ``"<iou_type>/F1"`` and ``"<iou_type>/F1_threshold"``: the best F1 at
            IoU 0.5 and the score threshold that reaches it (:func:`best_f1`).

    Returns:
        ``{"<iou_type>/<metric>": value}`` for metrics AP, AP50, AP75, APs, APm, APl, as
        fractions in [0, 1]; ``-1.0`` where ``gt`` has no instance of that size. Empty
        ``results`` give 0.0 for every key (and an F1 threshold of 1.0).
    """
    unknown = [t for t in iou_types if t not in IOU_TYPES]
    if unknown or not iou_types:
        raise ValueError(f"iou_types {list(iou_types)}: choose from {IOU_TYPES}")
    data = _load_gt(gt)
    _complete_gt(data, iou_types)
    dets = _checked_results(data, results)
    metrics = dict.fromkeys(metric_keys(iou_types), 0.0)
    if f1:
        for iou_type in iou_types:
            metrics.update({f"{iou_type}/F1": 0.0, f"{iou_type}/F1_threshold": 1.0})
    if not dets:
        return metrics
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        for iou_type in iou_types:
            metrics.update(_evaluate_one(data, dets, iou_type, verbose, f1))
    return metrics


def _checked_results(data: dict[str, Any], results: Sequence[dict[str, Any]],
                     ) -> list[dict[str, Any]]:
    """Copies of the results on ``data``'s images, each with a ``bbox`` (from its mask when
    it has none). Raises :class:`DatasetError` for an entry without category, score or any
    geometry."""
    image_ids = {img["id"] for img in data["images"]}
    sizes = {img["id"]: (img.get("height"), img.get("width")) for img in data["images"]}
    dets = [dict(r) for r in results if r.get("image_id") in image_ids]
    for r in dets:
        for key in ("category_id", "score"):
            if key not in r:
                raise DatasetError(f"results: an entry on image {r['image_id']} lacks '{key}'")
        if not r.get("bbox"):
            if not r.get("segmentation"):
                raise DatasetError(
                    f"results: an entry on image {r['image_id']} has neither bbox nor "
                    "segmentation")
            r["bbox"] = _segm_bbox(r["segmentation"], *sizes[r["image_id"]])
    return dets


def _evaluate_one(data: dict[str, Any], dets: list[dict[str, Any]], iou_type: str,
                  verbose: bool, f1: bool) -> dict[str, float]:
    """One ``COCOeval`` run: the six AP metrics of ``iou_type`` (and its best F1)."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:  # pragma: no cover - pycocotools is a core dependency
        raise DatasetError("COCO evaluation needs pycocotools; pip install pycocotools") from None
    usable = [r for r in dets if r.get("segmentation")] if iou_type == "segm" else dets
    if not usable:
        return {}
    coco_gt = COCO()
    coco_gt.dataset = data
    coco_gt.createIndex()
    # loadRes keeps a given bbox (and takes the result's area from it), as detectron2 and
    # mmdetection do; every entry has one, so mixed lists are read the same way.
    coco_dt = coco_gt.loadRes([dict(r) for r in usable])  # loadRes/COCOeval add keys in place
    evaluator = COCOeval(coco_gt, coco_dt, iou_type)
    evaluator.evaluate()
    evaluator.accumulate()
    if verbose:
        print(f"== {iou_type} ==")
    evaluator.summarize()
    out = {f"{iou_type}/{name}": float(value)
           for name, value in zip(METRIC_NAMES, np.asarray(evaluator.stats[:6]), strict=True)}
    if f1:
        out[f"{iou_type}/F1_threshold"], out[f"{iou_type}/F1"] = best_f1(evaluator)
    return out
