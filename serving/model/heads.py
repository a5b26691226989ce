"""FCOS head with the CondInst controller, the mask branch and the dynamic mask head.

Shapes follow SIM_SPEC sections 2.2-2.4. The dynamic 1x1 convolutions are written as batched
matrix products (``torch.bmm``), which export to ONNX ``MatMul`` and run in TensorRT, instead
of the authors' grouped convolution with runtime weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import aligned_bilinear, eager_no_grad


class Scale(nn.Module):
    """A learnable scalar multiplier (FCOS per-level box scale, initialised to 1)."""

    def __init__(self, init: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class _GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` without torch's "more than 1 value per channel" check.

    With one channel per group (``fpn_channels <= 32``) a single image whose P7 is 1x1 (padded
    input <= 128 px) has one value per group; the normalisation is still well defined (it
    returns about the bias) but ``F.group_norm`` raises. Same parameters and state-dict keys.
    """

    def forward(self, x: Tensor) -> Tensor:
        return torch.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def _tower(channels: int, num_convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        conv = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.normal_(conv.weight, std=0.01)
        nn.init.zeros_(conv.bias)
        layers += [conv, _GroupNorm(min(32, channels), channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _pred_conv(in_ch: int, out_ch: int, bias: float = 0.0) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.constant_(conv.bias, bias)
    return conv


class FCOSHead(nn.Module):
    """Shared FCOS head over P3-P7 plus the CondInst controller.

    For each level ``l`` with input (B, C_fpn, h_l, w_l) it returns class logits
    (B, num_classes, h_l, w_l), box regressions (B, 4, h_l, w_l) as (l, t, r, b) distances in
    units of the level's stride (per-level ``Scale`` then ReLU), centerness logits
    (B, 1, h_l, w_l) computed on the box tower, and the box tower's features (B, C_fpn, h_l,
    w_l), the input of the controller, which :meth:`controller_at` evaluates only where needed.
    """

    def __init__(self, *, in_channels: int, num_classes: int, num_convs: int, num_params: int,
                 num_levels: int = 5, prior_prob: float = 0.01) -> None:
        super().__init__()
        self.cls_tower = _tower(in_channels, num_convs)
        self.bbox_tower = _tower(in_channels, num_convs)
        self.cls_logits = _pred_conv(in_channels, num_classes,
                                     bias=-math.log((1 - prior_prob) / prior_prob))
        self.bbox_pred = _pred_conv(in_channels, 4)
        self.ctrness = _pred_conv(in_channels, 1)
        self.controller = _pred_conv(in_channels, num_params)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))

    def forward(self, features: list[Tensor], with_classes: bool = True
                ) -> tuple[list[Tensor], ...]:
        """Per-level ``(cls, reg, ctr, box_feats)``; ``with_classes=False`` skips the class
        tower and returns ``cls`` as an empty list (a teacher that needs only boxes and
        controllers saves its cost)."""
        cls, reg, ctr, box_feats = [], [], [], []
        for level, feat in enumerate(features):
            box_feat = self.bbox_tower(feat)
            if with_classes:
                cls.append(self.cls_logits(self.cls_tower(feat)))
            reg.append(F.relu(self.scales[level](self.bbox_pred(box_feat))))
            ctr.append(self.ctrness(box_feat))
            box_feats.append(box_feat)
        return cls, reg, ctr, box_feats

    def controller_at(self, box_feats: Tensor, neighbours: Tensor, image: Tensor,
                      location: Tensor) -> Tensor:
        """The controller's output at chosen locations only.

        CondInst reads the controller (a 3x3 convolution on the box tower) at a few locations:
        the kept detections, a prompt box's locations, the training positives. Convolving every
        location costs nearly as much as a tower convolution, and in fp32 even in an INT8
        graph; here each chosen location's 3x3 patch is gathered (zeros outside the map, the
        convolution's padding) and multiplied with the kernel: the convolution's sums, in
        another order.

        Args:
            box_feats: (B, C, N) box-tower features of all locations (levels concatenated).
            neighbours: (N, 9) int64 3x3 neighbours of each location, -1 outside its map
                (:func:`serving.model.ops.patch_neighbours`).
            image, location: int64 index tensors of one shape (...): which image and location.

        Returns:
            (..., num_params) controller outputs, ``box_feats``' dtype.
        """
        taps = neighbours[location]  # (..., 9)
        patches = box_feats[image[..., None], :, taps.clamp(min=0)]  # (..., 9, C)
        patches = torch.where(taps[..., None] >= 0, patches, patches.new_zeros(()))
        kernel = self.controller.weight.permute(0, 2, 3, 1).flatten(1)  # (params, 9*C), tap-major
        return F.linear(patches.flatten(-2), kernel.to(patches.dtype),
                        self.controller.bias.to(patches.dtype))


class MaskBranch(nn.Module):
    """Fuses P3-P5 into mask features (B, out_channels, H/8, W/8) (SIM_SPEC 2.3)."""

    def __init__(self, *, in_channels: int, channels: int, num_convs: int,
                 out_channels: int) -> None:
        super().__init__()

        def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
            conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
            nn.init.kaiming_uniform_(conv.weight, a=1)
            return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.refine = nn.ModuleList(conv_bn_relu(in_channels, channels) for _ in range(3))
        self.tower = nn.Sequential(*(conv_bn_relu(channels, channels) for _ in range(num_convs)))
        self.out = nn.Conv2d(channels, out_channels, 1)
        nn.init.kaiming_uniform_(self.out.weight, a=1)
        nn.init.zeros_(self.out.bias)

    def forward(self, features: list[Tensor]) -> Tensor:
        x = self.refine[0](features[0])
        for i in (1, 2):
            x = x + aligned_bilinear(self.refine[i](features[i]), 2**i)
        return self.out(self.tower(x))


class DynamicMaskHead(nn.Module):
    """The CondInst dynamic mask head: per-instance 1x1 convolutions with generated weights.

    The parameter vector of each instance is split as ``[w0, w1, ..., w_{n-1}, b0, ..., b_{n-1}]``
    (all weights first, then all biases; SIM_SPEC 2.4), with ``w0`` of shape
    (channels, mask_channels + 2) in out-channel-major order.
    """

    def __init__(self, *, mask_channels: int = 16, channels: int = 8, num_layers: int = 3,
                 sizes_of_interest: tuple[float, ...] = (64, 128, 256, 512, 1024)) -> None:
        super().__init__()
        #: Bytes of first-layer input per chunk in eager no-grad mode, per device type.
        self.chunk_bytes = {"cpu": 4 << 20, "cuda": 256 << 20}
        self.in_channels = mask_channels + 2
        self.channels = channels
        self.num_layers = num_layers
        shapes = [(channels, self.in_channels)]
        shapes += [(channels, channels)] * (num_layers - 2)
        shapes += [(1, channels)]
        self.weight_shapes = shapes
        self.register_buffer(
            "sizes_of_interest", torch.tensor(sizes_of_interest, dtype=torch.float32),
            persistent=False,
        )

    @property
    def num_params(self) -> int:
        return sum(o * i + o for o, i in self.weight_shapes)

    def split_params(self, params: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """(P, num_params) -> weights [(P, out, in)] and biases [(P, out, 1)] per layer."""
        sizes = [o * i for o, i in self.weight_shapes] + [o for o, _ in self.weight_shapes]
        chunks = torch.split(params, sizes, dim=1)
        n = len(self.weight_shapes)
        weights = [c.reshape(-1, o, i) for c, (o, i) in zip(chunks[:n], self.weight_shapes)]
        biases = [c.reshape(-1, o, 1) for c, (o, _) in zip(chunks[n:], self.weight_shapes)]
        return weights, biases

    def forward(self, mask_feats: Tensor, params: Tensor, locations: Tensor, levels: Tensor,
                image_index: Tensor) -> Tensor:
        """Mask logits at stride 4 (see :meth:`_forward`).

        Without autograd, in eager mode (inference, the SIM teacher), the instances are run in
        chunks of about ``chunk_bytes[device type]`` of first-layer input, with in-place bias
        and ReLU: the same operations per instance, so the same values, without materialising
        (P, D+2, h*w) at once (1.5 GB for 1280 prompt locations at 800x1344 on the CPU, where
        fresh allocations of that size cost more in page faults than the arithmetic). Under
        autograd, tracing, ``torch.compile`` or export it is one batched pass.
        """
        p = params.shape[0]
        if eager_no_grad() and isinstance(p, int) and p > 1:
            h, w = mask_feats.shape[-2:]
            per_instance = (self.in_channels * h * w) * mask_feats.element_size()
            budget = self.chunk_bytes.get(mask_feats.device.type, self.chunk_bytes["cpu"])
            step = max(1, budget // max(per_instance, 1))
            if step < p:
                return torch.cat([
                    self._forward(mask_feats, params[s:s + step], locations[s:s + step],
                                  levels[s:s + step], image_index[s:s + step], inplace=True)
                    for s in range(0, p, step)
                ])
            return self._forward(mask_feats, params, locations, levels, image_index, inplace=True)
        return self._forward(mask_feats, params, locations, levels, image_index)

    def _forward(self, mask_feats: Tensor, params: Tensor, locations: Tensor, levels: Tensor,
                 image_index: Tensor, inplace: bool = False) -> Tensor:
        """Mask logits at stride 4 (``inplace``: bias and ReLU in place, no autograd only).

        Args:
            mask_feats: (B, D, h, w) mask-branch output at stride 8.
            params: (P, num_params) controller outputs of P instances.
            locations: (P, 2) (x, y) input pixels of each instance's FCOS location.
            levels: (P,) int64 pyramid level index (0 = P3) of each instance.
            image_index: (P,) int64 image of each instance within the batch.

        Returns:
            (P, 1, 2h, 2w) mask logits (stride 4).
        """
        h, w = mask_feats.shape[-2:]
        stride = 8
        ys = torch.arange(h, device=mask_feats.device, dtype=mask_feats.dtype) * stride + 4
        xs = torch.arange(w, device=mask_feats.device, dtype=mask_feats.dtype) * stride + 4
        soi = self.sizes_of_interest.to(mask_feats.dtype)[levels]  # (P,)
        rel_x = (locations[:, 0, None] - xs[None, :]) / soi[:, None]  # (P, w)
        rel_y = (locations[:, 1, None] - ys[None, :]) / soi[:, None]  # (P, h)
        rel = torch.stack(
            (rel_x[:, None, :].expand(-1, h, -1), rel_y[:, :, None].expand(-1, -1, w)), dim=1
        ).flatten(2)  # (P, 2, h*w)
        feats = mask_feats.flatten(2)[image_index]  # (P, D, h*w)
        x = torch.cat((rel, feats), dim=1)  # (P, D+2, h*w)
        weights, biases = self.split_params(params)
        for i, (wgt, bias) in enumerate(zip(weights, biases)):
            if inplace:
                x = torch.bmm(wgt, x).add_(bias)
                if i < len(weights) - 1:
                    x = x.relu_()
                continue
            x = torch.bmm(wgt, x) + bias
            if i < len(weights) - 1:
                x = F.relu(x)
        logits = x.reshape(-1, 1, h, w)
        return aligned_bilinear(logits, 2)
