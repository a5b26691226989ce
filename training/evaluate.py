"""COCO mask and box AP of a model or checkpoint, through the library's own inference path.

``python -m training.evaluate --checkpoint runs/x/model_final.safetensors --annotations
val.json --images DIR [--output metrics.json]``. Predictions come from
:class:`serving.Segmenter` (the same code users run), scores from pycocotools' COCOeval.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from serving import InferenceConfig, Segmenter
from serving.backends.locate import MODEL_HELP, locate_model
from serving.backends.torch_backend import TorchBackend
from serving.errors import InputError, SimError
from serving.files import check_writable_file
from serving.formats.cocoeval import evaluate_coco
from serving.model import CondInst

from .data.coco_dataset import CocoIndex

if TYPE_CHECKING:
    from .train_config import TrainConfig


def predict_dataset(segmenter: Segmenter, annotations: str | Path, images: str | Path,
                    category_ids: Sequence[int] | None = None, max_images: int | None = None,
                    batch_size: int = 4, progress: bool = True) -> list[dict[str, Any]]:
    """Automatic-mode COCO results for the images of a COCO annotation file."""
    index = CocoIndex(annotations)
    ids = list(index.images)[:max_images]
    results: list[dict[str, Any]] = []
    for start in tqdm(range(0, len(ids), batch_size), desc="eval", disable=not progress,
                      leave=False):
        chunk = ids[start:start + batch_size]
        paths = [Path(images) / index.images[i][0] for i in chunk]
        for image_id, pred in zip(chunk, segmenter.predict_batch(paths, batch_size=batch_size)):
            results.extend(pred.to_coco(image_id, category_ids))
    return results


def evaluate_model(model: CondInst, class_names: Sequence[str], cfg: InferenceConfig,
                   annotations: str | Path, images: str | Path,
                   category_ids: Sequence[int] | None = None,
                   max_images: int | None = None) -> dict[str, float]:
    """Mask and box AP (percent) of an in-memory model on a COCO dataset with masks."""
    device = next(model.parameters()).device
    segmenter = Segmenter(TorchBackend(model, cfg, device=device), class_names, cfg)
    results = predict_dataset(segmenter, annotations, images, category_ids, max_images)
    return _percent(evaluate_coco(_ground_truth(annotations, max_images), results, f1=True))


def _ground_truth(annotations: str | Path, max_images: int | None) -> dict[str, Any] | str:
    """The annotation file, restricted to its first ``max_images`` images when given."""
    if max_images is None:
        return str(annotations)
    data = json.loads(Path(annotations).read_text())
    data["images"] = data["images"][:max_images]
    keep = {img["id"] for img in data["images"]}
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    return data


def _percent(metrics: dict[str, float]) -> dict[str, float]:
    """AP and F1 values in percent (``-1`` stays: no instance of that size); score
    thresholds stay scores."""
    return {k: (v if v < 0 or k.endswith("_threshold") else 100.0 * v)
            for k, v in metrics.items()}


def calibration_refusal(annotations: str | Path, max_images: int | None) -> str | None:
    """Why an evaluation on ``annotations`` (its first ``max_images`` images) cannot give a
    calibration (no images, or no annotated ones), or ``None`` when it can."""
    index = CocoIndex(annotations)
    ids = list(index.images)[:max_images]
    if not ids:
        return "the evaluation has no images (an empty split, or --max-images 0)"
    if not any(len(index.boxes.get(i, ())) for i in ids):
        return f"none of its {len(ids)} images has an annotation"
    return None


def evaluate_checkpoint(checkpoint: str | Path, annotations: str | Path, images: str | Path,
                        device: str = "auto", max_images: int | None = None,
                        calibrate: bool = False) -> dict[str, float]:
    """Mask and box AP (percent) of a model (any file or folder ``Segmenter.load`` takes).

    ``calibrate``: also store the validation calibration (the F1-best score threshold and the
    prompted-score quantiles, :func:`training.score_calibration.validation_calibration`) in the
    checkpoint's metadata, keeping what it already holds (``.safetensors`` only). An
    evaluation that cannot support a calibration (no images, no annotations) is refused
    before any work, and the model's calibration is kept.
    """
    if max_images is not None and max_images < 1:
        raise InputError(f"--max-images {max_images}: must be at least 1 (leave it out for "
                         "every image)")
    if calibrate:
        found = locate_model(checkpoint)
        if found.kind != "checkpoint":
            raise InputError(f"--calibrate: {checkpoint} is not a .safetensors checkpoint; "
                             "calibrate the checkpoint, then export it")
        checkpoint = found.path
    why = calibration_refusal(annotations, max_images) if calibrate else None
    if why is not None:
        raise InputError(f"--calibrate: {annotations}: {why}, so it cannot calibrate the "
                         "model; its calibration is kept as it was; evaluate a split with "
                         "annotated images")
    segmenter = Segmenter.load(checkpoint, device=device)
    category_ids = segmenter.card.category_ids if segmenter.card else None
    results = predict_dataset(segmenter, annotations, images, category_ids, max_images)
    metrics = _percent(evaluate_coco(_ground_truth(annotations, max_images), results, f1=True))
    if calibrate:
        from serving.model.model_file import recalibrate_checkpoint

        from .score_calibration import validation_calibration

        found = validation_calibration(segmenter, metrics, annotations, images)
        recalibrate_checkpoint(checkpoint, found, source=str(annotations))
    return metrics


def evaluate_untrained(cfg: TrainConfig, path: str | Path) -> dict[str, float]:
    """Mask and box AP (percent) of ``cfg``'s architecture before training (ImageNet backbone,
    random heads), saved as a checkpoint at ``path`` and evaluated on ``cfg.data``'s val split:
    the floor that trained models are compared with. Sets ``cfg.model.num_classes`` from the
    training data."""
    from serving.model import build_condinst
    from serving.model.model_file import new_card, save_checkpoint

    from .data import CocoInstanceDataset

    data = CocoInstanceDataset(cfg.data.train_json, cfg.data.train_images)
    cfg.model.num_classes = data.num_classes
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, build_condinst(cfg.model),
                    new_card(cfg.model, data.class_names, cfg.inference,
                             category_ids=data.label_to_category_id))
    return evaluate_checkpoint(path, cfg.data.val_json, cfg.data.val_images, device="cpu",
                               max_images=cfg.data.max_val_images)


def main(argv: Sequence[str] | None = None, prog: str = "python -m training.evaluate") -> int:
    """``sim eval``; ``prog`` is the name its ``--help`` shows. Returns the exit code."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  sim eval --model runs/quickstart/model_final.safetensors "
               "--annotations data/synthetic/val.json --images data/synthetic/images\n"
               "  sim eval --model model.onnx --annotations val.json --images imgs/ "
               "--output metrics.json\n"
               "  sim eval --model model.safetensors ... --calibrate   # store the F1-best "
               "threshold and score reference")
    parser.add_argument("--model", "--checkpoint", dest="checkpoint", required=True,
                        help=MODEL_HELP)
    parser.add_argument("--annotations", required=True, help="COCO JSON with masks")
    parser.add_argument("--images", required=True, help="folder of the images")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--max-images", type=int, default=None,
                        help="evaluate the first N images only (N >= 1)")
    parser.add_argument("--output", help="write the metrics as JSON here")
    parser.add_argument("--calibrate", action="store_true",
                        help="store the score threshold that maximises F1 and the prompted "
                             "scores of this validation in the checkpoint's metadata")
    args = parser.parse_args(argv)
    try:
        if args.output:
            check_writable_file(args.output)
        metrics = evaluate_checkpoint(args.checkpoint, args.annotations, args.images,
                                      args.device, args.max_images, args.calibrate)
    except SimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    text = json.dumps({k: round(v, 3) for k, v in metrics.items()}, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
