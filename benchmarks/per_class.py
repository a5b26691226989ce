"""Per-class mask AP and box-prompted mask IoU of trained checkpoints (not a test).

The quality table averages over classes; this script shows where box supervision loses. For
each checkpoint and each class of a dataset's validation split it reports:

- **mask AP** (COCO, pycocotools, automatic mode), per category;
- **prompted mIoU**: the mean IoU with the ground-truth mask of the mask predicted when the
  *ground-truth box* is the prompt (``Segmenter.predict(image, boxes=...)``, the auto-labelling
  path). Detection errors are out of this number: it measures the masks alone.

With ``--features`` it also reports how well each model's mask features separate object from
background pixels inside the boxes (``benchmarks/sim_figure.py: feature_separability``, oracle
class and instance prototypes, AUC): the feature space SIM's M_S is built on, compared across
supervisions.

    python benchmarks/per_class.py --dataset synthetic \\
        runs/bench/synthetic/{mask,boxinst,sim}/s0/model_final.safetensors

Writes ``benchmarks/results/per_class_<dataset>.{json,md}`` (``--name`` to change).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quality import DATASETS, dataset_config  # noqa: E402


def per_class_ap(coco_gt: Any, results: list[dict[str, Any]]) -> dict[int, float]:
    """Mask AP (percent, IoU 0.50:0.95, all areas, 100 detections) per category id."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {c: 0.0 for c in coco_gt.getCatIds()}
    ev = COCOeval(coco_gt, coco_gt.loadRes(results), "segm")
    ev.evaluate()
    ev.accumulate()
    precision = ev.eval["precision"]  # (T, R, K, A, M)
    out = {}
    for k, cat in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        out[cat] = float(100 * p[p > -1].mean()) if (p > -1).any() else float("nan")
    return out


def prompted_iou(segmenter: Any, coco_gt: Any, images: Path,
                 max_images: int | None) -> dict[int, list[float]]:
    """IoU of each ground-truth instance's mask predicted from its own box, per category id."""
    from PIL import Image

    from export.verify import mask_iou

    ious: dict[int, list[float]] = {}
    for image_id in coco_gt.getImgIds()[:max_images]:
        anns = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=image_id, iscrowd=False))
        if not anns:
            continue
        info = coco_gt.imgs[image_id]
        array = np.asarray(Image.open(images / info["file_name"]).convert("RGB"))
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                         dtype=np.float32)
        pred = segmenter.predict(array, boxes=boxes)
        for ann, mask in zip(anns, pred.masks):
            ious.setdefault(ann["category_id"], []).append(
                mask_iou(coco_gt.annToMask(ann).astype(bool), np.asarray(mask, dtype=bool)))
    return ious


def palette_separability(coco_gt: Any, images: Path, max_images: int = 40) -> float:
    """A pixel-colour baseline for ``feature_separability`` on the synthetic data: the AUC
    (mean over instances, box pixels on the stride-4 grid) of the one-bit test "the pixel's
    nearest generator colour is an object colour (``PALETTE``) rather than a background colour
    (``BACKGROUND_PALETTE``)". On the ``distinct`` variant it says how well colour alone, with no
    learning, tells an instance from the rest of its box; on the default data it is 0.5."""
    import torch
    from PIL import Image

    from benchmarks.sim_figure import auc
    from training.data.synthetic import BACKGROUND_PALETTE, PALETTE

    colours = np.concatenate([PALETTE, BACKGROUND_PALETTE]).astype(np.float32)
    scores = []
    for image_id in coco_gt.getImgIds()[:max_images]:
        info = coco_gt.imgs[image_id]
        rgb = np.asarray(Image.open(images / info["file_name"]).convert("RGB"), np.float32)
        dist = ((rgb[:, :, None] - colours) ** 2).sum(-1)  # (H, W, 16)
        is_object = (dist[..., :len(PALETTE)].min(-1) < dist[..., len(PALETTE):].min(-1))
        grid = torch.from_numpy(is_object[2::4, 2::4].astype(np.float32))
        for ann in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=image_id, iscrowd=False)):
            # Box and mask at full resolution, then the stride-4 samples feature_separability
            # uses ([2::4, 2::4]), so both AUCs score the same pixels.
            mask = coco_gt.annToMask(ann) > 0
            box = np.zeros_like(mask)
            x, y, w, h = (int(v) for v in ann["bbox"])
            box[y:y + h, x:x + w] = True
            mask, box = torch.from_numpy(mask[2::4, 2::4]), torch.from_numpy(box[2::4, 2::4])
            obj, bg = grid[box & mask], grid[box & ~mask]
            if len(obj) >= 3 and len(bg) >= 3:
                scores.append(auc(obj, bg))
    return float(np.mean(scores))


