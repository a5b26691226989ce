"""A picture of SIM at work: M_S, M_I and the pseudo mask of a few instances next to the truth.

Called by ``benchmarks/quality.py`` at the end of a SIM run (a training callback), with
the trained student, its EMA teacher and prototypes. Each row is one validation instance,
cropped around its box (shown at 4x the mask grid, nearest neighbour):

    image + box | M_S (prototypes) | M_I (teacher, IoU-weighted) | pseudo mask | ground truth

The pseudo mask shows ``M_hat`` in white, the confident background (``W`` = 1, target 0) in
black and the ignored band (``W`` = 0 inside the box) in grey, as the pseudo loss sees it.

:func:`semantic_separability` puts a number on the M_S column: how well the teacher's mask
features tell object from background pixels inside a box, through the learned prototypes and
through two oracles built from the validation masks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy.stats import mannwhitneyu

from serving.model import CondInst
from training.data import CocoInstanceDataset
from training.data.augment import ResizeShortestEdge
from training.data.collate import collate
from training.losses.criterion import fcos_assign_batch, targets_from_batch, upsample_features
from training.sim.iteration import SIMState, compute_sim_maps
from training.sim.prototypes import l2_normalize_vectors
from training.train_config import TrainConfig

TILE = 112
COLUMNS = ("image + box", "M_S", "M_I", "pseudo mask", "ground truth")


def val_dataset(cfg: TrainConfig) -> CocoInstanceDataset:
    """The validation split of ``cfg`` with its masks, resized as at inference."""
    if not cfg.data.val_json or not cfg.data.val_images:
        raise ValueError("SIM diagnostics need data.val_json and data.val_images")
    return CocoInstanceDataset(cfg.data.val_json, cfg.data.val_images, mode="mask",
                               transform=ResizeShortestEdge(cfg.inference.min_size,
                                                            cfg.inference.max_size))


def auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Area under the ROC curve of scores ``pos`` (positives) vs ``neg``: the probability that
    a random positive outscores a random negative, ties counted half (Mann-Whitney U / n1 n2)."""
    u = mannwhitneyu(pos.double().cpu().numpy(), neg.double().cpu().numpy()).statistic
    return float(u / (len(pos) * len(neg)))


def semantic_separability(sim: SIMState, cfg: TrainConfig, max_images: int = 40,
                          batch_size: int = 8, min_pixels: int = 3) -> dict[str, float]:
    """How well the SIM teacher's mask features separate object from background inside boxes,
    through its learned class prototypes and two oracles: :func:`feature_separability` of
    ``sim.teacher`` with ``sim.prototypes``."""
    return feature_separability(sim.teacher.module, cfg, sim.prototypes.prototypes, max_images,
                                batch_size, min_pixels)


@torch.no_grad()
def feature_separability(model: CondInst, cfg: TrainConfig,
                         prototypes: torch.Tensor | None = None, max_images: int = 40,
                         batch_size: int = 8, min_pixels: int = 3) -> dict[str, float]:
    """How well a model's mask features separate object from background inside boxes.

    For every validation instance (``cfg.data.val_*``, resized as at inference), the pixels of
    its box on the stride-4 grid are split by the ground-truth mask into object and background,
    and scores of the model's L2-normalised, upsampled mask features ``z`` are compared by their
    AUC (mean over instances):

    - ``prototypes`` (only when ``prototypes`` ``(C, L, D)`` are given): ``max_l cos(z, p_{c,l})``,
      what SIM's M_S ranks by (M_S = sigmoid of it over tau);
    - ``oracle_class``: ``cos(z, mean object feature of class c)`` over all validation
      instances of the class: the best a single class prototype could do;
    - ``oracle_instance``: ``cos(z, mean object feature of this instance)``: an upper bound for
      any prototype, which tells whether the features separate the pixels at all.

    An AUC of 0.5 means the score carries no information inside the box, 1.0 a perfect ranking.
    Works for any CondInst (SIM teacher, BoxInst or fully supervised model), so the feature
    spaces of differently supervised models can be compared.
    """
    device = next(iter(model.parameters()), torch.empty(0)).device
    data = val_dataset(cfg)
    protos = None if prototypes is None else l2_normalize_vectors(prototypes.float(), dim=-1)
    records: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (class, object, background)
    proto_auc: list[float] = []
    n_img = min(max_images, len(data))
    for start in range(0, n_img, batch_size):
        batch = collate([data[i] for i in range(start, min(start + batch_size, n_img))])
        batch = batch.to(device)
        height, width = batch.images.shape[-2:]
        targets = targets_from_batch(batch.boxes, batch.labels, height, width)
        out = model(model.normalize(batch.images, batch.valid), with_classes=False)
        z = l2_normalize_vectors(upsample_features(out.mask_feats.float()), dim=1)
        h, w = z.shape[-2:]
        for b, (boxes, labels, masks) in enumerate(zip(targets.box_masks, batch.labels,
                                                       batch.masks)):
            for box, label, mask in zip(boxes, labels.tolist(), masks):
                inside = box[2::4, 2::4][:h, :w] > 0
                obj_px = inside & (mask[2::4, 2::4][:h, :w] > 0)
                bg_px = inside & ~obj_px
                if int(obj_px.sum()) < min_pixels or int(bg_px.sum()) < min_pixels:
                    continue
                obj, bg = z[b][:, obj_px].T, z[b][:, bg_px].T  # (n, D)
                if protos is not None:
                    p = protos[label]  # (L, D)
                    proto_auc.append(auc((obj @ p.T).amax(1), (bg @ p.T).amax(1)))
                records.append((label, obj, bg))
    if not records:
        return {"instances": 0}
    class_mean = {c: l2_normalize_vectors(torch.cat([o for k, o, _ in records if k == c])
                                          .mean(0), dim=0) for c in {r[0] for r in records}}
    oracle_class = [auc(o @ class_mean[c], g @ class_mean[c]) for c, o, g in records]
    oracle_inst = []
    for _, o, g in records:
        centre = l2_normalize_vectors(o.mean(0), dim=0)
        oracle_inst.append(auc(o @ centre, g @ centre))
    result = {"instances": len(records), "oracle_class": float(np.mean(oracle_class)),
              "oracle_instance": float(np.mean(oracle_inst))}
    if protos is not None:
        result["prototypes"] = float(np.mean(proto_auc))
    return result


