"""Training learns masks: a short BoxInst run on easy data ends with masks on the objects.

Sixteen 96-pixel images hold one or two solid diamonds (a diamond fills half of its box) on a
smooth background. The run uses the product's defaults where they matter, notably the pairwise
warm-up ``TrainConfig.scaled_phase`` (here 40 of 120 steps), with ImageNet MobileNetV2 features
and a tiny head. Box-prompted masks of the training boxes, unclipped, are then measured:

- the losses fall;
- a mask fills about half of its box, not all of it (masks grown to their boxes);
- little of a mask lies outside its box or on the image border (masks collapsed to a constant
  or to lines along the border: docs/training_notes.md sections 1-2);
- masks match the diamonds better than the boxes themselves do.

With the warm-up shortened to ``max_iter / 9`` (13 steps, the bug of docs/training_notes.md
section 1) the masks cover nearly the whole image: fill 0.95, 56 % outside the box, IoU 0.25
against the box's 0.52, and this test fails. 120 steps, not fewer: at 60 steps the outcome
depended on the seed and the CPU (on an AVX2 CPU, seeds 2-4 grew whole-image or collapsed
masks with the product's warm-up; at 120 steps seeds 0-4 all gave IoU 0.62-0.67).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from train_helpers import TINY_CONFIG, Recorder

pytestmark = pytest.mark.slow

SIZE = 96
STEPS = 120
BORDER = 4  # pixels of the image border band


def make_diamonds(root: Path, num_images: int = 16, seed: int = 0) -> Path:
    """COCO JSON (with RLE masks) of solid diamonds on smooth backgrounds; returns its path."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    colours = np.array([[230, 60, 50], [60, 200, 70], [50, 90, 230], [240, 220, 60]])
    images, annotations = [], []
    for i in range(num_images):
        image = rng.uniform(60, 120, size=3) + xx[..., None] * rng.uniform(-0.3, 0.3)
        owner = np.full((SIZE, SIZE), -1)
        for k in range(int(rng.integers(1, 3))):
            r = rng.uniform(12, 24)
            cx, cy = rng.uniform(r, SIZE - r, size=2)
            diamond = np.abs(xx - cx) + np.abs(yy - cy) <= r
            image[diamond] = colours[rng.integers(len(colours))]
            owner[diamond] = k
        image = np.clip(image + rng.normal(0, 5, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"{i:03d}.png")
        images.append({"id": i + 1, "file_name": f"{i:03d}.png", "height": SIZE, "width": SIZE})
        for k in range(owner.max() + 1):
            mask = owner == k
            if mask.sum() < 30:
                continue
            ys, xs = np.nonzero(mask)
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            box = [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1,
                                "bbox": box, "area": int(mask.sum()), "iscrowd": 0,
                                "segmentation": rle})
    path = root / "train.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "diamond"}]}))
    return path


def mask_quality(checkpoint: str, annotations: Path) -> dict[str, float]:
    """Means over the boxes of the box-prompted masks (not clipped to their box):
    ``fill`` (share of the box covered), ``outside`` and ``border`` (shares of the mask's
    pixels outside the box / within ``BORDER`` px of the image edge), ``iou`` with the true
    mask, and ``box_iou`` (the box itself as the mask, for comparison)."""
    from pycocotools import mask as mask_utils

    from serving import Segmenter
    from serving.inference.images import load_image

    segmenter = Segmenter.from_checkpoint(checkpoint, device="cpu", clip_to_box=False)
    data = json.loads(annotations.read_text())
    band = np.ones((SIZE, SIZE), dtype=bool)
    band[BORDER:-BORDER, BORDER:-BORDER] = False
    rows = []
    for info in data["images"]:
        anns = [a for a in data["annotations"] if a["image_id"] == info["id"]]
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        pred = segmenter.predict(load_image(annotations.parent / "images" / info["file_name"]),
                                 boxes=boxes)
        for mask, (x0, y0, x1, y1), ann in zip(pred.masks, boxes, anns):
            box = np.zeros_like(mask)
            box[y0:y1, x0:x1] = True
            truth = mask_utils.decode(ann["segmentation"]).astype(bool)
            pixels = max(int(mask.sum()), 1)
            rows.append([(mask & box).sum() / box.sum(), (mask & ~box).sum() / pixels,
                         (mask & band).sum() / pixels,
                         (mask & truth).sum() / max((mask | truth).sum(), 1),
                         (box & truth).sum() / (box | truth).sum()])
    return dict(zip(("fill", "outside", "border", "iou", "box_iou"),
                    np.mean(rows, axis=0).tolist()))


def test_short_boxinst_run_learns_masks_inside_the_boxes(tmp_path: Path) -> None:
    from serving.errors import WeightsError
    from training.train import train
    from training.train_config import load_config

    annotations = make_diamonds(tmp_path / "data")
    cfg = load_config(TINY_CONFIG, [
        "preset=boxinst", "seed=0", f"output_dir={tmp_path / 'run'}",
        f"data.train_json={annotations}", f"data.train_images={annotations.parent / 'images'}",
        "data.val_json=null", "data.synthetic_images=0", "data.min_sizes=[96]",
        "data.max_size=96", "inference.min_size=96", "inference.max_size=96",
        "model.backbone_weights=imagenet", "optim.optimizer=adamw", "optim.lr=0.001",
        "optim.batch_size=4", f"optim.max_iter={STEPS}", f"optim.steps=[{STEPS - 5}]",
        "optim.warmup_iters=5", "checkpoint_every=0", "log_every=1000"])
    assert cfg.boxinst.pairwise_warmup_iters is None  # the product's scaled phase (40 steps)
    recorder = Recorder(snapshot_first=False)
    try:
        result = train(cfg, callbacks=[recorder])
    except WeightsError as exc:
        pytest.skip(f"no offline ImageNet MobileNetV2 weights ({exc})")
    losses = [r.losses for r in recorder.records]
    assert len(losses) == STEPS
    q = mask_quality(result["checkpoint"], annotations)
    for key in ("loss_prj", "loss_fcos_cls"):  # mean of the last 10 steps / first 10 steps
        q[key] = float(np.mean([s[key] for s in losses[-10:]]) /
                       np.mean([s[key] for s in losses[:10]]))
    assert 0.3 < q["fill"] < 0.8, q  # a diamond fills 0.5 of its box
    assert q["outside"] < 0.35, q
    assert q["border"] < 0.03, q
    assert q["iou"] > q["box_iou"] + 0.05, q
    assert q["loss_prj"] < 0.5 and q["loss_fcos_cls"] < 0.5, q
