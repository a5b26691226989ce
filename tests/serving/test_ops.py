"""Known answers for the small tensor ops and the batched dynamic mask head.

The dynamic head is checked against the authors' grouped-convolution formulation written out
here from SIM_SPEC section 2.4; ``aligned_bilinear`` against an independent implementation of
its definition and hand-computed values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from serving.model.heads import DynamicMaskHead
from serving.model.ops import aligned_bilinear, box_iou_pairwise, compute_locations, decode_boxes

SOI = (64.0, 128.0, 256.0, 512.0, 1024.0)


def reference_aligned_bilinear(x: torch.Tensor, f: int) -> torch.Tensor:
    """SIM_SPEC 2.4 written independently: pad right/bottom by 1 (replicate), bilinear
    align_corners=True to (f*h+1, f*w+1), pad left/top by f//2 (replicate), crop."""
    if f == 1:
        return x.clone()
    n, c, h, w = x.shape
    padded = torch.cat([x, x[:, :, :, -1:]], dim=3)
    padded = torch.cat([padded, padded[:, :, -1:, :]], dim=2)  # (n, c, h+1, w+1)
    up = F.interpolate(padded, size=(f * h + 1, f * w + 1), mode="bilinear", align_corners=True)
    p = f // 2
    left = up[:, :, :, :1].expand(-1, -1, -1, p)
    up = torch.cat([left, up], dim=3)
    top = up[:, :, :1, :].expand(-1, -1, p, -1)
    up = torch.cat([top, up], dim=2)
    return up[:, :, : f * h, : f * w]


def test_aligned_bilinear_hand_computed_2x2():
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    # padded input is linear g(y, x) = x + 2y clamped at the last row/col; output index m
    # samples input coordinate max(m - 1, 0) / 2 for f = 2.
    expected = torch.tensor([[[[0.0, 0.0, 0.5, 1.0],
                               [0.0, 0.0, 0.5, 1.0],
                               [1.0, 1.0, 1.5, 2.0],
                               [2.0, 2.0, 2.5, 3.0]]]])
    out = aligned_bilinear(x, 2)
    assert out.shape == (1, 1, 4, 4)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_aligned_bilinear_matches_definition():
    gen = torch.Generator().manual_seed(0)
    for f, (h, w) in [(2, (5, 7)), (4, (3, 6)), (8, (2, 3)), (3, (4, 4))]:
        x = torch.randn(2, 3, h, w, generator=gen)
        out = aligned_bilinear(x, f)
        assert out.shape == (2, 3, f * h, f * w)
        torch.testing.assert_close(out, reference_aligned_bilinear(x, f), rtol=0, atol=1e-6)


def test_aligned_bilinear_factor_one_is_identity():
    x = torch.randn(1, 2, 5, 3)
    assert torch.equal(aligned_bilinear(x, 1), x)


def test_compute_locations_centres_row_major():
    loc = compute_locations(2, 3, 8, torch.device("cpu"))
    expected = torch.tensor([[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]],
                            dtype=torch.float32)
    assert torch.equal(loc, expected)
    loc16 = compute_locations(1, 2, 16, torch.device("cpu"))
    assert torch.equal(loc16, torch.tensor([[8.0, 8.0], [24.0, 8.0]]))


def test_decode_boxes_hand_made():
    locations = torch.tensor([[12.0, 20.0], [8.0, 8.0]])
    reg = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.0, 1.0, 2.0]])
    strides = torch.tensor([8.0, 16.0])
    boxes = decode_boxes(locations, reg, strides)
    expected = torch.tensor([[4.0, 4.0, 36.0, 52.0], [0.0, 8.0, 24.0, 40.0]])
    assert torch.equal(boxes, expected)
    # batched leading dims broadcast the same way
    batched = decode_boxes(locations[None].expand(3, -1, -1), reg[None].expand(3, -1, -1),
                           strides)
    assert torch.equal(batched, expected[None].expand(3, -1, -1))


def test_box_iou_pairwise_hand_computed():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[5.0, 0.0, 15.0, 10.0], [0.0, 0.0, 10.0, 10.0], [3.0, 3.0, 4.0, 4.0]])
    iou = box_iou_pairwise(a, b)
    torch.testing.assert_close(iou, torch.tensor([50.0 / 150.0, 1.0, 0.0]))


def reference_dynamic_head(mask_feats, params, locations, levels, image_index):
    """CondInst's grouped-convolution dynamic head (SIM_SPEC 2.4), for 3 layers of 8 ch."""
    n = params.shape[0]
    _, d, h, w = mask_feats.shape
    ys, xs = torch.meshgrid(torch.arange(h) * 8.0 + 4, torch.arange(w) * 8.0 + 4, indexing="ij")
    soi = torch.tensor(SOI)[levels]
    rel_x = (locations[:, 0, None, None] - xs[None]) / soi[:, None, None]
    rel_y = (locations[:, 1, None, None] - ys[None]) / soi[:, None, None]
    inputs = torch.cat([rel_x[:, None], rel_y[:, None], mask_feats[image_index]], dim=1)
    x = inputs.reshape(1, n * (d + 2), h, w)
    w0, w1, w2, b0, b1, b2 = torch.split(params, [(d + 2) * 8, 64, 8, 8, 8, 1], dim=1)
    weights = [w0.reshape(n * 8, d + 2, 1, 1), w1.reshape(n * 8, 8, 1, 1),
               w2.reshape(n, 8, 1, 1)]
    biases = [b0.reshape(n * 8), b1.reshape(n * 8), b2.reshape(n)]
    for i, (wt, bs) in enumerate(zip(weights, biases)):
        x = F.conv2d(x, wt, bs, groups=n)
        if i < 2:
            x = F.relu(x)
    return reference_aligned_bilinear(x.reshape(n, 1, h, w), 2)


def test_dynamic_head_equals_grouped_conv_reference():
    gen = torch.Generator().manual_seed(1)
    head = DynamicMaskHead(mask_channels=16, channels=8, num_layers=3)
    assert head.num_params == 233
    mask_feats = torch.randn(2, 16, 6, 10, generator=gen)
    n = 7
    params = torch.randn(n, 233, generator=gen) * 0.5
    locations = torch.rand(n, 2, generator=gen) * torch.tensor([80.0, 48.0])
    levels = torch.tensor([0, 1, 2, 3, 4, 0, 2])
    image_index = torch.tensor([0, 0, 1, 1, 0, 1, 1])
    out = head(mask_feats, params, locations, levels, image_index)
    assert out.shape == (n, 1, 12, 20)
    ref = reference_dynamic_head(mask_feats, params, locations, levels, image_index)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_dynamic_head_parameter_split_order():
    """[w0, w1, w2, b0, b1, b2]: with only b2 set, the logits are the constant b2."""
    head = DynamicMaskHead()
    params = torch.zeros(1, 233)
    params[0, 144 + 64 + 8 + 8 + 8] = 2.5  # b2 is the very last entry
    zero = torch.zeros(1, dtype=torch.long)
    out = head(torch.randn(1, 16, 2, 2), params, torch.zeros(1, 2), zero, zero)
    assert torch.allclose(out, torch.full((1, 1, 4, 4), 2.5))
    # b0 (entries 216..223) feeds through w1 = 0, so it has no effect
    params[0, 216:224] = 3.0
    out2 = head(torch.randn(1, 16, 2, 2), params, torch.zeros(1, 2),
                torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    assert torch.allclose(out2, out)
