"""The fast pre- and post-processing give the same results as the straightforward pipeline,
on real models and images (a check, not a test).

For each model (a ``.safetensors`` checkpoint or an export's ``.json`` / ``.onnx``) and each
of the first ``--count`` images of a COCO file, ``Segmenter.predict`` runs twice: as shipped,
and with the straightforward pipeline patched in (``tests/sim_testing.py``: every image
resized and padded on its own, every mask computed at full size by aligned x4 upsampling,
crop, resize and threshold, then cut to a crop). Automatic mode, and prompted with the
image's annotated boxes. Reported per model and mode: images, instances, whether boxes,
scores and labels are equal, the share of bit-identical masks and the lowest mask IoU.
``--benchmark-models`` adds the random-weight models of ``benchmarks/export_speed.py``
(MobileNetV2-FPN at 512, the quickstart's light heads at 256; 100 detections per image) on
random images at their input size and 1.5x larger. Writes
``benchmarks/results/postprocess_equality.{json,md}``; exits 1 on any difference.

    python benchmarks/postprocess_equality.py --benchmark-models --models \\
        runs/quickstart/model_final.safetensors runs/quickstart/export/model_final.auto.onnx \\
        --annotations data/synthetic/val.json --images data/synthetic/images
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, machine_markdown, markdown_table, write_results  # noqa: E402
from export_speed import CASES, make_checkpoint, model_config, prompt_boxes  # noqa: E402
from sim_testing import reference_postprocess_masks, reference_preprocess  # noqa: E402

from serving import Segmenter  # noqa: E402
from serving.inference.images import load_image  # noqa: E402
from serving.masks import InstanceMasks  # noqa: E402


def _whole_image(mask_probs, resized, orig, threshold=0.5, clip_boxes=None):
    dense = reference_postprocess_masks(mask_probs, resized, orig, threshold, clip_boxes)
    return InstanceMasks.from_dense(dense.numpy())


def reference(seg: Segmenter, image: np.ndarray, boxes):
    """``seg.predict`` with the straightforward pre- and post-processing."""
    with mock.patch("serving.segmenter.mask_crops", _whole_image), \
            mock.patch("serving.segmenter.preprocess", reference_preprocess):
        return seg.predict(image, boxes=boxes)


def compare(seg: Segmenter, items) -> dict:
    """Totals over ``items`` ((image, boxes or None) pairs): shipped vs straightforward."""
    return compare_predictions(lambda image, boxes: seg.predict(image, boxes=boxes),
                               lambda image, boxes: reference(seg, image, boxes), items)


def compare_predictions(predict_new, predict_old, items, score_atol: float = 0.0) -> dict:
    """Totals over ``items`` ((image, boxes or None) pairs) of two ``(image, boxes) ->
    Prediction`` callables: images, instances, whether boxes and labels are all equal and
    scores within ``score_atol`` (0: equal), the largest score difference, bit-identical
    masks, the lowest mask IoU and, for each mask under 0.999 IoU, its differing pixels and
    its area (``below_0999``)."""
    out = {"images": 0, "instances": 0, "same_instances": True, "identical_masks": 0,
           "min_iou": 1.0, "max_score_diff": 0.0, "below_0999": []}
    for image, boxes in items:
        new, old = predict_new(image, boxes), predict_old(image, boxes)
        out["images"] += 1
        same = len(new) == len(old) and all(np.array_equal(getattr(new, f), getattr(old, f))
                                            for f in ("boxes", "labels"))
        if same and len(new):
            diff = float(np.abs(new.scores - old.scores).max())
            out["max_score_diff"] = max(out["max_score_diff"], diff)
            same = diff <= score_atol
        out["same_instances"] &= bool(same)
        if not same:
            continue
        out["instances"] += len(new)
        for i in range(len(new)):
            a, b = new.mask(i), old.mask(i)
            union = np.logical_or(a, b).sum()
            iou = 1.0 if union == 0 else np.logical_and(a, b).sum() / union
            out["identical_masks"] += int(np.array_equal(a, b))
            out["min_iou"] = min(out["min_iou"], float(iou))
            if iou < 0.999:
                out["below_0999"].append([int(union - np.logical_and(a, b).sum()), int(a.sum())])
    return out


def coco_items(annotations: Path, images: Path, count: int):
    data = json.loads(annotations.read_text(encoding="utf-8"))
    boxes: dict[int, list] = {}
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        boxes.setdefault(ann["image_id"], []).append([x, y, x + w, y + h])
    for img in data["images"][:count]:
        array = load_image(images / img["file_name"])
        yield array, boxes.get(img["id"])


def benchmark_checkpoints(tmp: Path):
    """(name, checkpoint, items) of the random-weight benchmark models."""
    for case in ("mobilenet_v2_fpn@512x512", "quickstart_light@256x256"):
        backbone, (h, w) = CASES[case]
        ckpt = make_checkpoint(backbone, (h, w), tmp / f"{backbone}_{h}.safetensors",
                               model_config(case, backbone))
        rng = np.random.default_rng(3)
        items = []
        for scale in (1.0, 1.5):
            size = (int(h * scale), int(w * scale))
            image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            items.append((image, prompt_boxes(*size)))
        yield case, ckpt, items


def benchmark_models(tmp: Path):
    """(name, Segmenter, items) of the random-weight benchmark models."""
    for case, ckpt, items in benchmark_checkpoints(tmp):
        yield case, Segmenter.from_checkpoint(ckpt, device="cpu"), items


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=[])
    parser.add_argument("--annotations", type=Path)
    parser.add_argument("--images", type=Path)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--benchmark-models", action="store_true")
    parser.add_argument("--name", default="postprocess_equality")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    runs = []
    for path in args.models:
        seg = Segmenter.load(path, device="cpu")
        items = list(coco_items(args.annotations, args.images, args.count))
        runs.append((path, seg, items))
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        if args.benchmark_models:
            runs += list(benchmark_models(Path(tmp)))
        for name, seg, items in runs:
            for mode in ("automatic", "prompted"):
                picked = [(im, None if mode == "automatic" else bx) for im, bx in items
                          if mode == "automatic" or (bx is not None and len(bx))]
                r = compare(seg, picked)
                results.append({"model": str(name), "backend": seg.backend.name, "mode": mode,
                                **r})
                rows.append([str(name), seg.backend.name, mode, r["images"], r["instances"],
                             "yes" if r["same_instances"] else "NO",
                             f"{r['identical_masks']} / {r['instances']}", r["min_iou"]])
                print(rows[-1], flush=True)
    ok = all(r["same_instances"] and r["min_iou"] >= 0.999 for r in results)
    payload = {"machine": machine_info(), "command": "python " + " ".join(sys.argv),
               "results": results, "all_equal": ok}
    text = "\n\n".join([
        "# Fast pre- and post-processing vs the straightforward pipeline",
        machine_markdown(payload["machine"]), f"Command: `{payload['command']}`",
        "Same instances = equal boxes, scores and labels; masks compared pixel for pixel "
        "(IoU of each instance's full-size mask).",
        markdown_table(["model", "backend", "mode", "images", "instances", "same instances",
                        "identical masks", "lowest mask IoU"], rows),
    ])
    write_results(Path(args.output), args.name, payload, text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
