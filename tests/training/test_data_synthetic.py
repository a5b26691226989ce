"""Synthetic dataset: determinism, class design, mask/bbox consistency, COCO compatibility."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.errors import InputError
from training.data.synthetic import (
    BACKGROUND_PALETTE,
    CLASSES,
    PALETTE,
    generate_dataset,
    generate_image,
    main,
)

pycocotools = pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402


@pytest.fixture(scope="module")
def dataset50(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return generate_dataset(tmp_path_factory.mktemp("syn50"), 50, seed=3, size=320)


def _annotations(paths: dict[str, Path]) -> tuple[list[dict], list[dict], list[dict]]:
    train = json.loads(paths["train"].read_text())
    val = json.loads(paths["val"].read_text())
    return (train["images"] + val["images"], train["annotations"] + val["annotations"],
            train["categories"])


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_same_seed_identical_bytes_different_seed_differs(tmp_path: Path) -> None:
    a = _files(generate_dataset(tmp_path / "a", 6, seed=11, size=128)["root"])
    b = _files(generate_dataset(tmp_path / "b", 6, seed=11, size=128)["root"])
    c = _files(generate_dataset(tmp_path / "c", 6, seed=12, size=128)["root"])
    assert a == b
    assert set(a) == set(c)
    assert a["train.json"] != c["train.json"]
    assert all(a[k] != c[k] for k in a if k.endswith(".png"))


def test_image_i_depends_only_on_seed_and_index() -> None:
    img_a, inst_a = generate_image(5, 2, 128)
    img_b, inst_b = generate_image(5, 2, 128)
    assert np.array_equal(img_a, img_b)
    assert [c for c, _ in inst_a] == [c for c, _ in inst_b]
    assert all(np.array_equal(m, n) for (_, m), (_, n) in zip(inst_a, inst_b, strict=True))
    assert img_a.shape == (128, 128, 3) and img_a.dtype == np.uint8


def test_split_and_files(dataset50: dict[str, Path]) -> None:
    train = json.loads(dataset50["train"].read_text())
    val = json.loads(dataset50["val"].read_text())
    assert (len(train["images"]), len(val["images"])) == (40, 10)
    ids = [im["id"] for im in train["images"] + val["images"]]
    assert sorted(ids) == list(range(1, 51))
    ann_ids = [a["id"] for a in train["annotations"] + val["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)
    im = train["images"][0]
    with Image.open(dataset50["images"] / im["file_name"]) as pil:
        assert pil.mode == "RGB" and pil.size == (im["width"], im["height"]) == (320, 320)


def test_at_least_five_classes_all_present(dataset50: dict[str, Path]) -> None:
    _, anns, cats = _annotations(dataset50)
    assert [c["id"] for c in cats] == list(range(1, len(CLASSES) + 1))
    assert len(cats) >= 5
    assert {a["category_id"] for a in anns} == {c["id"] for c in cats}


def test_bbox_is_tight_box_of_visible_mask(dataset50: dict[str, Path]) -> None:
    images, anns, _ = _annotations(dataset50)
    by_image: dict[int, np.ndarray] = {im["id"]: np.zeros((320, 320), np.int32) for im in images}
    for a in anns:
        m = mask_utils.decode(a["segmentation"]).astype(bool)
        ys, xs = np.nonzero(m)
        x, y, w, h = a["bbox"]
        assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                ys.max() - ys.min() + 1)
        assert list(mask_utils.toBbox(a["segmentation"])) == [x, y, w, h]
        assert a["area"] == m.sum() >= 16 and a["iscrowd"] == 0
        assert isinstance(a["segmentation"]["counts"], str)
        by_image[a["image_id"]] += m
    # visible masks of one image never overlap: occluded parts are not annotated
    assert max(int(v.max()) for v in by_image.values()) == 1


def test_overlaps_same_class_and_size_range(dataset50: dict[str, Path]) -> None:
    _, anns, _ = _annotations(dataset50)
    same_class_overlaps = 0
    for i, a in enumerate(anns):
        for b in anns[i + 1:]:
            if a["image_id"] != b["image_id"] or a["category_id"] != b["category_id"]:
                continue
            ax, ay, aw, ah = a["bbox"]
            bx, by, bw, bh = b["bbox"]
            if min(ax + aw, bx + bw) > max(ax, bx) and min(ay + ah, by + bh) > max(ay, by):
                same_class_overlaps += 1
    assert same_class_overlaps >= 5
    sides = [max(a["bbox"][2:]) for a in anns]
    assert min(sides) <= 16 and max(sides) >= 0.3 * 320
    per_image = np.bincount([a["image_id"] for a in anns])[1:]
    assert per_image.max() <= 8


def test_colour_alone_does_not_separate_objects(dataset50: dict[str, Path]) -> None:
    """Every palette colour covers both object pixels and background pixels."""
    images, anns, _ = _annotations(dataset50)
    palette = PALETTE.astype(np.int32)
    inside = np.zeros(len(palette), np.int64)
    outside = np.zeros(len(palette), np.int64)
    for im in images[:15]:
        pixels = np.asarray(Image.open(dataset50["images"] / im["file_name"]), np.int32)
        nearest = np.argmin(((pixels[:, :, None, :] - palette) ** 2).sum(-1), axis=-1)
        objects = np.zeros(nearest.shape, bool)
        for a in anns:
            if a["image_id"] == im["id"]:
                objects |= mask_utils.decode(a["segmentation"]).astype(bool)
        inside += np.bincount(nearest[objects], minlength=len(palette))
        outside += np.bincount(nearest[~objects], minlength=len(palette))
    assert (inside > 100).all() and (outside > 100).all()


def test_pycocotools_loads_and_gt_as_results_scores_ap_1(dataset50: dict[str, Path]) -> None:
    gt = COCO(str(dataset50["val"]))
    results = [{"image_id": a["image_id"], "category_id": a["category_id"],
                "segmentation": copy.deepcopy(a["segmentation"]), "score": 1.0}
               for a in gt.dataset["annotations"]]
    dt = gt.loadRes(results)
    for iou_type in ("segm", "bbox"):
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert ev.stats[0] == pytest.approx(1.0)


def test_cli_prints_summary_and_rejects_bad_options(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    main(["--out", str(tmp_path / "cli"), "--images", "3", "--seed", "1", "--size", "96"])
    line = capsys.readouterr().out.strip()
    assert line.startswith("synthetic: 3 images") and "instances" in line and "disc" in line
    assert (tmp_path / "cli" / "images" / "000002.png").is_file()
    with pytest.raises(InputError, match="--images"):
        generate_dataset(tmp_path / "bad", 0, seed=0)
    with pytest.raises(SystemExit, match="error: --val-fraction"):
        main(["--out", str(tmp_path / "bad"), "--images", "2", "--val-fraction", "1.5"])


def _nearest_palette(pixels: np.ndarray) -> np.ndarray:
    """For (N, 3) uint8 pixels: True where the nearest colour of PALETTE + BACKGROUND_PALETTE is
    an object (PALETTE) colour."""
    colours = np.concatenate([PALETTE, BACKGROUND_PALETTE]).astype(np.float32)
    d = ((pixels[:, None, :].astype(np.float32) - colours[None]) ** 2).sum(-1)
    return d.argmin(1) < len(PALETTE)


def test_distinct_background_changes_only_the_clutter() -> None:
    """The diagnostic variant: same instances and same object pixels (the random stream is
    consumed identically); every background pixel is nearest to a background colour, while in the
    default data a good part of the background wears object colours."""
    for index in range(4):
        img_s, inst_s = generate_image(7, index, 160)
        img_d, inst_d = generate_image(7, index, 160, background="distinct")
        assert [c for c, _ in inst_s] == [c for c, _ in inst_d]
        assert all(np.array_equal(m, n) for (_, m), (_, n) in zip(inst_s, inst_d, strict=True))
        objects = np.zeros(img_s.shape[:2], dtype=bool)
        for _, m in inst_s:
            objects |= m
        # Occluded object parts are not annotated, so compare annotated pixels only.
        assert np.array_equal(img_s[objects], img_d[objects])
        background = ~objects
        # Object pixels that failed the visibility filter are drawn but unannotated: allow a few.
        assert _nearest_palette(img_d[background]).mean() < 0.02
        assert _nearest_palette(img_s[background]).mean() > 0.95


def test_background_option_is_validated_and_recorded(tmp_path: Path) -> None:
    paths = generate_dataset(tmp_path / "d", 2, seed=0, size=96, background="distinct")
    assert json.loads(paths["train"].read_text())["info"]["background"] == "distinct"
    with pytest.raises(InputError, match="--background 'plain': use one of shared, distinct"):
        generate_dataset(tmp_path / "bad", 2, seed=0, background="plain")
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "bad"), "--images", "2", "--background", "plain"])
