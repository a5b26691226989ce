"""Online weakly-supervised copy-paste of SIM with a FIFO memory bank (SIM_SPEC 7.8).

Objects segmented by the teacher (their pseudo masks) are stored in a memory bank; later images
receive a few of them, and the instances they occlude are updated. Deviations from the
authors' code, per "Our decisions" and SIM_SPEC section 12:

- One bank entry per image (the code pushed B references to the last image, item 6), capacity
  100 (paper; code 50), stored compactly: per instance the uint8 image crop of the tight box
  of its mask and the bool mask crop, at input resolution (the code kept whole padded images and
  float32 full-resolution masks, item 16). Instances with empty masks are not stored (item 7).
- A quarter of the entry's instances, 1 to 3 (paper; code: half), sampled **without**
  replacement with weights ``S'^score_power`` (code: ``S'^3`` with replacement; all-zero
  weights crashed it, item 7: here they fall back to uniform sampling).
- Each object goes to a random location inside the valid region (code: same position as in its
  source image), optionally rescaled; objects pasted later occlude earlier ones.
- Boxes of partly occluded instances shrink to their visible part; untouched sides keep their
  exact coordinates (code: every box recomputed from its mask). Fully occluded instances are
  dropped and reported.

The training loop decides when to paste (code: once the bank is full, with probability 0.5 per
batch, SIM_SPEC 7.0 step 2) and pushes the pseudo masks after the step (7.0 step 8). All random
draws use the ``torch.Generator`` passed in (a CPU generator); the bank lives on the CPU.
"""

from __future__ import annotations

from collections import deque
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from training.losses.boxinst import boxes_to_bitmasks

__all__ = ["MemoryBank", "PasteResult", "masks_to_boxes", "paste", "paste_instances"]

BANK_CAPACITY = 100  # paper (code: BOXINST.LENGTH = 50)
PASTE_FRACTION = 0.25  # "a quarter of the instances" (paper; code 0.5)
PASTE_MIN, PASTE_MAX = 1, 3  # clamp of the number pasted (paper and code)
SCORE_POWER = 3.0  # sampling weight S'^3 (code; the paper only says "by importance")
SCALE_RANGE = (1.0, 1.0)  # no rescaling by default (the code neither scales nor flips)


class PasteResult(NamedTuple):
    """Instances of an image after copy-paste; ``M'`` = kept originals followed by kept pastes.

    Attributes:
        image: ``(3, H, W)`` uint8, the composited image.
        boxes: ``(M', 4)`` float32 XYXY of the input frame (shrunk for partly occluded
            originals; tight ``(x0, y0, x1 + 1, y1 + 1)`` pixel boxes for pasted objects).
        labels: ``(M',)`` int64.
        box_masks_full: ``(M', H, W)`` bool, the masks the BoxInst losses use as
            ``gt_bitmasks_full`` (SIM_SPEC 7.8 step 7): box minus the pasted pixels for
            originals, the visible pseudo mask for pasted objects.
        pasted: ``(M',)`` bool, True for pasted objects.
        paste_targets: ``(M', H, W)`` bool, visible pseudo mask of pasted rows, False elsewhere
            (target of ``L_paste``).
        dropped_indices: ``(D,)`` int64 indices into the input instances that were fully covered.
        kept_indices: ``(M - D,)`` int64 indices of the input instances kept, in output order.
    """

    image: Tensor
    boxes: Tensor
    labels: Tensor
    box_masks_full: Tensor
    pasted: Tensor
    paste_targets: Tensor
    dropped_indices: Tensor
    kept_indices: Tensor


