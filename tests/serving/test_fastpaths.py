"""The inference fast paths give exactly the results of the straightforward code they replace.

- ``DynamicMaskHead`` without autograd runs instances in chunks with in-place bias/ReLU: equal
  to the one-pass (autograd) computation, bit for bit.
- ``postprocess_masks`` skips the identity resize and thresholds before the aligned shift:
  equal to the reference pipeline (aligned x4 upsampling, crop, resize, threshold, clip).
- ``CondInst.forward(with_classes=False)`` (SIM's teacher) skips the class tower and leaves
  every other output unchanged.
"""

from __future__ import annotations

import pytest
import torch
from sim_testing import reference_postprocess_masks

from serving import ModelConfig, build_condinst
from serving.inference.postprocess import postprocess_masks
from serving.model.heads import DynamicMaskHead


@pytest.mark.parametrize("stride4, resized, orig", [
    ((8, 8), (30, 31), (30, 31)),      # same size: the shifted-threshold path
    ((8, 8), (32, 32), (32, 32)),      # resized fills the padded input
    ((8, 8), (30, 31), (61, 45)),      # upscale to the original
    ((8, 8), (30, 31), (12, 9)),       # downscale
    ((1, 1), (1, 1), (1, 1)),          # degenerate: fewer rows than the 2-pixel shift
    ((1, 1), (2, 3), (2, 3)),
    ((16, 24), (64, 90), (64, 90)),
])
@pytest.mark.parametrize("count", [0, 1, 5])
def test_postprocess_masks_equals_reference(stride4, resized, orig, count):
    gen = torch.Generator().manual_seed(count + 7 * stride4[0])
    probs = torch.rand((count, *stride4), generator=gen)
    probs[:, ::2] = 0.5  # values exactly at the threshold stay background
    h0, w0 = orig
    clip = torch.rand((count, 4), generator=gen) * torch.tensor([w0, h0, w0, h0]) * 0.6
    clip[:, 2:] += clip[:, :2] * 0.5 + 1.0
    for boxes in (None, clip):
        expected = reference_postprocess_masks(probs, resized, orig, 0.5, boxes)
        got = postprocess_masks(probs, resized, orig, 0.5, clip_boxes=boxes)
        assert got.dtype == torch.bool and got.shape == (count, h0, w0)
        assert torch.equal(got, expected)
        assert torch.equal(postprocess_masks(probs, resized, orig, 0.5, boxes, chunk=2), expected)


def test_postprocess_masks_threshold_is_strict_and_shift_replicates_edges():
    # one bright stride-4 pixel at the top-left corner: aligned upsampling replicates the
    # first interpolated row/column into output rows/columns 0-1.
    probs = torch.zeros(1, 4, 4)
    probs[0, 0, 0] = 1.0
    got = postprocess_masks(probs, (16, 16), (16, 16), 0.5)[0]
    expected = reference_postprocess_masks(probs, (16, 16), (16, 16), 0.5)[0]
    assert torch.equal(got, expected)
    assert got[0, 0] and got[1, 1] and got[2, 2] and not got[8, 8]
    assert not postprocess_masks(torch.full((1, 4, 4), 0.5), (16, 16), (16, 16), 0.5).any()


def _head_inputs(count: int, batch: int, size: tuple[int, int], seed: int):
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    feats = torch.randn((batch, 16, h, w), generator=gen)
    params = torch.randn((count, 233), generator=gen) * 0.5
    locations = torch.rand((count, 2), generator=gen) * torch.tensor([8.0 * w, 8.0 * h])
    levels = torch.randint(0, 5, (count,), generator=gen)
    image_index = torch.randint(0, batch, (count,), generator=gen)
    return feats, params, locations, levels, image_index


@pytest.mark.parametrize("count", [0, 1, 2, 7, 23])
@pytest.mark.parametrize("chunk_bytes", [1, 3 * 18 * 12 * 10 * 4, 1 << 30])
def test_mask_head_no_grad_chunks_equal_one_batched_pass(count, chunk_bytes):
    head = DynamicMaskHead()
    head.chunk_bytes = {"cpu": chunk_bytes}  # 1 byte: one instance per chunk
    args = _head_inputs(count, 2, (10, 12), seed=count)
    batched = head(*args)  # autograd enabled: the single batched pass
    with torch.no_grad():
        chunked = head(*args)
    with torch.inference_mode():
        inference = head(*args)
    assert chunked.shape == (count, 1, 20, 24)
    assert torch.equal(chunked, batched.detach())
    assert torch.equal(inference, batched.detach())


