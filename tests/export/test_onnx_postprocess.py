"""ONNX Runtime (fp32 and INT8 graphs) through the fast pre- and post-processing gives the
predictions of the straightforward pipeline, bit for bit: the one post-processing of every
backend, on images that are resized and not, alone and in a batch, automatic and prompted."""

from __future__ import annotations

import numpy as np
import pytest
from sim_testing import assert_same_predictions, use_reference_pipeline

from serving import Segmenter


@pytest.mark.parametrize("which", ["tiny_export", "int8_export"])
def test_onnx_predictions_equal_the_straightforward_pipeline(which, request, test_images,
                                                             monkeypatch) -> None:
    seg = Segmenter.from_onnx(request.getfixturevalue(which).sidecar, device="cpu")
    # the last image is already at the input size (128 short side): not resized
    images = test_images["small"] + [np.ascontiguousarray(test_images["tall"][1][:128, :200])]
    boxes = [[5, 5, 90, 80], [40.5, 20.2, 150.7, 110.1]]

    def run():
        return [*seg.predict_batch(images, batch_size=2),
                *seg.predict_batch(images[:1] + images[-1:], boxes=[boxes, boxes[:1]])]

    new = run()
    use_reference_pipeline(monkeypatch)
    old = run()
    for a, b in zip(new, old, strict=True):
        assert_same_predictions(a, b)
    assert sum(len(p) for p in new[:4]) > 0 and new[4].masks.any()
