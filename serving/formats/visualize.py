"""Drawing predictions: masks, boxes and labels over the image (used by the CLI and the app)."""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..masks import outline
from ..prediction import Prediction, format_score


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 distinct colours (golden-ratio hue steps, fixed order)."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    return np.array([[int(255 * c) for c in colorsys.hsv_to_rgb(h, 0.75, 1.0)] for h in hues],
                    dtype=np.uint8).reshape(n, 3)


def text_size(height: int, width: int) -> int:
    """Label font size in pixels for an image: about 1/40 of its shorter side, 10-48."""
    return int(min(max(round(min(height, width) / 40), 10), 48))


def draw_predictions(image: np.ndarray, pred: Prediction, alpha: float = 0.5,
                     show_boxes: bool = True, show_labels: bool = True) -> np.ndarray:
    """Overlay ``pred`` on ``image``: each mask blended in its colour with its outline drawn
    solid (so small and thin masks stay visible), its box, and a label ``class score`` sized
    to the image, placed above the box (below it at the top edge).

    Args:
        image: (H, W, 3) uint8 RGB, the original image the prediction refers to.
        pred: masks and boxes in the frame of ``image``.
        alpha: mask opacity.
        show_boxes / show_labels: draw the boxes / the labels.

    Returns:
        (H, W, 3) uint8 RGB picture.
    """
    if image.shape[:2] != pred.image_size and len(pred):
        raise ValueError(f"image {image.shape[:2]} and prediction {pred.image_size} sizes differ")
    out = image.astype(np.float32)
    colors = palette(max(len(pred), 1))
    masks = pred.instance_masks
    for i in range(len(pred)):  # blend each mask inside its crop only
        y0, x0, y1, x1 = masks.box(i)
        region, m = out[y0:y1, x0:x1], masks.crops[i]
        region[m] = region[m] * (1 - alpha) + colors[i].astype(np.float32) * alpha
        region[outline(m)] = colors[i]
    canvas = Image.fromarray(np.rint(out).clip(0, 255).astype(np.uint8))  # round, not floor
    draw = ImageDraw.Draw(canvas)
    h, w = image.shape[:2]
    size = text_size(h, w)
    font = ImageFont.load_default(size=size)
    line = max(1, size // 8)
    names = pred.label_names
    for i in range(len(pred)):
        color = tuple(int(c) for c in colors[i])
        x1, y1, x2, y2 = (float(v) for v in pred.boxes[i])
        if show_boxes:
            draw.rectangle([x1, y1, x2, y2], outline=color, width=line)
        if show_labels:
            text = f"{names[i]} {format_score(float(pred.scores[i]))}"
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            ty = y1 - (bottom - top) - 2 if y1 >= (bottom - top) + 2 else y2 + 2
            tx = min(max(x1, 0), max(w - (right - left), 0))
            bbox = draw.textbbox((tx, ty), text, font=font)
            draw.rectangle(bbox, fill=(0, 0, 0))
            draw.text((tx, ty), text, fill=color, font=font)
    return np.asarray(canvas)


def masks_to_label_image(pred: Prediction) -> np.ndarray:
    """(H, W) uint16 instance-id image: 0 background, i + 1 for instance i (later ones on top)."""
    out = np.zeros(pred.image_size, dtype=np.uint16)
    masks = pred.instance_masks
    for i in range(len(pred)):
        y0, x0, y1, x1 = masks.box(i)
        out[y0:y1, x0:x1][masks.crops[i]] = i + 1
    return out
