"""Test data for the batch command line: a folder of good and bad images, a small COCO
dataset with masks drawn from known shapes, and helpers to read the outputs back."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

#: name -> (height, width) after EXIF orientation, for the good images of ``mixed_folder``.
GOOD_IMAGES = {
    "rgb.jpg": (72, 96),
    "sub/rgb.png": (64, 80),
    "gray.png": (60, 90),
    "rgba.png": (70, 70),
    "deep16.png": (50, 100),
    "exif_rotated.jpg": (96, 64),  # stored 64x96 (h x w), orientation 6 rotates it
}
BAD_IMAGES = ("truncated.jpg", "zero.jpg", "text.png")


def _pattern(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 100, np.uint8)
    img[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = rng.integers(0, 255, 3, dtype=np.uint8)
    return img


def mixed_folder(root: Path) -> Path:
    """Good images (RGB JPEG, RGB PNG in a subfolder, grayscale, RGBA, 16-bit PNG,
    EXIF-rotated JPEG) next to a truncated JPEG, a zero-byte file and a text file named .png."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir(exist_ok=True)
    Image.fromarray(_pattern(72, 96, 0)).save(root / "rgb.jpg", quality=95)
    Image.fromarray(_pattern(64, 80, 1)).save(root / "sub/rgb.png")
    Image.fromarray(_pattern(60, 90, 2)[:, :, 0]).save(root / "gray.png")  # mode L
    rgba = np.dstack([_pattern(70, 70, 3), np.full((70, 70), 200, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    deep = (np.linspace(0, 65535, 100)[None, :] * np.ones((50, 1))).astype(np.uint16)
    Image.fromarray(deep).save(root / "deep16.png")  # mode I;16
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(_pattern(64, 96, 4)).save(root / "exif_rotated.jpg", exif=exif)
    buf = io.BytesIO()
    Image.fromarray(_pattern(80, 120, 5)).save(buf, format="JPEG", quality=95)
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.png").write_text("this is not an image\n")
    (root / "notes.txt").write_text("ignored: not an image extension\n")
    return root


def plain_folder(root: Path, count: int, size: tuple[int, int] = (64, 80)) -> Path:
    """``count`` same-size RGB PNGs named img_00.png, img_01.png, ..."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(_pattern(*size, seed=10 + i)).save(root / f"img_{i:02d}.png")
    return root


def rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_util

    enc = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(enc["size"]), "counts": enc["counts"].decode("ascii")}


def decode(segm: dict | list, h: int, w: int) -> np.ndarray:
    """(H, W) bool mask of an RLE (str counts) or polygon segmentation."""
    from pycocotools import mask as mask_util

    if isinstance(segm, list):
        segm = mask_util.merge(mask_util.frPyObjects(segm, h, w))
    return mask_util.decode(segm).astype(bool)


def bbox_of(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
            float(ys.max() - ys.min() + 1)]


def shapes_dataset(root: Path, num_images: int = 3, size: tuple[int, int] = (96, 128)) -> Path:
    """A COCO dataset with masks: per image a disc, a ring-free square and a triangle drawn
    with PIL in known places. Categories: disc (1), square (2, not a model class), triangle
    (3). Returns the JSON path; images are in ``root/images``."""
    h, w = size
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(num_images):
        canvas = Image.new("RGB", (w, h), (40, 40, 40))
        shapes = []
        layers = [
            (1, lambda d, o: d.ellipse([8 + o, 10, 48 + o, 50], fill=1)),
            (2, lambda d, o: d.rectangle([60, 12 + o, 100, 44 + o], fill=1)),
            (3, lambda d, o: d.polygon([(20 + o, 90), (50 + o, 56), (80 + o, 90)], fill=1)),
        ]
        for cat, draw_fn in layers:
            m = Image.new("L", (w, h), 0)
            draw_fn(ImageDraw.Draw(m), 4 * i)
            mask = np.asarray(m).astype(bool)
            colour = tuple(int(c) for c in np.random.default_rng(i * 7 + cat).integers(80, 255, 3))
            canvas.paste(colour, mask=Image.fromarray(mask.astype(np.uint8) * 255))
            shapes.append((cat, mask))
        name = f"shapes_{i}.png"
        canvas.save(root / "images" / name)
        images.append({"id": 100 + i, "file_name": name, "height": h, "width": w})
        for cat, mask in shapes:
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": cat,
                         "bbox": bbox_of(mask), "area": int(mask.sum()), "iscrowd": 0,
                         "segmentation": rle(mask)})
    categories = [{"id": 1, "name": "disc"}, {"id": 2, "name": "square"},
                  {"id": 3, "name": "triangle"}]
    path = root / "shapes.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": categories, "info": {"note": "kept"}}))
    return path



def cache_model_loads(monkeypatch) -> None:
    """Make ``Segmenter.load`` build each model once per test (CLI runs repeat it)."""
    from serving import Segmenter

    original = Segmenter.load.__func__
    cache: dict = {}

    def load(cls, path, device="auto", **overrides):
        key = (str(path), device, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = original(cls, path, device=device, **overrides)
        return cache[key]

    monkeypatch.setattr(Segmenter, "load", classmethod(load))


def one_torch_thread():
    """Generator for an autouse fixture: run torch on one thread, then restore the setting.
    The tiny model gains nothing from two threads, and on shared cores a second OpenMP
    thread makes each forward pass many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
