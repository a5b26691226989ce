"""The quality benchmark's M_S diagnostic: the AUC and the separability of known features."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from torch import nn

from benchmarks.sim_figure import auc, feature_separability, semantic_separability
from training.train_config import TrainConfig


def _brute_auc(pos: list[float], neg: list[float]) -> float:
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_known_values_and_ties() -> None:
    assert auc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auc(torch.tensor([1.0]), torch.tensor([2.0])) == 0.0
    assert auc(torch.tensor([1.0, 1.0]), torch.tensor([1.0])) == 0.5
    gen = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 6, (37,), generator=gen).float()  # many ties
    neg = torch.randint(0, 5, (23,), generator=gen).float()
    assert auc(pos, neg) == pytest.approx(_brute_auc(pos.tolist(), neg.tolist()))


class _ColourTeacher(nn.Module):
    """Mask features = the image's red and blue channels, average-pooled to stride 8."""

    def normalize(self, images: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return images.float() / 255.0

    def forward(self, x: torch.Tensor, with_classes: bool = True) -> SimpleNamespace:
        pooled = F.avg_pool2d(x, 8)  # (B, 3, H/8, W/8)
        feats = torch.zeros(x.shape[0], 16, *pooled.shape[-2:])
        feats[:, 0], feats[:, 1] = pooled[:, 0], pooled[:, 2]
        return SimpleNamespace(mask_feats=feats)


def _red_discs_on_blue(root: Path) -> TrainConfig:
    """Two 128x128 images, each a red disc on blue; one class; COCO JSON with RLE masks."""
    images, anns = [], []
    yy, xx = np.mgrid[:128, :128]
    for i, (cx, cy, r) in enumerate([(50, 60, 30), (70, 64, 40)]):
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        rgb = np.zeros((128, 128, 3), np.uint8)
        rgb[..., 2] = 255
        rgb[disc] = (255, 0, 0)
        Image.fromarray(rgb).save(root / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": 128, "width": 128})
        rle = mask_utils.encode(np.asfortranarray(disc.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode()
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                     "bbox": [cx - r, cy - r, 2 * r + 1, 2 * r + 1], "area": int(disc.sum()),
                     "segmentation": rle})
    (root / "val.json").write_text(json.dumps({
        "images": images, "annotations": anns, "categories": [{"id": 1, "name": "disc"}]}))
    cfg = TrainConfig()
    cfg.data.val_json, cfg.data.val_images = str(root / "val.json"), str(root)
    cfg.inference.min_size = cfg.inference.max_size = 128
    return cfg


@pytest.mark.parametrize(("prototype", "expected"), [(0, 1.0), (1, 0.0)])
def test_separability_of_features_that_are_the_colour(tmp_path: Path, prototype: int,
                                                      expected: float) -> None:
    cfg = _red_discs_on_blue(tmp_path)
    protos = torch.zeros(1, 10, 16)
    protos[0, :, prototype] = 1.0  # every prototype "red" (object) or "blue" (background)
    sim = SimpleNamespace(teacher=SimpleNamespace(module=_ColourTeacher()),
                          prototypes=SimpleNamespace(prototypes=protos))
    sep = semantic_separability(sim, cfg)
    assert sep["instances"] == 2
    # Features are the red/blue mix of each pixel's neighbourhood: object pixels are redder
    # than every background pixel of the box, up to the blurred rim.
    assert sep["prototypes"] == pytest.approx(expected, abs=0.03)
    assert sep["oracle_class"] > 0.97 and sep["oracle_instance"] > 0.97


def test_feature_separability_without_prototypes_gives_the_oracles(tmp_path: Path) -> None:
    """Any model's features (here BoxInst's or a fully supervised model's stand-in): the oracle
    AUCs only, equal to those of the SIM path on the same features."""
    cfg = _red_discs_on_blue(tmp_path)
    sep = feature_separability(_ColourTeacher(), cfg)
    assert "prototypes" not in sep and sep["instances"] == 2
    with_protos = feature_separability(_ColourTeacher(), cfg, torch.ones(1, 10, 16))
    assert sep["oracle_class"] == with_protos["oracle_class"] > 0.97
    assert sep["oracle_instance"] == with_protos["oracle_instance"] > 0.97
