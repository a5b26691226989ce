"""COCO dataset: box mode never reads masks, crowd/empty handling, mapping, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from serving.errors import DatasetError, ImageError
from training.data.augment import ResizeShortestEdge
from training.data.coco_dataset import CocoInstanceDataset, load_coco_boxes

mask_utils = pytest.importorskip("pycocotools.mask")


def _write_images(folder: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (h, w) in sizes.items():
        Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(folder / name)
    return folder


def _coco(**overrides: Any) -> dict[str, Any]:
    """Two images (40x60, 30x20), categories 3/7/1, annotations without segmentation."""
    data = {
        "images": [{"id": 10, "file_name": "a.png", "height": 40, "width": 60},
                   {"id": 11, "file_name": "b.png", "height": 30, "width": 20}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [5, 6, 10, 12]},
            {"id": 2, "image_id": 10, "category_id": 1, "bbox": [50, 30, 20, 20]},  # clipped
            {"id": 3, "image_id": 10, "category_id": 3, "bbox": [1, 1, 4, 4], "iscrowd": 1},
            {"id": 4, "image_id": 11, "category_id": 3, "bbox": [25, 5, 5, 5]},  # outside
        ],
        "categories": [{"id": 3, "name": "c3"}, {"id": 7, "name": "c7"},
                       {"id": 1, "name": "c1"}],
    }
    data.update(overrides)
    return data


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    return _write_images(tmp_path / "img", {"a.png": (40, 60), "b.png": (30, 20)})


def _write_json(tmp_path: Path, data: Any, name: str = "ann.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


class NoSegmentation(dict):
    """An annotation dict that fails the test on any access of 'segmentation'."""

    def _check(self, key: object) -> None:
        if key == "segmentation":
            raise AssertionError("box mode accessed 'segmentation'")

    def __getitem__(self, key: object) -> Any:
        self._check(key)
        return super().__getitem__(key)

    def get(self, key: object, default: Any = None) -> Any:
        self._check(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self._check(key)
        return super().__contains__(key)

    def items(self):  # type: ignore[override]
        raise AssertionError("box mode iterated over annotation values")

    def values(self):  # type: ignore[override]
        raise AssertionError("box mode iterated over annotation values")


def test_box_mode_without_segmentation_field(tmp_path: Path, images: Path) -> None:
    ds = CocoInstanceDataset(_write_json(tmp_path, _coco()), images, mode="box")
    assert len(ds) == 1 and ds.num_skipped_images == 1
    assert (ds.num_crowd, ds.num_dropped_boxes) == (1, 1)
    s = ds[0]
    assert s["image"].dtype == torch.uint8 and s["image"].shape == (3, 40, 60)
    assert s["boxes"].dtype == torch.float32 and s["labels"].dtype == torch.int64
    # XYXY, second box clipped to the 60x40 image; labels: ids sorted 1,3,7 -> 0,1,2
    assert s["boxes"].tolist() == [[5, 6, 15, 18], [50, 30, 60, 40]]
    assert s["labels"].tolist() == [2, 0]
    assert "masks" not in s
    assert (s["image_id"], s["orig_size"], s["image_size"]) == (10, (40, 60), (40, 60))


def test_box_mode_never_touches_segmentation(images: Path) -> None:
    data = _coco()
    data["annotations"] = [NoSegmentation(a, segmentation=[[0, 0, 1, 0, 1, 1]])
                           for a in data["annotations"]]
    ds = CocoInstanceDataset(data, images, mode="box")
    assert ds[0]["boxes"].shape == (2, 4)
    boxes = load_coco_boxes(data)
    assert boxes[10][1].tolist() == [7, 1] and boxes[11][0].shape == (0, 4)
    with pytest.raises(AssertionError, match="segmentation"):
        CocoInstanceDataset(data, images, mode="mask")  # the guard itself works


def test_category_mapping_round_trip(tmp_path: Path, images: Path) -> None:
    ds = CocoInstanceDataset(_write_json(tmp_path, _coco()), images)
    assert ds.label_to_category_id == [1, 3, 7] and ds.class_names == ["c1", "c3", "c7"]
    assert ds.category_id_to_label == {1: 0, 3: 1, 7: 2} and ds.num_classes == 3
    for c in (1, 3, 7):
        assert ds.label_to_category_id[ds.category_id_to_label[c]] == c
    assert [ds.label_to_category_id[i] for i in ds[0]["labels"]] == [7, 1]


def test_empty_images_kept_for_evaluation(tmp_path: Path, images: Path) -> None:
    ds = CocoInstanceDataset(_write_json(tmp_path, _coco()), images, skip_empty=False)
    assert len(ds) == 2 and ds.num_skipped_images == 0
    s = ds[1]
    assert s["boxes"].shape == (0, 4) and s["labels"].shape == (0,)


def test_mask_mode_decodes_rle_uncompressed_rle_and_polygons(tmp_path: Path) -> None:
    images = _write_images(tmp_path / "img", {"a.png": (12, 16)})
    m = np.zeros((12, 16), np.uint8)
    m[2:5, 3:9] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode("ascii")
    flat = m.flatten(order="F")  # uncompressed RLE: run lengths in column-major order
    edges = np.flatnonzero(np.diff(np.r_[0, flat, 0]))
    counts = np.diff(np.r_[0, edges, flat.size]).tolist()
    polygon = [[10.0, 6.0, 15.0, 6.0, 15.0, 11.0, 10.0, 11.0]]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [3, 2, 6, 3], "segmentation": rle},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [3, 2, 6, 3],
             "segmentation": {"size": [12, 16], "counts": counts}},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [10, 6, 5, 5],
             "segmentation": polygon}]
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 12, "width": 16}],
            "annotations": anns, "categories": [{"id": 1, "name": "x"}]}
    masks = CocoInstanceDataset(data, images, mode="mask")[0]["masks"]
    assert masks.dtype == torch.bool and masks.shape == (3, 12, 16)
    assert np.array_equal(masks[0].numpy(), m.astype(bool))
    assert np.array_equal(masks[1].numpy(), m.astype(bool))
    reference = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygon, 12, 16)))
    assert np.array_equal(masks[2].numpy(), reference.astype(bool)) and reference.sum() > 0


def test_mask_mode_on_synthetic_masks_inside_boxes(tmp_path: Path) -> None:
    from training.data.synthetic import generate_dataset

    paths = generate_dataset(tmp_path / "syn", 3, seed=0, size=96, val_fraction=0.0)
    ds = CocoInstanceDataset(paths["train"], paths["images"], mode="mask",
                             transform=lambda s, rng=None: ResizeShortestEdge([48], 1000)(s))
    s = ds[0]
    assert s["image"].shape == (3, 48, 48) and s["masks"].shape[1:] == (48, 48)
    assert s["orig_size"] == (96, 96) and s["image_size"] == (48, 48)
    raw = CocoInstanceDataset(paths["train"], paths["images"], mode="mask")[0]
    for box, mask in zip(raw["boxes"], raw["masks"], strict=True):
        ys, xs = np.nonzero(mask.numpy())
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def _bad(tmp_path: Path, case: str) -> Path:
    data = _coco()
    if case == "missing":
        return tmp_path / "nope.json"
    if case == "malformed":
        path = tmp_path / "ann.json"
        path.write_text('{"images": [],\n  "annotations": [,]}')
        return path
    if case == "no_categories":
        del data["categories"]
    elif case in ("bbox", "image_id", "category_id"):
        del data["annotations"][0][case]
    elif case == "unknown_category":
        data["annotations"][0]["category_id"] = 99
    elif case == "unknown_image":
        data["annotations"][0]["image_id"] = 99
    elif case == "bad_bbox":
        data["annotations"][0]["bbox"] = [1, 2, "x", 4]
    return _write_json(tmp_path, data)


@pytest.mark.parametrize("case,pattern", [
    ("missing", "not found"),
    ("malformed", "malformed JSON at line 2 column"),
    ("no_categories", "missing top-level key.*categories"),
    ("bbox", "annotation 1 has no 'bbox'"),
    ("image_id", "annotation 1 has no 'image_id'"),
    ("category_id", "annotation 1 has no 'category_id'"),
    ("unknown_category", "annotation 1 has unknown category id 99"),
    ("unknown_image", "annotation 1 references unknown image id 99"),
    ("bad_bbox", "annotation 1 bbox"),
])
def test_bad_input_names_the_file(tmp_path: Path, images: Path, case: str, pattern: str) -> None:
    path = _bad(tmp_path, case)
    with pytest.raises(DatasetError, match=pattern) as info:
        CocoInstanceDataset(path, images)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_no_usable_box_and_missing_folder(tmp_path: Path, images: Path) -> None:
    only_crowd = _coco(annotations=[{"id": 5, "image_id": 10, "category_id": 1,
                                     "bbox": [1, 1, 2, 2], "iscrowd": 1}])
    with pytest.raises(DatasetError, match="no image has a usable box"):
        CocoInstanceDataset(_write_json(tmp_path, only_crowd), images)
    with pytest.raises(DatasetError, match="image folder"):
        CocoInstanceDataset(_write_json(tmp_path, _coco()), tmp_path / "missing")


def test_unreadable_or_mismatched_image(tmp_path: Path, images: Path) -> None:
    ds = CocoInstanceDataset(_write_json(tmp_path, _coco()), images)
    (images / "a.png").write_bytes(b"this is not a png")
    with pytest.raises(ImageError, match="a.png"):
        ds[0]
    _write_images(images, {"a.png": (41, 60)})
    with pytest.raises(DatasetError, match="a.png.*differs"):
        ds[0]
