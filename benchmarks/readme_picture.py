"""The README's picture: validation images with their prompt boxes, and the model's masks.

Left of each pair: the image with its ground-truth boxes (what a user draws); right: the mask
the model draws in each box (``Segmenter.predict(image, boxes=...)``), labelled with class and
score. Made from the project's own data and model:

    sim quickstart                                  # trains runs/quickstart/model_final
    python benchmarks/readme_picture.py             # -> benchmarks/results/readme_picture.jpg

Writes the picture (JPEG, quality 90: a few hundred KB instead of 1.5 MB of PNG for the
images' noise) and a JSON naming the model, the images and the command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from serving import Segmenter, load_image  # noqa: E402
from serving.formats.visualize import draw_predictions  # noqa: E402


def boxes_picture(image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """The image with its prompt boxes drawn in white."""
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    for x1, y1, x2, y2 in boxes:
        draw.rectangle([x1, y1, x2, y2], outline=(255, 255, 255), width=2)
    return np.asarray(canvas)


def pick_images(val: dict, count: int, min_side: float = 24.0) -> list[dict]:
    """The validation images with the most boxes at least ``min_side`` pixels on each side
    (objects a reader can see at README size; ties: fewer small boxes, then the lowest id),
    up to ``count``."""
    large: dict[int, int] = {}
    small: dict[int, int] = {}
    for ann in val["annotations"]:
        table = large if min(ann["bbox"][2:]) >= min_side else small
        table[ann["image_id"]] = table.get(ann["image_id"], 0) + 1
    ranked = sorted(val["images"], key=lambda img: (-large.get(img["id"], 0),
                                                    small.get(img["id"], 0), img["id"]))
    return ranked[:count]


def upscale(image: np.ndarray, boxes: np.ndarray, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """The image ``scale`` times larger (bicubic) and its XYXY boxes in the new pixels, so the
    drawn text and outlines stay sharp; the model resizes its input to its own size anyway."""
    if scale == 1:
        return image, boxes
    h, w = image.shape[:2]
    big = Image.fromarray(image).resize((w * scale, h * scale), Image.Resampling.BICUBIC)
    return np.asarray(big), boxes * scale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="runs/quickstart/model_final.safetensors")
    parser.add_argument("--annotations", default="data/synthetic/val.json")
    parser.add_argument("--images", default="data/synthetic/images")
    parser.add_argument("--count", type=int, default=2, help="image pairs, side by side")
    parser.add_argument("--scale", type=int, default=2, help="draw at this many times the size")
    parser.add_argument("--name", default="readme_picture")
    args = parser.parse_args()
    seg = Segmenter.load(args.model, device="cpu")
    val = json.loads(Path(args.annotations).read_text())
    names = {c["id"]: c["name"] for c in val["categories"]}
    tiles, used = [], []
    for img in pick_images(val, args.count):
        anns = [a for a in val["annotations"] if a["image_id"] == img["id"]]
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                         np.float32)
        labels = [names[a["category_id"]] for a in anns]
        image, boxes = upscale(load_image(Path(args.images) / img["file_name"]), boxes,
                               args.scale)
        pred = seg.predict(image, boxes=boxes, labels=labels)
        gap = np.full((image.shape[0], 8 * args.scale, 3), 255, np.uint8)
        tiles += [boxes_picture(image, boxes), gap, draw_predictions(image, pred), gap]
        used.append({"file_name": img["file_name"], "boxes": len(boxes),
                     "mean_score": round(float(pred.scores.mean()), 3)})
    picture = np.concatenate(tiles[:-1], axis=1)
    out = ROOT / "benchmarks" / "results"
    Image.fromarray(picture).save(out / f"{args.name}.jpg", quality=90)
    command = "python benchmarks/readme_picture.py " + " ".join(sys.argv[1:])
    (out / f"{args.name}.json").write_text(json.dumps(
        {"command": command.strip(), "model": args.model, "images": used}, indent=2))
    print(f"wrote {out / (args.name + '.jpg')}: {used}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
