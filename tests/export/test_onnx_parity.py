"""ONNX Runtime vs PyTorch on images of two padded sizes, batch sizes 1 and 3, both graphs,
with the graphs of the default exporter (the session's ``python -m export``).

The graphs are exported once (traced at batch 2, 256x320) and run at other batches and sizes
here, as in torchvision's test_onnx: a size frozen into the graph would fail or differ.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.verify import compare_automatic, mask_iou
from serving import Segmenter

BOX_TOL, IOU_MIN, SCORE_TOL = 0.5, 0.99, 1e-4


@pytest.fixture(scope="module")
def segmenters(export_checkpoint, tiny_export):
    ref = Segmenter.from_checkpoint(export_checkpoint, device="cpu")
    ort = Segmenter.from_onnx(tiny_export.sidecar, device="cpu")
    return ref, ort


def prompts_for(image: np.ndarray) -> tuple[np.ndarray, list]:
    h, w = image.shape[:2]
    boxes = np.array([[w * 0.1, h * 0.1, w * 0.6, h * 0.5], [w * 0.4, h * 0.3, w, h],
                      [2, 3, 20, 15], [0, 0, w, h]], dtype=np.float32)
    return boxes, [0, None, "triangle", -1]


@pytest.mark.parametrize("group", ["small", "tall"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_automatic_parity(segmenters, test_images, group, batch_size):
    ref_seg, ort_seg = segmenters
    images = test_images[group]
    refs = ref_seg.predict_batch(images, batch_size=batch_size)
    gots = ort_seg.predict_batch(images, batch_size=batch_size)
    for ref, got in zip(refs, gots):
        assert len(ref) > 0 and len(ref) == len(got)
        np.testing.assert_array_equal(ref.labels, got.labels)
        np.testing.assert_allclose(got.boxes, ref.boxes, atol=BOX_TOL, rtol=0)
        np.testing.assert_allclose(got.scores, ref.scores, atol=SCORE_TOL, rtol=0)
        assert min(mask_iou(a, b) for a, b in zip(ref.masks, got.masks)) >= IOU_MIN
        matched, box_diff, iou, _ = compare_automatic(ref, got)
        assert matched == len(ref) and box_diff <= BOX_TOL and iou >= IOU_MIN


@pytest.mark.parametrize("group", ["small", "tall"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_prompt_parity(segmenters, test_images, group, batch_size):
    ref_seg, ort_seg = segmenters
    images = test_images[group]
    boxes = [prompts_for(im)[0][: 2 + i] for i, im in enumerate(images)]  # 2, 3, 4 boxes
    labels = [prompts_for(im)[1][: 2 + i] for i, im in enumerate(images)]
    refs = ref_seg.predict_batch(images, boxes=boxes, labels=labels, batch_size=batch_size)
    gots = ort_seg.predict_batch(images, boxes=boxes, labels=labels, batch_size=batch_size)
    for ref, got, bx in zip(refs, gots, boxes):
        assert len(got) == len(bx)
        np.testing.assert_array_equal(got.boxes, ref.boxes)  # the prompts, in order
        np.testing.assert_array_equal(got.labels, ref.labels)
        assert got.labels[0] == 0  # given labels are kept
        np.testing.assert_allclose(got.scores, ref.scores, atol=SCORE_TOL, rtol=0)
        assert min(mask_iou(a, b) for a, b in zip(ref.masks, got.masks)) >= IOU_MIN
        assert all(m.any() for m in got.masks[:2])


@pytest.mark.parametrize("prompted", [False, True])
def test_onnx_results_do_not_depend_on_batch_partners(segmenters, test_images, prompted):
    """Landscape and portrait images in one call give what each gives alone."""
    _, ort_seg = segmenters
    images = [test_images["small"][0], test_images["tall"][0], test_images["tall"][1]]
    boxes = [prompts_for(im)[0][:2] for im in images] if prompted else None
    alone = [ort_seg.predict(im, boxes=None if boxes is None else boxes[i])
             for i, im in enumerate(images)]
    together = ort_seg.predict_batch(images, boxes=boxes, batch_size=3)
    for a, b in zip(alone, together, strict=True):
        assert len(a) == len(b) > 0
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(a.masks, b.masks)
        np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-5)


def test_graph_outputs_match_eager_wrapper(export_checkpoint, tiny_export):
    """The raw ONNX outputs equal the export wrapper run in torch on its graph path (the
    fixed-shape code that was traced; padded layout, -1 labels)."""
    import onnxruntime as ort

    from export.wrapper import AutomaticGraph
    from serving.model.model_file import load_checkpoint

    model, info = load_checkpoint(export_checkpoint)
    graph = AutomaticGraph(model, info.inference).eval()
    images = torch.rand(3, 3, 128, 288, generator=torch.Generator().manual_seed(0)) * 255
    sizes = torch.tensor([[128, 288], [100, 250], [128, 200]])
    with torch.enable_grad():  # not eager inference: the traced path (NMS as the graph op)
        expected = [t.detach() for t in graph(images, sizes)]
    session = ort.InferenceSession(str(tiny_export.graphs["automatic"]),
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.numpy(), "image_sizes": sizes.numpy()})
    names = [o.name for o in session.get_outputs()]
    assert names == ["boxes", "scores", "labels", "masks", "num_detections"]
    for exp, out in zip(expected, got):
        np.testing.assert_allclose(out, exp.numpy(), atol=1e-4, rtol=0)
    num = got[4]
    assert got[0].shape == (3, 20, 4) and got[3].shape == (3, 20, 32, 72)
    for b in range(3):  # padding slots are empty
        assert (got[2][b, num[b]:] == -1).all() and (got[1][b, num[b]:] == 0).all()