def _crop(array: np.ndarray, box: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Crop ``array`` (H, W[, 3]) to ``box`` (XYXY input pixels) grown by a quarter, clipped."""
    x1, y1, x2, y2 = box
    mx, my = 0.25 * (x2 - x1) + 4, 0.25 * (y2 - y1) + 4
    h, w = shape
    xa, ya = int(max(x1 - mx, 0)), int(max(y1 - my, 0))
    xb, yb = int(min(x2 + mx, w)), int(min(y2 + my, h))
    return array[ya:max(yb, ya + 1), xa:max(xb, xa + 1)]


def _tile(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).astype(np.uint8)
    return Image.fromarray(array).resize((TILE, TILE), Image.NEAREST)


@torch.no_grad()
def render_sim_maps(model: CondInst, sim: SIMState, cfg: TrainConfig, out_png: str | Path,
                    num_instances: int = 6, max_images: int = 8) -> Path:
    """Write the figure for up to ``num_instances`` validation instances; returns its path.

    The validation masks are read for the last column only; M_S, M_I and the pseudo mask are
    computed from boxes, exactly as in a training step (``compute_sim_maps``).
    """
    device = next(model.parameters()).device
    data = val_dataset(cfg)
    n_img = min(max_images, len(data))
    batch = collate([data[i] for i in range(n_img)]).to(device)
    height, width = batch.images.shape[-2:]
    targets = targets_from_batch(batch.boxes, batch.labels, height, width)
    model.eval()
    x = model.normalize(batch.images, batch.valid)
    outputs = model(x)
    _, _, pos = fcos_assign_batch(outputs, targets, cfg.boxinst.topk_proposals_per_image,
                                  cfg.inference.center_radius)
    maps = compute_sim_maps(sim, x, pos, targets, cfg)
    has_pos = torch.bincount(pos.gt_global, minlength=pos.num_gts) > 0
    gt_masks = torch.cat(batch.masks).cpu().numpy()
    boxes = pos.gt_boxes.cpu().numpy()
    image_of = pos.gt_image.cpu().numpy()
    # Largest instances first (readable), one per image before a second from the same image;
    # boxes without a positive location have no M_I and are left out.
    sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    order = [int(g) for g in np.argsort(-sides, kind="stable") if has_pos[g]]
    chosen: list[int] = []
    for g in order:
        if image_of[g] not in {image_of[c] for c in chosen}:
            chosen.append(g)
    chosen = (chosen + [g for g in order if g not in chosen])[:num_instances]

    def up(t: torch.Tensor) -> np.ndarray:  # stride-4 map -> input resolution
        return np.kron(t.cpu().numpy(), np.ones((4, 4), dtype=np.float32))[:height, :width]

    header = 18
    sheet = Image.new("RGB", (TILE * len(COLUMNS), header + TILE * len(chosen)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(COLUMNS):
        draw.text((c * TILE + 4, 3), name, fill="black")
    for row, g in enumerate(chosen):
        b = image_of[g]
        image = batch.images[b].permute(1, 2, 0).cpu().numpy().copy()
        x1, y1, x2, y2 = (int(round(v)) for v in boxes[g])
        image[y1:y2, [x1, max(x2 - 1, x1)]] = (255, 40, 40)
        image[[y1, max(y2 - 1, y1)], x1:x2] = (255, 40, 40)
        pm = maps.pseudo
        pseudo = np.where(up(pm.weight[g]) > 0, up(pm.target[g]), 0.5)
        tiles = [image, up(maps.m_sem[g]), up(maps.m_inst[g]), pseudo, gt_masks[g]]
        for c, tile in enumerate(tiles):
            crop = _crop(tile.astype(np.float32) if tile.dtype == bool else tile, boxes[g],
                         (height, width))
            sheet.paste(_tile(crop), (c * TILE, header + row * TILE))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return out_png
