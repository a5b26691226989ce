"""Regenerate the app's bundled example images (deterministic, no model needed).

Each example is a small PNG of textured shapes (discs, rings, triangles, the built-in synthetic
dataset's first classes) on a cluttered background, plus a prompt box around each shape in
``examples.json`` so the page can open with boxes already drawn.

Run from the repository root::

    python -m app.examples.make_examples
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
#: (file name, width, height, seed, number of shapes)
EXAMPLES = (("shapes_1.png", 320, 240, 1, 2), ("shapes_2.png", 288, 224, 2, 3),
            ("shapes_3.png", 256, 256, 3, 3))
COLOURS = ((220, 60, 50), (60, 160, 70), (50, 90, 200), (230, 200, 60), (150, 70, 170))


def _draw_shape(draw: ImageDraw.ImageDraw, kind: int, box: tuple[int, int, int, int],
                fill: tuple[int, int, int], stripe: tuple[int, int, int]) -> None:
    x1, y1, x2, y2 = box
    if kind == 0:  # disc with horizontal stripes
        draw.ellipse(box, fill=fill)
        cx, cy, r = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2 - 3
        for y in range(y1 + 4, y2 - 3, 6):  # chords of the disc
            half = max(r * r - (y - cy) ** 2, 0.0) ** 0.5
            draw.line([(cx - half, y), (cx + half, y)], fill=stripe, width=2)
    elif kind == 1:  # ring
        w = max(4, (x2 - x1) // 5)
        draw.ellipse(box, outline=fill, width=w)
    else:  # triangle
        draw.polygon([((x1 + x2) // 2, y1), (x2, y2), (x1, y2)], fill=fill, outline=stripe)


def make_example(width: int, height: int, seed: int, count: int
                 ) -> tuple[np.ndarray, list[dict]]:
    """Render one example.

    Returns:
        image: (height, width, 3) uint8 RGB.
        boxes: one ``{"xmin", "ymin", "xmax", "ymax", "label"}`` dict (original pixels, label
            "auto") per shape, in drawing order.
    """
    rng = np.random.default_rng(seed)
    canvas = Image.new("RGB", (width, height), (128, 124, 118))
    draw = ImageDraw.Draw(canvas)
    for _ in range(12):  # clutter in the objects' own colours
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        s = int(rng.integers(4, 14))
        draw.rectangle([x, y, x + s, y + s // 2], fill=COLOURS[int(rng.integers(len(COLOURS)))])
    boxes: list[dict] = []
    cell = width // count
    for k in range(count):
        side = int(rng.integers(min(cell, height) // 2, min(cell, height) - 12))
        x1 = k * cell + int(rng.integers(4, max(5, cell - side - 4)))
        y1 = int(rng.integers(4, height - side - 4))
        box = (x1, y1, x1 + side, y1 + side)
        fill = COLOURS[int(rng.integers(len(COLOURS)))]
        stripe = COLOURS[int(rng.integers(len(COLOURS)))]
        _draw_shape(draw, k % 3, box, fill, stripe)
        boxes.append({"xmin": box[0] - 2, "ymin": box[1] - 2, "xmax": box[2] + 2,
                      "ymax": box[3] + 2, "label": "auto"})
    return np.asarray(canvas), boxes


def main() -> None:
    """Write the PNGs and ``examples.json`` next to this file."""
    index = []
    for name, width, height, seed, count in EXAMPLES:
        image, boxes = make_example(width, height, seed, count)
        Image.fromarray(image).save(HERE / name, optimize=True)
        index.append({"image": name, "boxes": boxes})
    (HERE / "examples.json").write_text(json.dumps(index, indent=1) + "\n")
    print(f"wrote {len(index)} examples to {HERE}")


if __name__ == "__main__":
    main()