def _training_step(segmenter: Any) -> int | None:
    """The training step of the model's card (``None`` when it records none)."""
    steps = [h.details.get("step") for h in (segmenter.card.history if segmenter.card else ())
             if h.made_by == "train"]
    return steps[-1] if steps else None


def evaluate(checkpoint: str, annotations: Path, images: Path,
             max_images: int | None) -> dict[str, Any]:
    from pycocotools.coco import COCO

    from serving import Segmenter
    from training.evaluate import predict_dataset

    segmenter = Segmenter.from_checkpoint(checkpoint, device="cpu")
    category_ids = segmenter.card.category_ids if segmenter.card else None
    coco_gt = COCO(str(annotations))
    results = predict_dataset(segmenter, annotations, images, category_ids, max_images,
                              progress=False)
    if max_images is not None:
        coco_gt.imgs = {i: coco_gt.imgs[i] for i in coco_gt.getImgIds()[:max_images]}
    ap = per_class_ap(coco_gt, results)
    ious = prompted_iou(segmenter, coco_gt, images, max_images)
    names = {c["id"]: c["name"] for c in coco_gt.loadCats(coco_gt.getCatIds())}
    return {"checkpoint": checkpoint,
            # Training iterations of the checkpoint: run folders are reused by benchmark runs
            # of different lengths, so the table says which one it measured.
            "step": _training_step(segmenter),
            "classes": {names[c]: {"mask_ap": ap.get(c, float("nan")),
                                   "prompted_miou": float(np.mean(ious[c])) if c in ious
                                   else float("nan"), "instances": len(ious.get(c, []))}
                        for c in sorted(names)},
            "prompted_miou": float(np.mean([x for v in ious.values() for x in v]))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--dataset", default="synthetic", choices=list(DATASETS))
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--name", default=None, help="results name (default per_class_<dataset>)")
    parser.add_argument("--features", action="store_true",
                        help="also the separability (AUC) of each model's mask features")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    cfg = dataset_config(args.dataset)
    annotations, images = ROOT / cfg.data.val_json, ROOT / cfg.data.val_images
    cfg.data.val_json, cfg.data.val_images = str(annotations), str(images)
    runs = [evaluate(c, annotations, images, args.max_images) for c in args.checkpoints]
    if args.features:
        from benchmarks.sim_figure import feature_separability
        from serving.model.model_file import load_checkpoint

        for run in runs:
            model = load_checkpoint(run["checkpoint"])[0].eval()
            run["features"] = feature_separability(model, cfg)
    classes = list(runs[0]["classes"])
    head = "| checkpoint | iterations | " + " | ".join(classes) + " | all (prompted) |"
    lines = [f"# Per-class mask AP and GT-box-prompted mask IoU ({args.dataset})", "",
             "Command: `python benchmarks/per_class.py " + " ".join(
                 argv if argv is not None else sys.argv[1:]) + "`", "",
             "Each cell: mask AP (automatic mode) / mean IoU of the mask predicted from the "
             "ground-truth box.", "", head, "|" + "---|" * (len(classes) + 3)]
    for run in runs:
        cells = [f"{run['classes'][c]['mask_ap']:.1f} / {run['classes'][c]['prompted_miou']:.3f}"
                 for c in classes]
        lines.append(f"| `{run['checkpoint']}` | {run['step'] if run['step'] is not None else '-'}"
                     " | " + " | ".join(cells) +
                     f" | {run['prompted_miou']:.3f} |")
    if args.features:
        lines += ["", "Mask-feature separability inside the boxes (AUC; oracle prototype per "
                  "class / per instance, `feature_separability`):", "",
                  "| checkpoint | instances | oracle class | oracle instance |",
                  "|---|---|---|---|"]
        lines += [f"| `{r['checkpoint']}` | {r['features']['instances']} | "
                  f"{r['features'].get('oracle_class', float('nan')):.3f} | "
                  f"{r['features'].get('oracle_instance', float('nan')):.3f} |" for r in runs]
        if args.dataset.startswith("synthetic"):
            from pycocotools.coco import COCO

            baseline = palette_separability(COCO(str(annotations)), images)
            for run in runs:
                run["features"]["palette_baseline"] = baseline
            lines += ["", f"Pixel-colour baseline (`palette_separability`, no learning: is the "
                      f"pixel's nearest generator colour an object colour?): AUC {baseline:.3f}."]
    name = args.name or f"per_class_{args.dataset}"
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(runs, indent=2))
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
