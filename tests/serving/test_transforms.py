"""Test-time geometry: shortest-edge resize, padding to /32, box mapping (hand-computed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serving.errors import ImageError
from serving.inference.transforms import (
    canvas_size,
    pad_batch,
    preprocess,
    resize_image,
    resized_shape,
    scale_boxes,
    valid_pixels,
)


def test_resized_shape_detectron2_rule():
    assert resized_shape(480, 640, 800, 1333) == (800, 1067)
    assert resized_shape(100, 1000, 800, 1333) == (133, 1333)  # long side capped
    assert resized_shape(800, 800, 800, 1333) == (800, 800)
    assert resized_shape(120, 160, 128, 256) == (128, 171)


def test_resized_shape_refuses_extreme_aspect_ratios():
    """The shorter side must keep 8 px: up to about max_size / 8 (166:1 at 1333)."""
    assert resized_shape(8, 1333, 800, 1333) == (8, 1333)  # 166.6:1 -> 8 px
    assert resized_shape(8, 1400, 800, 1333) == (8, 1333)  # 7.6 px rounds to 8
    with pytest.raises(ImageError, match=r"image strip\.png: 1500x8 pixels has an aspect ratio "
                                         r"of 188:1, above this model's limit of 167:1"):
        resized_shape(8, 1500, 800, 1333, name="strip.png")  # 7.1 px rounds to 7
    with pytest.raises(ImageError, match="512:1"):
        resized_shape(20, 10240, 128, 256)  # the case: short side 0.5 -> 0 px


def test_canvas_and_valid_pixels():
    assert canvas_size(128, 171) == (128, 192) and canvas_size(64, 64) == (64, 64)
    images = torch.zeros(2, 3, 4, 5)
    valid = valid_pixels(images, torch.tensor([[2, 3], [4, 5]]))
    expected = torch.zeros(2, 4, 5, dtype=torch.bool)
    expected[0, :2, :3] = True
    expected[1] = True
    assert torch.equal(valid, expected)


def test_pad_batch_to_multiples_of_32():
    a = torch.ones(3, 50, 70)
    b = torch.full((3, 33, 64), 2.0)
    batch, valid = pad_batch([a, b])
    assert batch.shape == (2, 3, 64, 96) and valid.shape == (2, 64, 96)
    assert valid[0].sum() == 50 * 70 and valid[1].sum() == 33 * 64
    assert valid[0, :50, :70].all() and valid[1, :33, :64].all()
    assert batch[0, :, 50:].abs().sum() == 0 and batch[0, :, :, 70:].abs().sum() == 0
    assert torch.all(batch[1, :, :33, :64] == 2.0)


def test_resize_image_keeps_constant_images_constant():
    img = torch.full((3, 30, 40), 77, dtype=torch.uint8)
    out = resize_image(img, (45, 60))
    assert out.dtype == torch.float32 and out.shape == (3, 45, 60)
    torch.testing.assert_close(out, torch.full((3, 45, 60), 77.0))
    same = resize_image(img, (30, 40))
    assert torch.equal(same, img.float())


def test_preprocess_batch():
    imgs = [np.full((120, 160, 3), 200, np.uint8), np.full((60, 60, 3), 10, np.uint8)]
    batch, valid, sizes = preprocess(imgs, 128, 256)
    assert sizes == [(128, 171), (128, 128)]
    assert batch.shape == (2, 3, 128, 192) and batch.dtype == torch.float32
    torch.testing.assert_close(batch[0, :, :128, :171], torch.full((3, 128, 171), 200.0))
    assert batch[0, :, :, 171:].abs().sum() == 0
    assert valid[1].sum() == 128 * 128


def test_scale_boxes_round_trip():
    boxes = np.array([[10, 20, 30, 40]], np.float32)
    up = scale_boxes(boxes, (100, 200), (200, 300))
    assert up.dtype == np.float32
    assert up.tolist() == [[15, 40, 45, 80]]
    np.testing.assert_allclose(scale_boxes(up, (200, 300), (100, 200)), boxes)
    assert scale_boxes(np.zeros((0, 4)), (1, 1), (2, 2)).shape == (0, 4)


def test_resize_image_one_channel_at_a_time_equals_all_at_once():
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    for size, out in (((3, 300, 400), (100, 133)), ((3, 50, 60), (120, 144))):
        image = torch.randint(0, 256, size, generator=gen, dtype=torch.uint8)
        whole = F.interpolate(image.float()[None], size=out, mode="bilinear",
                              align_corners=False, antialias=True)[0].clamp_(0, 255)
        assert torch.equal(resize_image(image, out), whole)
