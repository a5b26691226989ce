"""Built-in synthetic dataset where colour affinity alone fails (DESIGN.md section 4).

Six classes, each with a *shape* identity and a *texture* identity. Objects and background
clutter draw their colours from the same palette, the clutter includes textured patches, and
objects overlap often (same-class instances included), so separating an instance needs shape
and texture cues rather than colour. Later-drawn objects occlude earlier ones; annotations hold
the visible mask only (COCO RLE) with the bbox recomputed from it.

Run::

    python -m training.data.synthetic --out data/synthetic --images 200 --seed 0

Everything is deterministic from ``seed``: image ``i`` is rendered from the random stream
``(seed, i)``, so the same seed gives byte-identical JSON and identical PNGs.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from serving.errors import InputError, SimError

#: Colours shared by objects and background clutter (RGB uint8).
PALETTE = np.array(
    [[220, 60, 50], [60, 160, 70], [50, 90, 200], [230, 200, 60],
     [150, 70, 170], [60, 190, 200], [235, 235, 230], [40, 40, 45]],
    dtype=np.uint8,
)
#: Background colours of the ``"distinct"`` variant: muted tones that no object uses.
BACKGROUND_PALETTE = np.array(
    [[128, 118, 108], [96, 104, 112], [150, 138, 118], [104, 118, 100],
     [132, 104, 96], [84, 84, 96], [170, 160, 156], [112, 96, 124]],
    dtype=np.uint8,
)
#: Background variants: ``"shared"`` (the default: clutter in the objects' palette and texture
#: vocabulary) and ``"distinct"`` (a diagnostic: the same images, objects and clutter geometry,
#: but the clutter drawn in ``BACKGROUND_PALETTE`` and untextured).
BACKGROUNDS = ("shared", "distinct")
#: Category names; category id = index + 1.
CLASSES = ("disc", "ring", "triangle", "cross", "crescent", "l_shape")
#: Per class: (texture kind, parameter) -- the class's texture identity in the image frame.
TEXTURES = (
    ("stripes", (0.0, 6.0)),     # disc: horizontal stripes, period 6
    ("dots", (6.0, 1.7)),        # ring: dot grid, period 6, radius 1.7
    ("checker", (5.0, 0.0)),     # triangle: checkerboard, cell 5
    ("stripes", (45.0, 9.0)),    # cross: diagonal stripes, period 9
    ("outline", (2.0, 0.0)),     # crescent: solid with a 2 px outline
    ("stripes", (120.0, 4.0)),   # l_shape: steep stripes, period 4
)
MIN_VISIBLE_FRACTION = 0.2
MIN_VISIBLE_PIXELS = 16
MIN_OBJECT_SIDE = 12.0
MAX_OBJECT_FRACTION = 0.45

Grid = tuple[np.ndarray, np.ndarray]


def _shape_mask(cls: int, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Boolean shape of class ``cls`` at object coordinates (u, v) (centred, rotated), radius r."""
    rad = np.hypot(u, v)
    if cls == 0:  # disc
        return rad <= r
    if cls == 1:  # ring
        return (rad <= r) & (rad >= 0.55 * r)
    if cls == 2:  # equilateral triangle: r cos(angle - sector centre) <= apothem
        ang = np.mod(np.arctan2(v, u), 2 * math.pi / 3) - math.pi / 3
        return rad * np.cos(ang) <= r * 0.5
    if cls == 3:  # plus-shaped cross
        w = 0.32 * r
        au, av = np.abs(u), np.abs(v)
        return ((au <= r) & (av <= w)) | ((av <= r) & (au <= w))
    if cls == 4:  # crescent: disc minus an offset smaller disc
        return (rad <= r) & (np.hypot(u - 0.45 * r, v) > 0.8 * r)
    # l_shape: two bars of width 0.7 r sharing the corner (-r, -r)
    w = 0.7 * r
    inside = (np.abs(u) <= r) & (np.abs(v) <= r)
    return inside & ((u <= -r + w) | (v <= -r + w))


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """4-neighbour binary erosion repeated ``steps`` times (pixels outside count as empty)."""
    out = mask.copy()
    for _ in range(steps):
        p = np.pad(out, 1)
        out = out & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return out


def _pattern(kind: str, param: tuple[float, float], grid: Grid, phase: float,
             mask: np.ndarray) -> np.ndarray:
    """Boolean texture (True = second colour) over image-frame pixel centres ``grid``."""
    yy, xx = grid
    if kind == "stripes":
        angle, period = math.radians(param[0]), param[1]
        t = xx * math.sin(angle) + yy * math.cos(angle) + phase * period
        return np.mod(t, period) < period / 2
    if kind == "dots":
        period, radius = param
        dx = np.mod(xx + phase * period, period) - period / 2
        dy = np.mod(yy + phase * period, period) - period / 2
        return dx * dx + dy * dy <= radius * radius
    if kind == "checker":
        cell = param[0]
        off = phase * 2 * cell
        return (np.floor((xx + off) / cell) + np.floor((yy + off) / cell)) % 2 == 1
    return mask & ~_erode(mask, int(param[0]))  # outline band


