"""A picture of SIM at work: M_S, M_I and the pseudo mask of a few instances next to the truth.

Called by ``benchmarks/quality.py`` at the end of a SIM run (``train(cfg, on_end=...)``), with
the trained student, its EMA teacher and prototypes. Each row is one validation instance,
cropped around its box (shown at 4x the mask grid, nearest neighbour):

    image + box | M_S (prototypes) | M_I (teacher, IoU-weighted) | pseudo mask | ground truth

The pseudo mask shows ``M_hat`` in white, the confident background (``W`` = 1, target 0) in
black and the ignored band (``W`` = 0 inside the box) in grey, as the pseudo loss sees it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from serving.model import CondInst
from training.config import TrainConfig
from training.criterion import fcos_assign_batch, targets_from_batch
from training.data import CocoInstanceDataset
from training.data.augment import ResizeShortestEdge
from training.data.collate import collate
from training.sim_step import SIMState, compute_sim_maps

TILE = 112
COLUMNS = ("image + box", "M_S", "M_I", "pseudo mask", "ground truth")


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
    if not cfg.data.val_json or not cfg.data.val_images:
        raise ValueError("the SIM figure needs data.val_json and data.val_images")
    device = next(model.parameters()).device
    data = CocoInstanceDataset(cfg.data.val_json, cfg.data.val_images, mode="mask",
                               transform=ResizeShortestEdge(cfg.inference.min_size,
                                                            cfg.inference.max_size))
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
