"""The CondInst network: backbone + FPN, FCOS head with controller, mask branch, dynamic head."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..model_config import STRIDES
from .backbone import BackboneFPN
from .heads import DynamicMaskHead, FCOSHead, MaskBranch
from .ops import compute_locations, patch_neighbours


class CondInstOutputs(NamedTuple):
    """Raw network outputs, identical in train and eval. N = locations over P3-P7 (row-major
    per level, levels concatenated in order P3..P7).

    Attributes:
        cls_logits: (B, N, C) class logits.
        box_reg: (B, N, 4) (l, t, r, b) distances in units of each location's stride (>= 0).
        ctrness: (B, N) centerness logits.
        box_feats: (B, C_fpn, N) box-tower features, the controller's input: the dynamic
            mask-head parameters of any locations are ``CondInst.controller_params``.
        neighbours: (N, 9) int64 3x3 neighbours of each location in ``box_feats``' last
            axis, -1 outside its level's map.
        mask_feats: (B, 16, H/8, W/8) mask features (stride 8).
        locations: (N, 2) (x, y) input-pixel coordinates of each location.
        strides: (N,) float stride of each location.
        levels: (N,) int64 pyramid level index (0 = P3 ... 4 = P7).
    """

    cls_logits: Tensor
    box_reg: Tensor
    ctrness: Tensor
    box_feats: Tensor
    neighbours: Tensor
    mask_feats: Tensor
    locations: Tensor
    strides: Tensor
    levels: Tensor


def _flatten_levels(per_level: list[Tensor]) -> Tensor:
    """[(B, K, h_l, w_l)] -> (B, sum_l h_l*w_l, K)."""
    return torch.cat([t.flatten(2) for t in per_level], dim=2).transpose(1, 2)


class CondInst(nn.Module):
    """CondInst (Tian et al.) as used by SIM. Build it with :func:`serving.build_condinst`.

    ``forward(images)`` takes a normalised float batch (B, 3, H, W) with H and W multiples of
    32 (see :meth:`normalize`) and returns :class:`CondInstOutputs`. It contains no losses and
    no post-processing; ``mask_head`` runs the dynamic head for any set of locations.
    """

    def __init__(self, *, backbone: BackboneFPN, head: FCOSHead, mask_branch: MaskBranch,
                 mask_head: DynamicMaskHead, pixel_mean: tuple[float, float, float],
                 pixel_std: tuple[float, float, float]) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.mask_branch = mask_branch
        self.dynamic_head = mask_head
        self.strides = STRIDES
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1),
                             persistent=False)

    @property
    def num_classes(self) -> int:
        return self.head.cls_logits.out_channels

    def normalize(self, images: Tensor, valid: Tensor | None = None) -> Tensor:
        """(B, 3, H, W) RGB 0-255 (uint8 or float) -> normalised float; padding set to 0.

        Args:
            images: padded batch, RGB in 0-255.
            valid: optional (B, H, W) bool, True on real pixels; padding becomes exactly 0
                after normalisation, as in detectron2 (normalise, then pad with zeros).
        """
        x = (images.float() - self.pixel_mean) / self.pixel_std
        if valid is not None:
            x = x * valid[:, None].to(x.dtype)
        return x

    def forward(self, images: Tensor, *, with_classes: bool = True) -> CondInstOutputs:
        """Run the network. ``with_classes=False`` skips the FCOS class tower and returns
        ``cls_logits`` with zero classes, (B, N, 0); every other output is unchanged (SIM's
        teacher needs only boxes, controllers and mask features)."""
        features = self.backbone(images)
        cls, reg, ctr, box_feats = self.head(features, with_classes=with_classes)
        if not with_classes:
            cls = [f.new_zeros((f.shape[0], 0, *f.shape[-2:])) for f in features]
        mask_feats = self.mask_branch(features[:3])
        locs, strides, levels, neighbours, offset = [], [], [], [], 0
        for level, (feat, stride) in enumerate(zip(features, self.strides)):
            h, w = feat.shape[-2:]
            neighbours.append(patch_neighbours(h, w, offset, feat.device))
            offset += h * w
            # Pixel coordinates need fp32 even under bf16/fp16 autocast (bf16 spacing is 8 px
            # at 1024-2048).
            loc = compute_locations(h, w, stride, feat.device,
                                    torch.promote_types(feat.dtype, torch.float32))
            locs.append(loc)
            strides.append(torch.full_like(loc[:, 0], float(stride)))
            levels.append(torch.full_like(loc[:, 0], level, dtype=torch.int64))
        return CondInstOutputs(
            cls_logits=_flatten_levels(cls),
            box_reg=_flatten_levels(reg),
            ctrness=_flatten_levels(ctr)[..., 0],
            box_feats=torch.cat([f.flatten(2) for f in box_feats], dim=2),
            neighbours=torch.cat(neighbours),
            mask_feats=mask_feats,
            locations=torch.cat(locs),
            strides=torch.cat(strides),
            levels=torch.cat(levels),
        )

    def controller_params(self, outputs: CondInstOutputs, image: Tensor,
                          location: Tensor) -> Tensor:
        """Dynamic mask-head parameters (..., num_params) of the locations ``location`` (...)
        of images ``image`` (...), int64 index tensors of one shape; see
        :meth:`FCOSHead.controller_at`."""
        return self.head.controller_at(outputs.box_feats, outputs.neighbours, image, location)

    def mask_head(self, mask_feats: Tensor, params: Tensor, locations: Tensor, levels: Tensor,
                  image_index: Tensor) -> Tensor:
        """Mask logits (P, 1, H/4, W/4) for P instances; see :class:`DynamicMaskHead`."""
        return self.dynamic_head(mask_feats, params, locations, levels, image_index)