def _paint(image: np.ndarray, y0: int, x0: int, mask: np.ndarray, texture: np.ndarray,
           colours: tuple[int, int], palette: np.ndarray = PALETTE) -> None:
    """Write two palette colours into ``image`` (H, W, 3) under ``mask`` at offset (y0, x0)."""
    h, w = mask.shape
    crop = image[y0:y0 + h, x0:x0 + w]
    crop[mask & ~texture] = palette[colours[0]]
    crop[mask & texture] = palette[colours[1]]


def _local_grid(cx: float, cy: float, half: float, size: int) -> tuple[int, int, Grid] | None:
    """Clipped crop (y0, x0, pixel-centre grid) around (cx, cy); None if fully outside."""
    x0, x1 = max(0, int(cx - half - 2)), min(size, int(math.ceil(cx + half + 2)))
    y0, y1 = max(0, int(cy - half - 2)), min(size, int(math.ceil(cy + half + 2)))
    if x1 <= x0 or y1 <= y0:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    return y0, x0, (yy, xx)


def _two_colours(rng: np.random.Generator) -> tuple[int, int]:
    a, b = rng.choice(len(PALETTE), size=2, replace=False)
    return int(a), int(b)


def _background(rng: np.random.Generator, size: int, background: str = "shared") -> np.ndarray:
    """Cluttered background (size, size, 3) uint8: palette patches, lines, blobs, textures.

    ``background="distinct"`` draws the same clutter (the random stream is consumed identically,
    so the objects drawn afterwards are unchanged) in ``BACKGROUND_PALETTE``, textures solid.
    """
    distinct = background == "distinct"
    palette = BACKGROUND_PALETTE if distinct else PALETTE
    base = tuple(int(c) for c in palette[rng.integers(len(palette))])
    canvas = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(10, 22))):
        colour = tuple(int(c) for c in palette[rng.integers(len(palette))])
        x, y = rng.uniform(-0.1, 1.1, size=2) * size
        w, h = rng.uniform(0.03, 0.35, size=2) * size
        kind = rng.integers(3)
        if kind == 0:
            draw.rectangle([x, y, x + w, y + h], fill=colour)
        elif kind == 1:
            draw.ellipse([x, y, x + w, y + h], fill=colour)
        else:
            draw.line([x, y, x + rng.uniform(-1, 1) * w * 2, y + rng.uniform(-1, 1) * h * 2],
                      fill=colour, width=int(rng.integers(1, 6)))
    image = np.array(canvas)
    # textured clutter patches: same texture vocabulary as objects, non-object shapes
    for _ in range(int(rng.integers(2, 6))):
        half = rng.uniform(0.04, 0.15) * size
        cx, cy = rng.uniform(0, size, size=2)
        local = _local_grid(cx, cy, half, size)
        if local is None:
            continue
        y0, x0, grid = local
        mask = (np.abs(grid[0] - cy) <= half * rng.uniform(0.3, 1.0)) & (
            np.abs(grid[1] - cx) <= half)
        kind, param = TEXTURES[int(rng.integers(len(TEXTURES)))]
        if kind == "stripes":
            param = (float(rng.uniform(0, 180)), float(rng.uniform(3, 10)))
        texture = _pattern(kind, param, grid, float(rng.uniform()), mask)
        colours = _two_colours(rng)
        _paint(image, y0, x0, mask, texture & (not distinct), colours, palette)
    return image


