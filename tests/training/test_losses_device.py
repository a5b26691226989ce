"""CPU/CUDA parity of the losses (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from training.losses import (
    bce_dice_loss,
    boxes_to_bitmasks,
    fcos_losses,
    image_color_similarity,
    pairwise_loss,
    projection_loss,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _all_losses(device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 32, 32), generator=g, dtype=torch.uint8)
    valid = torch.ones(2, 32, 32, dtype=torch.bool)
    valid[1, 20:] = False
    boxes = torch.tensor([[2.5, 3.0, 20.0, 25.7], [8.0, 1.0, 30.0, 12.0]])
    logits = torch.randn(2, 1, 8, 8, generator=g)
    reg = torch.rand(6, 4, generator=g) * 4 + 0.5
    cls = torch.randn(6, 3, generator=g)
    labels = torch.tensor([0, 2, -1, -1, 1, -1])
    to = {"device": device}
    sim = image_color_similarity(images.to(**to), valid.to(**to))
    _, box_masks = boxes_to_bitmasks(boxes.to(**to), 32, 32)
    out = fcos_losses(
        cls.to(**to),
        reg.flip(1).to(**to),
        cls[:, 0].to(**to),
        labels.to(**to),
        reg.to(**to),
        num_pos_avg=3.0,
    )
    out["sim"] = sim
    out["proj"] = projection_loss(logits.to(**to), box_masks)
    out["pair"] = pairwise_loss(logits.to(**to), sim, box_masks, 1e-3)
    out["bce_dice"] = bce_dice_loss(logits.to(**to), box_masks, box_masks)
    return out


def test_cuda_matches_cpu() -> None:
    cpu = _all_losses(torch.device("cpu"))
    cuda = _all_losses(torch.device("cuda"))
    for name, value in cpu.items():
        assert cuda[name].device.type == "cuda", name
        torch.testing.assert_close(cuda[name].cpu(), value, atol=1e-4, rtol=1e-4, msg=name)
