"""``sim info MODEL``: what a model file says about itself (its model card).

Prints the backbone, classes, backend, device, precision and input rules, how the file was
made (training, calibration, export steps: from which file, when, with which library
version), and what the model knows about its own data (written by training's evaluation):
the score threshold that maximised F1 on its validation split (used by default for pictures,
the app and the server), its validation scores (the reference for the out-of-domain
warning) and the size of its training objects at the network input (compare them with your
data's; ``--image-size`` changes the input size). ``--json`` prints the card as stored.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from ..backends.locate import MODEL_HELP
from ..formats.coco import boxes_by_image, read_coco_json
from ..inference.domain import box_sizes, calibration_of, quantiles, size_advice
from ..segmenter import Segmenter
from .common import add_image_size_option


def describe(seg: Segmenter) -> dict[str, Any]:
    """``Segmenter.model_info``, the model's calibration (empty when it has none) and its
    whole card (:meth:`serving.model.card.ModelCard.to_json`; ``None`` without one)."""
    return {**seg.model_info, "calibration": calibration_of(seg).to_dict(),
            "card": seg.card.to_json() if seg.card is not None else None}


def _history(card: dict[str, Any]) -> list[str]:
    """One line per step of the card's history, oldest first."""
    out = []
    for step in card.get("history") or []:
        details = step.get("details") or {}
        said = [f"from {step['source']}" if step.get("source") else "",
                f"step {details['step']}" if "step" in details else "",
                step.get("created") or "",
                f"library {step['library_version']}" if step.get("library_version") else ""]
        out.append(f"  {step.get('made_by')}: {', '.join(s for s in said if s) or '-'}")
    return ["made by:"] + out if out else []


def _lines(info: dict[str, Any]) -> list[str]:
    """A human-readable summary of :func:`describe`."""
    card = info.get("card") or {}
    out = [f"model:      {info.get('backbone')} ({info.get('backend')} on {info.get('device')}"
           f", {card.get('precision', 'fp32')})",
           f"classes:    {', '.join(info.get('classes', []))}",
           f"input size: shorter side {info.get('min_size')}, longer side at most "
           f"{info.get('max_size')} (change with --image-size)"]
    if card.get("category_ids"):
        out.append(f"COCO category ids: {', '.join(map(str, card['category_ids']))}")
    out += _history(card)
    calib = info.get("calibration") or {}
    if not calib:
        return out + ["calibration: none (train with a validation split, or run "
                      "'sim eval --calibrate')"]
    out.append(f"score threshold: {calib.get('score_threshold')} (F1 {calib.get('f1')} % on "
               "its validation split; used for pictures, the app and the server)")
    sizes = calib.get("object_sizes") or {}
    if sizes:
        out.append(f"training objects: sqrt(w*h) at the input p10/p50/p90 = {sizes.get('p10')} "
                   f"/ {sizes.get('p50')} / {sizes.get('p90')} px")
    scores = calib.get("prompt_scores") or {}
    if scores:
        out.append(f"validation box scores: p10/p50/p90 = {scores.get('p10')} / "
                   f"{scores.get('p50')} / {scores.get('p90')}")
    return out


def size_lines(seg: Segmenter, annotations: str) -> list[str]:
    """The boxes of a COCO file against the model's training objects, at its input size."""
    sizes = box_sizes(boxes_by_image(read_coco_json(annotations, "annotations")),
                      seg.cfg.min_size, seg.cfg.max_size)
    if not sizes.size:
        return [f"{annotations}: no boxes on images with width and height"]
    q = quantiles(sizes)
    lines = [f"{annotations}: {sizes.size} boxes, sqrt(w*h) at the model's input "
             f"p10/p50/p90 = {q['p10']:.1f} / {q['p50']:.1f} / {q['p90']:.1f} px"]
    advice = size_advice(calibration_of(seg), sizes, seg.cfg.min_size, seg.cfg.max_size)
    return lines + ([f"note: {advice}"] if advice else [])


def main(argv: Sequence[str] | None = None, prog: str = "python -m serving info") -> int:
    """``sim info``; ``prog`` is the name its ``--help`` shows. Returns the exit code."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  sim info runs/quickstart/model_final.safetensors\n"
               "  sim info --model exported/model_final.auto.onnx --json\n"
               "  sim info MODEL --annotations my_boxes.json   # are my objects the right size?\n"
               "  sim info MODEL --annotations my_boxes.json --image-size 512")
    parser.add_argument("path", nargs="?", metavar="MODEL",
                        help=MODEL_HELP)
    parser.add_argument("--model", help="the same as MODEL")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda, ... (default cpu)")
    parser.add_argument("--json", action="store_true", help="print everything as JSON")
    parser.add_argument("--annotations", metavar="COCO_JSON",
                        help="also compare this dataset's box sizes with the training objects")
    add_image_size_option(parser)
    args = parser.parse_args(argv)
    model = args.model or args.path
    if model is None:
        parser.error("give the model file: sim info MODEL")
    seg = Segmenter.load(model, device=args.device, image_size=args.image_size)
    info = describe(seg)
    print(json.dumps(info, indent=2) if args.json else "\n".join(_lines(info)))
    if args.annotations:
        print("\n".join(size_lines(seg, args.annotations)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