def masks_to_boxes(masks: Tensor) -> tuple[Tensor, Tensor]:
    """Inclusive pixel extents of masks: ``(K, H, W)`` bool -> ``((K, 4) int64, (K,) bool)``.

    Returns ``(x0, y0, x1, y1)`` of the first/last True column and row (zeros for empty masks)
    and whether each mask has any pixel.
    """
    k, h, w = masks.shape
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # (K, H), (K, W)
    nonempty = rows.any(dim=1)
    y0 = rows.float().argmax(dim=1)
    y1 = h - 1 - rows.flip(1).float().argmax(dim=1)
    x0 = cols.float().argmax(dim=1)
    x1 = w - 1 - cols.flip(1).float().argmax(dim=1)
    ext = torch.stack([x0, y0, x1, y1], dim=1).long()
    return ext * nonempty[:, None], nonempty


class MemoryBank:
    """FIFO bank of pasteable objects, one entry per image (SIM_SPEC 7.8 "Memory bank").

    An entry holds the objects of one image: ``patches`` (list of ``(3, h_k, w_k)`` uint8),
    ``masks`` (list of ``(h_k, w_k)`` bool), ``labels`` ``(K,)`` int64, ``scores`` ``(K,)``
    float32, all on the CPU. ``K >= 1``.
    """

    def __init__(self, capacity: int = BANK_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.entries: deque[dict[str, Any]] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def is_full(self) -> bool:
        """True once ``capacity`` entries are stored (the code's condition to start pasting)."""
        return len(self.entries) == self.capacity

    def push(self, image: Tensor, masks: Tensor, boxes: Tensor, labels: Tensor,
             scores: Tensor) -> int:
        """Store the objects of one image; the oldest entry is evicted when full.

        Mask pixels outside the rasterised box are cleared (pseudo masks lie inside their box,
        SIM_SPEC 7.6 step 4); each object is cropped to the tight box of its mask; objects with
        an empty mask are skipped, and nothing is stored if none remains.

        Args:
            image: ``(3, H, W)`` uint8 input image (possibly already pasted), padded frame.
            masks: ``(K, H, W)`` bool pseudo masks at input resolution (see
                :func:`training.sim.pseudo.full_resolution_masks`).
            boxes: ``(K, 4)`` float XYXY boxes of the same frame.
            labels: ``(K,)`` int64 classes.
            scores: ``(K,)`` float importance ``S'``
                (:func:`~training.sim.pseudo.instance_importance`).

        Returns:
            The number of objects stored (0: no entry was added).
        """
        k = labels.shape[0]
        if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise ValueError(
                f"image must be (3, H, W) uint8, got {tuple(image.shape)} {image.dtype}")
        if masks.shape != (k, *image.shape[1:]) or boxes.shape != (k, 4) or scores.shape != (k,):
            raise ValueError("masks (K, H, W), boxes (K, 4), labels (K,), scores (K,) must agree "
                             f"with image {tuple(image.shape)}")
        if k == 0:
            return 0
        image = image.detach().cpu()
        box_full, _ = boxes_to_bitmasks(boxes.detach().cpu(), image.shape[1], image.shape[2])
        m = masks.detach().cpu().bool() & (box_full > 0)
        ext, nonempty = masks_to_boxes(m)
        patches, crops, keep = [], [], []
        for i in torch.nonzero(nonempty)[:, 0].tolist():
            x0, y0, x1, y1 = ext[i].tolist()
            # .clone(): the stored crops must not keep the full image's storage alive.
            patches.append(image[:, y0:y1 + 1, x0:x1 + 1].clone())
            crops.append(m[i, y0:y1 + 1, x0:x1 + 1].clone())
            keep.append(i)
        if not keep:
            return 0
        idx = torch.tensor(keep, dtype=torch.long)
        self.entries.append({
            "patches": patches,
            "masks": crops,
            "labels": labels.detach().cpu().long()[idx].clone(),
            "scores": scores.detach().cpu().float()[idx].clone(),
        })
        return len(keep)

    def state_dict(self) -> dict[str, Any]:
        """Plain dict of ints, lists and CPU tensors (``torch.save``/``weights_only`` friendly)."""
        return {
            "capacity": self.capacity,
            "entries": [{key: (list(e[key]) if isinstance(e[key], list) else e[key])
                         for key in ("patches", "masks", "labels", "scores")}
                        for e in self.entries],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (the capacity is taken from ``state``)."""
        capacity = int(state["capacity"])
        entries = deque(maxlen=capacity)
        for e in state["entries"][-capacity:]:
            n = len(e["labels"])
            if len(e["patches"]) != n or len(e["masks"]) != n or len(e["scores"]) != n:
                raise ValueError("memory bank state: patches, masks, labels, scores disagree")
            entries.append({"patches": [p.to(torch.uint8) for p in e["patches"]],
                            "masks": [m.bool() for m in e["masks"]],
                            "labels": e["labels"].long(), "scores": e["scores"].float()})
        self.capacity, self.entries = capacity, entries


def _uniform(generator: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def _randint(generator: torch.Generator, high: int) -> int:
    """Uniform integer in ``[0, high)``."""
    return int(torch.randint(high, (), generator=generator))


def paste_instances(
    image: Tensor, valid: Tensor, gt_boxes: Tensor, gt_labels: Tensor, gt_masks: Tensor | None,
    patches: list[Tensor], patch_masks: list[Tensor], patch_labels: Tensor, positions: Tensor,
) -> PasteResult:
    """Composite objects at given positions and update the occluded instances (deterministic).

    Objects are pasted in list order, later ones over earlier ones; pixels outside ``valid`` or
    the frame are not pasted. Occlusion: originals keep ``mask & ~union(pasted)``, pasted object
    ``j`` keeps ``mask_j & ~union(pasted after j)``; instances left empty are dropped (an
    original whose mask was empty to begin with is kept unchanged). Original boxes become
    ``box ∩ [x0, x1 + 1] x [y0, y1 + 1]`` of the visible extent, which keeps untouched sides
    exactly and shrinks occluded ones to the continuous tight box (the code's
    ``extract_bboxes`` convention, SIM_SPEC 7.8 step 5).

    Args:
        image: ``(3, H, W)`` uint8. valid: ``(H, W)`` bool real (non-padding) pixels.
        gt_boxes: ``(M, 4)`` float XYXY. gt_labels: ``(M,)`` int64.
        gt_masks: ``(M, H, W)`` bool box masks of the originals, or ``None`` to rasterise
            ``gt_boxes`` with the BoxInst rule (SIM_SPEC 6.1).
        patches: ``n`` tensors ``(3, h_j, w_j)`` uint8. patch_masks: ``n`` tensors ``(h_j, w_j)``
            bool. patch_labels: ``(n,)`` int64.
        positions: ``(n, 2)`` int64 ``(x, y)`` of each patch's top-left pixel in the frame.

    Returns:
        :class:`PasteResult` on ``image``'s device.
    """
    dev = image.device
    _, h, w = image.shape
    boxes = gt_boxes.to(dev, torch.float32)
    if gt_masks is None:
        gt_masks = boxes_to_bitmasks(boxes, h, w)[0] > 0
    gt_masks = gt_masks.to(dev).bool()
    out = image.clone()
    pm = _composite(out, valid.to(dev).bool(), patches, patch_masks, positions)
    pasted_vis, orig_vis = _occlusion(pm, gt_masks)
    had = gt_masks.flatten(1).any(dim=1)
    ext, has = masks_to_boxes(orig_vis)
    keep_orig = has | ~had
    new_boxes = torch.where(has[:, None], _shrink_to(boxes, ext), boxes)
    p_ext, p_keep = masks_to_boxes(pasted_vis)
    p_boxes = p_ext.float() + torch.tensor([0.0, 0.0, 1.0, 1.0], device=dev)
    kept = torch.nonzero(keep_orig)[:, 0]
    pk = torch.nonzero(p_keep)[:, 0]
    orig_masks = orig_vis[kept]
    return PasteResult(
        image=out,
        boxes=torch.cat([new_boxes[kept], p_boxes[pk]]),
        labels=torch.cat([gt_labels.to(dev).long()[kept], patch_labels.to(dev).long()[pk]]),
        box_masks_full=torch.cat([orig_masks, pasted_vis[pk]]),
        pasted=torch.cat([torch.zeros(len(kept), dtype=torch.bool, device=dev),
                          torch.ones(len(pk), dtype=torch.bool, device=dev)]),
        paste_targets=torch.cat([torch.zeros_like(orig_masks), pasted_vis[pk]]),
        dropped_indices=torch.nonzero(~keep_orig)[:, 0],
        kept_indices=kept,
    )


def _composite(out: Tensor, valid: Tensor, patches: list[Tensor], patch_masks: list[Tensor],
               positions: Tensor) -> Tensor:
    """Paste every patch into ``out`` (``(3, H, W)`` uint8, in place) in list order, only
    where its mask and ``valid`` (``(H, W)`` bool) are set and inside the frame; returns the
    pasted pixels of each patch, ``(n, H, W)`` bool in frame coordinates."""
    dev = out.device
    _, h, w = out.shape
    pm = torch.zeros(len(patches), h, w, dtype=torch.bool, device=dev)
    for j in range(len(patches)):
        x, y = (int(v) for v in positions[j])
        ph, pw = patch_masks[j].shape
        ya, yb, xa, xb = max(y, 0), min(y + ph, h), max(x, 0), min(x + pw, w)
        if ya >= yb or xa >= xb:
            continue
        crop = (slice(ya - y, yb - y), slice(xa - x, xb - x))
        region = patch_masks[j].to(dev)[crop] & valid[ya:yb, xa:xb]
        pm[j, ya:yb, xa:xb] = region
        out[:, ya:yb, xa:xb] = torch.where(region, patches[j].to(dev)[(slice(None), *crop)],
                                           out[:, ya:yb, xa:xb])
    return pm


def _occlusion(pm: Tensor, gt_masks: Tensor) -> tuple[Tensor, Tensor]:
    """Visible parts after pasting: of each pasted object (``pm``, ``(n, H, W)`` bool, not
    covered by a later paste) and of each original (``gt_masks``, ``(M, H, W)`` bool, not
    covered by any paste)."""
    n, h, w = pm.shape
    # Count of masks from j to the end, minus its own -> covered by a later paste.
    from_j = pm.flip(0).to(torch.int32).cumsum(0).flip(0)
    pasted_vis = pm & (from_j - pm.to(torch.int32) == 0)
    union = from_j[0] > 0 if n > 0 else torch.zeros(h, w, dtype=torch.bool, device=pm.device)
    return pasted_vis, gt_masks & ~union


def _shrink_to(boxes: Tensor, extent: Tensor) -> Tensor:
    """``boxes`` (``(M, 4)`` float XYXY) intersected with the continuous tight boxes of the
    pixel ``extent`` (``(M, 4)`` inclusive pixel XYXY): untouched sides stay exactly."""
    tight = extent.float() + torch.tensor([0.0, 0.0, 1.0, 1.0], device=boxes.device)
    return torch.cat([torch.maximum(boxes[:, :2], tight[:, :2]),
                      torch.minimum(boxes[:, 2:], tight[:, 2:])], dim=1)


def _fit_patch(patch: Tensor, mask: Tensor, scale: float, max_h: int, max_w: int
               ) -> tuple[Tensor, Tensor]:
    """Rescale a patch by ``scale``, shrunk further if needed to fit ``max_h x max_w``."""
    ph, pw = mask.shape
    s = min(scale, max_h / ph, max_w / pw)
    if s == 1.0:
        return patch, mask
    size = (min(max(1, round(ph * s)), max_h), min(max(1, round(pw * s)), max_w))
    img = F.interpolate(patch[None].float(), size=size, mode="bilinear", align_corners=False)
    msk = F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")
    return img[0].round().clamp(0, 255).to(torch.uint8), msk[0, 0] > 0.5


def paste(
    image: Tensor, valid: Tensor, gt_boxes: Tensor, gt_labels: Tensor, gt_masks: Tensor | None,
    bank: MemoryBank, generator: torch.Generator, fraction: float = PASTE_FRACTION,
    min_n: int = PASTE_MIN, max_n: int = PASTE_MAX, score_power: float = SCORE_POWER,
    scale_range: tuple[float, float] = SCALE_RANGE,
) -> PasteResult:
    """Paste objects of one random bank entry into an image (SIM_SPEC 7.8 "Transformation").

    Draws an entry uniformly; ``n = clamp(floor(fraction * K), min_n, max_n)``, at most ``K``
    (the number of objects of that entry; ``floor`` as the code's ``int()``); ``n`` distinct
    objects by ``torch.multinomial(score^score_power, replacement=False)`` (uniform when all
    weights are 0 or non-finite; never more than the objects with a positive weight). Each is
    rescaled by ``U(scale_range)`` (then shrunk to fit the valid region if needed) and placed
    with its top-left corner uniform over the positions that keep it inside the bounding box of
    ``valid``. Then :func:`paste_instances`. With an empty bank or no valid pixel the image is
    returned unchanged (``pasted`` all False).

    Args:
        image: ``(3, H, W)`` uint8 padded input image. valid: ``(H, W)`` bool real pixels.
        gt_boxes: ``(M, 4)`` float XYXY. gt_labels: ``(M,)`` int64.
        gt_masks: ``(M, H, W)`` bool box masks of the originals or ``None`` (rasterised).
        bank: the memory bank. generator: CPU ``torch.Generator`` for every random draw.
        fraction, min_n, max_n: number of objects (0.25, 1, 3).
        score_power: exponent of the importance in the sampling weight (3).
        scale_range: ``(lo, hi)`` uniform rescale factor ((1, 1): none).

    Returns:
        :class:`PasteResult`.
    """
    rows, cols = valid.any(dim=1), valid.any(dim=0)
    if len(bank) == 0 or not bool(rows.any()):
        none = torch.zeros(0, dtype=torch.long)
        return paste_instances(image, valid, gt_boxes, gt_labels, gt_masks, [], [], none,
                               none.view(0, 2))
    entry = bank.entries[_randint(generator, len(bank))]
    k = len(entry["labels"])
    n = min(max(int(fraction * k), min_n), max_n, k)
    weights = entry["scores"].clamp(min=0.0).pow(score_power)
    if not bool(torch.isfinite(weights).all()) or float(weights.sum()) <= 0.0:
        weights = torch.ones(k)
    n = min(n, int((weights > 0).sum()))
    chosen = torch.multinomial(weights, n, replacement=False, generator=generator).tolist()

    ys = torch.nonzero(rows)[:, 0]
    xs = torch.nonzero(cols)[:, 0]
    vy0, vy1, vx0, vx1 = int(ys[0]), int(ys[-1]), int(xs[0]), int(xs[-1])
    vh, vw = vy1 - vy0 + 1, vx1 - vx0 + 1
    patches, masks, positions = [], [], []
    for i in chosen:
        scale = _uniform(generator, *scale_range)
        p, msk = _fit_patch(entry["patches"][i], entry["masks"][i], scale, vh, vw)
        ph, pw = msk.shape
        y = vy0 + _randint(generator, vh - ph + 1)
        x = vx0 + _randint(generator, vw - pw + 1)
        patches.append(p)
        masks.append(msk)
        positions.append((x, y))
    return paste_instances(image, valid, gt_boxes, gt_labels, gt_masks, patches, masks,
                           entry["labels"][chosen], torch.tensor(positions, dtype=torch.long))
