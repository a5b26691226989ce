"""A static-shape export (fixed batch and canvas): batches are split/filled and images padded
to the exported size; results equal PyTorch run on the same canvas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export import export_onnx, verify_export
from serving import Segmenter
from serving.backends.exported import StaticShapeBackend
from serving.errors import InputError


@pytest.fixture(scope="module")
def static_export(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("static")
    return export_onnx(tiny_checkpoint, out, dynamic=False, image_size=(256, 256),
                       batch_size=2)


@pytest.mark.slow
def test_static_export_matches_pytorch_on_the_same_canvas(tiny_checkpoint, static_export,
                                                          test_images):
    seg = Segmenter.from_onnx(static_export.sidecar, device="cpu")
    assert isinstance(seg.backend, StaticShapeBackend)
    assert (seg.backend.batch, seg.backend.height, seg.backend.width) == (2, 256, 256)
    images = test_images["small"]  # 3 images: one full batch of 2, one filled up
    report = verify_export(tiny_checkpoint, seg, images)
    assert report.passed, report.table()
    preds = seg.predict_batch(images, batch_size=3)
    assert [len(p) for p in preds] == [20, 20, 20]
    boxes = [np.array([[5, 5, 60, 50], [30, 20, 150, 110]], np.float32)] * 3
    prompted = seg.predict_batch(images, boxes=boxes, batch_size=3)
    assert [len(p) for p in prompted] == [2, 2, 2]


def test_images_larger_than_the_static_canvas_are_refused(tiny_checkpoint):
    torch_seg = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu")
    static = StaticShapeBackend(torch_seg.backend, batch=1, height=128, width=128)
    with pytest.raises(InputError, match="256x128 exceeds the static export size 128x128"):
        static.detect(torch.zeros(1, 3, 256, 128), [(256, 100)])
