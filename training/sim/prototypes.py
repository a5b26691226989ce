"""Class prototypes of SIM: the memory ``(C, L, D)``, its Sinkhorn/EMA update and the semantic map.

SIM keeps ``L`` unit-norm prototypes per class in the space of the ``D``-dimensional mask
features (SIM_SPEC 7.2). Each training step they are updated from the pixels believed to belong
to each class (SIM_SPEC 7.7): the pixels of a class are split among its ``L`` prototypes by a
Sinkhorn equipartition, each prototype moves towards the normalised centroid of its pixels with
momentum 0.999. The semantic map ``M_S`` of an instance is ``sigmoid(max_l cos(z, p_cl) / tau)``
over the (teacher) features of its image (paper, SIM_SPEC 7.3 and section 8).

Deviations from the authors' code, per "Our decisions" (SIM_SPEC top and section 12):

- Prototypes are unit-norm **per vector** (:func:`l2_normalize_vectors` on the last axis). The
  code normalised ``(C, L, D)`` along ``L`` (item 3), so its "cosines" were plain dot products.
- Temperature ``tau = 1.0`` in ``M_S``, as ratified in SIM_SPEC after measurement: the
  paper's 0.1 saturates the map (``training.train_config.SIMConfig.tau``); the code has none
  (item 5).
- Hard argmax Sinkhorn assignment instead of a Gumbel sample (item 2); log-domain fp32
  Sinkhorn (item 12).
- With several processes the centroid sums and counts are summed over processes before the
  EMA, so every process ends with identical prototypes (the code averaged already-updated,
  differently normalised prototypes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.sim.sinkhorn import (
    SINKHORN_EPSILON,
    SINKHORN_ITERS,
    AllReduceSum,
    hard_assign,
    sinkhorn_log,
)

__all__ = ["PrototypeMemory", "l2_normalize_vectors"]

# Paper and code defaults (SIM_SPEC 0, 7.3, 7.7 and "Our decisions").
NUM_PROTOTYPES = 10  # L, BOXINST.NUM_PROTO
FEATURE_DIM = 16  # D, MASK_BRANCH.OUT_CHANNELS
PROTOTYPE_MOMENTUM = 0.999  # gamma
SEMANTIC_TAU = 1.0  # tau of M_S: soft like the code; the paper's 0.1 saturates (config.py)
# F.normalize epsilon (SIM_SPEC 12 item 13).
NORM_EPS = 1e-12


def l2_normalize_vectors(x: Tensor, dim: int = -1, eps: float = NORM_EPS) -> Tensor:
    """Scale every vector along ``dim`` to unit L2 norm (zero vectors stay zero).

    Use ``dim=-1`` for prototypes ``(C, L, D)`` and pixel lists ``(N, D)``, ``dim=1`` for
    feature maps ``(B, D, H, W)``. Two explicit call sites instead of the authors' single
    ``dim=1`` helper, which normalised prototypes along ``L`` (SIM_SPEC 12 item 3).
    """
    return F.normalize(x, p=2.0, dim=dim, eps=eps)


class PrototypeMemory(nn.Module):
    """``L`` unit-norm prototypes per class, updated by Sinkhorn + EMA (SIM_SPEC 7.2, 7.7).

    Not trained by the optimizer: ``prototypes`` is a persistent buffer (so it is saved in the
    module's ``state_dict`` and moved by ``.to()``), changed only by :meth:`update`.

    Args:
        num_classes: ``C``.
        num_prototypes: ``L`` per class (10).
        dim: ``D``, the mask-feature dimension (16).
        momentum: EMA momentum ``gamma`` of the update (0.999).
        tau: temperature of the semantic map (1.0; the paper's is 0.1).
        epsilon: Sinkhorn temperature (0.05).
        sinkhorn_iters: Sinkhorn rounds (3).
        seed: seed of the deterministic initialisation (standard normal, then unit-normalised
            per vector; the code's ``trunc_normal_(std=0.02)`` has the same directions up to
            truncation, and the scale is removed by the normalisation).
    """

    prototypes: Tensor

    def __init__(
        self,
        num_classes: int,
        num_prototypes: int = NUM_PROTOTYPES,
        dim: int = FEATURE_DIM,
        momentum: float = PROTOTYPE_MOMENTUM,
        tau: float = SEMANTIC_TAU,
        epsilon: float = SINKHORN_EPSILON,
        sinkhorn_iters: int = SINKHORN_ITERS,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_classes < 1 or num_prototypes < 1 or dim < 1:
            raise ValueError("num_classes, num_prototypes and dim must be >= 1")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.num_classes = num_classes
        self.num_prototypes = num_prototypes
        self.dim = dim
        self.momentum = momentum
        self.tau = tau
        self.epsilon = epsilon
        self.sinkhorn_iters = sinkhorn_iters
        gen = torch.Generator().manual_seed(seed)
        init = torch.randn(num_classes, num_prototypes, dim, generator=gen)
        self.register_buffer("prototypes", l2_normalize_vectors(init, dim=-1), persistent=True)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, num_prototypes={self.num_prototypes}, "
                f"dim={self.dim}, momentum={self.momentum}, tau={self.tau}")

    @torch.no_grad()
    def update(
        self,
        features: Tensor,
        labels: Tensor,
        all_reduce_sum: AllReduceSum | None = None,
        assign_features: Tensor | None = None,
    ) -> Tensor:
        """One Sinkhorn + EMA step from a set of labelled pixels (SIM_SPEC 7.7).

        For each class ``c`` with pixels: ``Q = sinkhorn(assign_c @ P_c^T)`` over its ``L``
        prototypes (all classes solved in one grouped call), hard argmax assignment, centroid
        ``f_l = normalize(sum of the features assigned to l)``, and for prototypes with at least
        one pixel ``p_l <- normalize(m p_l + (1 - m) f_l)``; the other prototypes are unchanged.

        With ``all_reduce_sum`` the Sinkhorn column sums, the centroid sums and the counts are
        global, so all processes compute identical prototypes. Every process must call this
        method at every step (also with ``N == 0``): it issues ``2 * sinkhorn_iters + 1``
        collective calls, independent of the data.

        Args:
            features: ``(N, D)`` pixel features of which the centroids are taken (the student's,
                SIM_SPEC 7.7); normalised per pixel here (idempotent for unit-norm input).
            labels: ``(N,)`` int64 class of each pixel in ``[0, C)``.
            all_reduce_sum: cross-process sum (see :data:`AllReduceSum`), ``None`` on one process.
            assign_features: optional ``(N, D)`` features for the Sinkhorn scores. The code
                scores pixels with the teacher's features and averages the student's
                (SIM_SPEC 7.7); default ``features`` (the paper's single ``Z``).

        Returns:
            ``(N,)`` int64 prototype index (in ``[0, L)``) assigned to each pixel.
        """
        n = features.shape[0]
        self._check_update(features, labels, assign_features)
        if n == 0 and all_reduce_sum is None:
            return torch.zeros(0, dtype=torch.long, device=features.device)
        labels = labels.long()
        with torch.autocast(device_type=features.device.type, enabled=False):
            protos = self.prototypes.float()
            feats = l2_normalize_vectors(features.float(), dim=-1)
            assign = feats if assign_features is None else \
                l2_normalize_vectors(assign_features.float(), dim=-1)
            assigned = self._assign(assign, labels, protos, all_reduce_sum)
            new = self._moved(feats, labels, assigned, protos, all_reduce_sum)
        self.prototypes.copy_(new.to(self.prototypes.dtype))
        return assigned

    def _check_update(self, features: Tensor, labels: Tensor,
                      assign_features: Tensor | None) -> None:
        """The shapes and label range of :meth:`update`'s inputs, as a ``ValueError``."""
        n = features.shape[0]
        c, _, d = self.prototypes.shape
        if features.dim() != 2 or features.shape[1] != d:
            raise ValueError(f"features must be (N, {d}), got {tuple(features.shape)}")
        if labels.shape != (n,):
            raise ValueError(f"labels must be ({n},), got {tuple(labels.shape)}")
        if assign_features is not None and assign_features.shape != features.shape:
            raise ValueError("assign_features must have the shape of features")
        if n > 0 and (int(labels.min()) < 0 or int(labels.max()) >= c):
            raise ValueError(f"labels must be in [0, {c}), got [{labels.min()}, {labels.max()}]")

    def _assign(self, assign: Tensor, labels: Tensor, protos: Tensor,
                all_reduce_sum: AllReduceSum | None) -> Tensor:
        """Sinkhorn over each pixel's own class's ``L`` prototypes, then the hard argmax:
        ``(N,)`` int64 prototype index of each unit-norm pixel feature ``assign`` ``(N, D)``."""
        c, l_, _ = protos.shape
        # Scores of each pixel against its own class's L prototypes. A loop over the
        # classes present (C is small) avoids materialising (N, L, D) or (N, C*L).
        scores = assign.new_zeros(assign.shape[0], l_)
        for cls in torch.unique(labels).tolist():
            sel = labels == cls
            scores[sel] = assign[sel] @ protos[cls].T
        q = sinkhorn_log(scores, self.epsilon, self.sinkhorn_iters, groups=labels,
                         num_groups=c, all_reduce_sum=all_reduce_sum)
        return hard_assign(q)

    def _moved(self, feats: Tensor, labels: Tensor, assigned: Tensor, protos: Tensor,
               all_reduce_sum: AllReduceSum | None) -> Tensor:
        """The prototypes ``(C, L, D)`` after the EMA step towards the (global) centroids of
        the unit-norm ``feats`` ``(N, D)`` assigned to each; prototypes without pixels stay."""
        c, l_, d = protos.shape
        # Centroid sums and counts of every (class, prototype), one collective for both.
        slot = labels * l_ + assigned
        packed = feats.new_zeros(c * l_, d + 1)
        packed[:, :d].index_add_(0, slot, feats)
        packed[:, d].index_add_(0, slot, torch.ones_like(slot, dtype=feats.dtype))
        if all_reduce_sum is not None:
            packed = all_reduce_sum(packed)
        centroids = l2_normalize_vectors(packed[:, :d].view(c, l_, d), dim=-1)
        hit = (packed[:, d] > 0).view(c, l_, 1)
        moved = l2_normalize_vectors(
            self.momentum * protos + (1.0 - self.momentum) * centroids, dim=-1)
        return torch.where(hit, moved, protos)

    @torch.no_grad()
    def semantic_map(
        self,
        features: Tensor,
        labels: Tensor,
        image_index: Tensor,
        tau: float | None = None,
    ) -> Tensor:
        """Semantic map ``M_S = sigmoid(max_l cos(z, p_{c,l}) / tau)`` per instance (SIM_SPEC 7.3).

        Computed in float32 without gradient (it only enters detached pseudo labels).

        Args:
            features: ``(B, D, H, W)`` feature maps (the teacher's, upsampled to the mask-logit
                grid, SIM_SPEC 7.3); normalised per pixel here (idempotent for unit-norm input).
            labels: ``(M,)`` int64 class of each instance in ``[0, C)``.
            image_index: ``(M,)`` int64 image of each instance in ``[0, B)``.
            tau: temperature; default ``self.tau`` (1.0; the paper's is 0.1, see
                ``training.train_config.SIMConfig.tau``).

        Returns:
            ``(M, H, W)`` float32 in ``(0, 1)``.
        """
        b, d, h, w = features.shape
        m = labels.shape[0]
        if d != self.dim:
            raise ValueError(f"features must have {self.dim} channels, got {d}")
        if image_index.shape != (m,):
            raise ValueError(f"image_index must be ({m},), got {tuple(image_index.shape)}")
        tau = self.tau if tau is None else tau
        out = features.new_zeros(m, h, w, dtype=torch.float32)
        if m == 0:
            return out
        with torch.autocast(device_type=features.device.type, enabled=False):
            z = l2_normalize_vectors(features.float(), dim=1).flatten(2)  # (B, D, HW)
            protos = self.prototypes.float()
            # A loop over the images present (B is small): (M_b * L, D) @ (D, HW).
            for img in torch.unique(image_index).tolist():
                sel = image_index == img
                p = protos[labels[sel].long()]  # (M_b, L, D)
                cos = (p.reshape(-1, d) @ z[img]).view(p.shape[0], self.num_prototypes, h * w)
                out[sel] = torch.sigmoid(cos.amax(dim=1) / tau).view(-1, h, w)
        return out