def generate_image(seed: int, index: int, size: int = 320, background: str = "shared"
                   ) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Render image ``index`` of the dataset with ``seed`` (``background``: see BACKGROUNDS).

    Returns:
        image: (size, size, 3) uint8 RGB.
        instances: list of (category_id 1..6, visible mask (size, size) bool), in drawing order,
            only those with at least 20% of their in-image area and 16 pixels visible.
    """
    rng = np.random.default_rng([seed, index])
    image = _background(rng, size, background)
    owner = np.full((size, size), -1, dtype=np.int16)
    drawn: list[tuple[int, float, float, float, int, int, np.ndarray]] = []
    for k in range(int(rng.integers(3, 9))):
        radius = 0.5 * math.exp(rng.uniform(math.log(MIN_OBJECT_SIDE),
                                            math.log(MAX_OBJECT_FRACTION * size)))
        cls = int(rng.integers(len(CLASSES)))
        cx, cy = rng.uniform(0, size, size=2)
        if drawn and rng.uniform() < 0.55:  # overlap an earlier object, often of its class
            prev = drawn[int(rng.integers(len(drawn)))]
            if rng.uniform() < 0.5:
                cls = prev[0]
            ang = rng.uniform(0, 2 * math.pi)
            dist = rng.uniform(0.3, 0.95) * (radius + prev[3])
            cx = float(np.clip(prev[1] + dist * math.cos(ang), 0, size - 1))
            cy = float(np.clip(prev[2] + dist * math.sin(ang), 0, size - 1))
        phi = rng.uniform(0, 2 * math.pi)
        colours = _two_colours(rng)
        phase = float(rng.uniform())
        local = _local_grid(cx, cy, radius, size)
        if local is None:
            continue
        y0, x0, grid = local
        dx, dy = grid[1] - cx, grid[0] - cy
        u = dx * math.cos(phi) + dy * math.sin(phi)
        v = -dx * math.sin(phi) + dy * math.cos(phi)
        mask = _shape_mask(cls, u, v, radius)
        if not mask.any():
            continue
        kind, param = TEXTURES[cls]
        _paint(image, y0, x0, mask, _pattern(kind, param, grid, phase, mask), colours)
        owner[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]][mask] = k
        drawn.append((cls, cx, cy, radius, y0, x0, mask))
    noise = rng.normal(0.0, 7.0, size=image.shape).astype(np.float32)
    image = np.clip(image.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    instances = []
    for k, (cls, _, _, _, y0, x0, mask) in enumerate(drawn):
        crop = owner[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]] == k
        visible = int(crop.sum())
        if visible < MIN_VISIBLE_PIXELS or visible < MIN_VISIBLE_FRACTION * int(mask.sum()):
            continue
        full = np.zeros((size, size), dtype=bool)
        full[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]] = crop
        instances.append((cls + 1, full))
    return image, instances


def _annotation(ann_id: int, image_id: int, category_id: int, mask: np.ndarray,
                encode: Callable[[np.ndarray], dict]) -> dict:
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    bbox = [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]
    rle = encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "area": int(mask.sum()), "iscrowd": 0, "segmentation": rle}


def generate_dataset(out_dir: str | Path, num_images: int, seed: int, size: int = 320,
                     val_fraction: float = 0.2, verbose: bool = False,
                     background: str = "shared") -> dict[str, Path]:
    """Write ``out_dir/images/NNNNNN.png``, ``out_dir/train.json`` and ``out_dir/val.json``.

    Image ``i`` is ``images/{i:06d}.png`` with COCO image id ``i + 1``; annotation ids are unique
    across both files. Bboxes are COCO ``[x, y, w, h]`` of the visible mask, in pixels.

    Returns:
        ``{"root", "images", "train", "val"}`` -> paths.
    Raises:
        InputError: a non-positive image count, a size below 64, a fraction outside [0, 1)
            or an unknown background.
    """
    from pycocotools import mask as mask_utils

    if num_images < 1:
        raise InputError(f"--images {num_images}: pass at least 1 image")
    if size < 64:
        raise InputError(f"--size {size}: pass an image side of at least 64 pixels")
    if background not in BACKGROUNDS:
        raise InputError(f"--background {background!r}: use one of {', '.join(BACKGROUNDS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"--val-fraction {val_fraction}: pass a value in [0, 1)")
    start = time.perf_counter()
    root = Path(out_dir)
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    num_val = min(num_images - 1, int(round(num_images * val_fraction)))
    if val_fraction > 0 and num_images >= 2:
        num_val = max(1, num_val)
    order = np.random.default_rng([seed, 2**31]).permutation(num_images)
    val_set = {int(i) for i in order[:num_val]}
    splits: dict[str, dict[str, list]] = {"train": {"images": [], "annotations": []},
                                          "val": {"images": [], "annotations": []}}
    per_class = [0] * len(CLASSES)
    ann_id = 1
    for i in range(num_images):
        image, instances = generate_image(seed, i, size, background)
        name = f"{i:06d}.png"
        Image.fromarray(image).save(image_dir / name, compress_level=1)
        split = splits["val" if i in val_set else "train"]
        split["images"].append({"id": i + 1, "file_name": name, "width": size, "height": size})
        for category_id, mask in instances:
            split["annotations"].append(
                _annotation(ann_id, i + 1, category_id, mask, mask_utils.encode))
            per_class[category_id - 1] += 1
            ann_id += 1
    categories = [{"id": c + 1, "name": n, "supercategory": "shape"}
                  for c, n in enumerate(CLASSES)]
    paths = {"root": root, "images": image_dir}
    for name, split in splits.items():
        coco = {"info": {"description": "sim-boxseg synthetic shapes", "seed": seed,
                         "size": size, "background": background, "split": name},
                "images": split["images"], "annotations": split["annotations"],
                "categories": categories}
        paths[name] = root / f"{name}.json"
        paths[name].write_text(json.dumps(coco, separators=(",", ":")))
    if verbose:
        counts = ", ".join(f"{n} {c}" for n, c in zip(CLASSES, per_class, strict=True))
        print(f"synthetic: {num_images} images ({num_images - num_val} train, {num_val} val), "
              f"{sum(per_class)} instances ({counts}) in {time.perf_counter() - start:.1f} s "
              f"-> {root}")
    return paths


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--images", type=int, default=200, help="number of images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=320, help="image side in pixels")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--background", default="shared", choices=BACKGROUNDS,
                        help="shared: clutter in the objects' colours and textures (default); "
                             "distinct: the same clutter in muted colours no object uses "
                             "(a diagnostic variant)")
    args = parser.parse_args(argv)
    try:
        generate_dataset(args.out, args.images, args.seed, args.size, args.val_fraction,
                         verbose=True, background=args.background)
    except SimError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