def test_mask_head_keeps_gradients_with_autograd():
    head = DynamicMaskHead()
    feats, params, locations, levels, index = _head_inputs(5, 1, (6, 6), seed=3)
    params.requires_grad_(True)
    feats.requires_grad_(True)
    head(feats, params, locations, levels, index).sum().backward()
    assert params.grad is not None and params.grad.abs().sum() > 0
    assert feats.grad is not None and feats.grad.abs().sum() > 0


def test_teacher_forward_without_classes_changes_nothing_else():
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="mobilenet_v2", num_classes=3, fpn_channels=32, head_convs=1,
                      mask_branch_channels=16, mask_branch_convs=1)
    model = build_condinst(cfg).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        full = model(x)
        lean = model(x, with_classes=False)
    assert lean.cls_logits.shape == (2, full.cls_logits.shape[1], 0)
    for name in full._fields:
        if name != "cls_logits":
            assert torch.equal(getattr(full, name), getattr(lean, name)), name


@pytest.mark.parametrize("batch, boxes_per_image", [(1, 4), (2, 3)])
def test_prompted_masks_skip_unused_slots_with_the_same_result(batch, boxes_per_image):
    """``segment_boxes`` in eager inference computes only the valid location slots of each
    box; with autograd it runs the fixed-shape graph path. Both give the same tensors."""
    from serving import InferenceConfig
    from serving.inference.postprocess import PROMPT_CHUNK_BYTES, segment_boxes

    torch.manual_seed(batch)
    cfg = ModelConfig(backbone="mobilenet_v2", num_classes=3, fpn_channels=16, head_convs=1,
                      mask_branch_channels=8, mask_branch_convs=1)
    model = build_condinst(cfg).eval()
    with torch.no_grad():
        out = model(torch.randn(batch, 3, 96, 128))
    out = out._replace(box_feats=out.box_feats * 30)  # distinct masks per location
    gen = torch.Generator().manual_seed(5)
    wh = torch.rand((batch, boxes_per_image, 2), generator=gen) * 60 + 2  # tiny to large
    xy = torch.rand((batch, boxes_per_image, 2), generator=gen) * (torch.tensor([128, 96]) - wh)
    boxes = torch.cat([xy, xy + wh], dim=-1)
    labels = torch.full((batch, boxes_per_image), -1)
    labels[0, 0] = 2
    icfg = InferenceConfig()
    graph_path = segment_boxes(model, out, boxes, labels, icfg)  # autograd on: fixed shapes
    saved = dict(PROMPT_CHUNK_BYTES)
    try:
        for budget in (1, 1 << 30):  # one box per chunk, and all boxes at once
            PROMPT_CHUNK_BYTES["cpu"] = budget
            with torch.inference_mode():
                eager = segment_boxes(model, out, boxes, labels, icfg)
            for a, b in zip(graph_path, eager, strict=True):
                assert torch.equal(a.detach(), b)
    finally:
        PROMPT_CHUNK_BYTES.update(saved)
    assert eager.mask_probs.shape == (batch, boxes_per_image, 24, 32)


@pytest.mark.parametrize("shapes, min_size, max_size", [
    ([(64, 96), (64, 96)], 64, 96),            # no resize: copied straight into the batch
    ([(100, 120), (64, 200), (33, 47)], 64, 256),  # resized, mixed sizes, padding
    ([(120, 160)], 128, 256),                  # upscale
    ([(1, 1)], 32, 32),
])
def test_preprocess_equals_resize_then_pad(shapes, min_size, max_size):
    import numpy as np

    from serving.inference.transforms import pad_batch, preprocess, resize_image, resized_shape

    rng = np.random.default_rng(len(shapes))
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    images.append(np.asfortranarray(images[0]))  # non-contiguous input
    sizes = [resized_shape(h, w, min_size, max_size) for h, w, _ in (i.shape for i in images)]
    expected, expected_valid = pad_batch([
        resize_image(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1), size)
        for img, size in zip(images, sizes)])
    batch, valid, got_sizes = preprocess(images, min_size, max_size)
    assert got_sizes == sizes
    assert batch.dtype == torch.float32 and torch.equal(batch, expected)
    assert torch.equal(valid, expected_valid)
