"""The export wrapper is the library's own post-processing and nothing else."""

from __future__ import annotations

import inspect

import torch

import export
from export.wrapper import AutomaticGraph, PromptGraph
from serving.inference.postprocess import detect, segment_boxes
from serving.inference.transforms import valid_pixels
from serving.model.model_file import load_checkpoint


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, 128, 256, generator=gen) * 255
    sizes = torch.tensor([[128, 250], [96, 256]])
    return images, sizes


def test_automatic_graph_is_detect(tiny_checkpoint):
    model, info = load_checkpoint(tiny_checkpoint)
    images, sizes = _batch()
    with torch.no_grad():
        got = AutomaticGraph(model, info.inference)(images, sizes)
        out = model(model.normalize(images, valid_pixels(images, sizes)))
        ref = detect(model, out, sizes, info.inference)
    assert len(got) == 5 and got[0].shape == (2, 20, 4) and got[3].shape == (2, 20, 32, 64)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_prompt_graph_is_segment_boxes(tiny_checkpoint):
    model, info = load_checkpoint(tiny_checkpoint)
    images, sizes = _batch(2)
    boxes = torch.tensor([[[10.0, 10, 100, 90], [50, 20, 240, 120]],
                          [[0.0, 0, 30, 30], [5, 40, 200, 95]]])
    labels = torch.tensor([[1, -1], [-1, 2]])
    with torch.no_grad():
        masks, scores, out_labels = PromptGraph(model, info.inference)(images, sizes, boxes,
                                                                        labels)
        out = model(model.normalize(images, valid_pixels(images, sizes)))
        ref = segment_boxes(model, out, boxes, labels, info.inference)
    torch.testing.assert_close(masks, ref.mask_probs, atol=0, rtol=0)
    torch.testing.assert_close(scores, ref.scores, atol=0, rtol=0)
    assert out_labels[0, 0] == 1 and out_labels[1, 1] == 2


def test_no_second_post_processing_in_export():
    """export/ holds no candidate selection, top-K or NMS of its own: only the ONNX form of
    the library's NMS operator (box IoU for matching detections in verification is fine)."""
    from pathlib import Path

    root = Path(inspect.getfile(export)).parent
    for path in root.glob("*.py"):
        code = path.read_text()
        for word in ("topk(", "batched_nms", "import nms", "ops.nms", "level_topk",
                     "decode_boxes("):
            assert word not in code, f"{path.name} uses {word}"
