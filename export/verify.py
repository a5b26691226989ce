"""Compare an exported model with PyTorch on the same images, in both modes.

For every image, the PyTorch ``Segmenter`` (from the checkpoint, with the export's inference
settings) and the exported one run automatic segmentation and box-prompted segmentation with
a few boxes. Automatic detections are matched per image (same label, nearest box); the report
gives counts, matched detections, the largest box difference (pixels, original image), the
smallest per-instance mask IoU and the largest score difference, as a table. fp32 exports
pass when every image has the same detections, boxes within 0.5 px and mask IoU >= 0.99.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serving import Segmenter
from serving.backends.exported import StaticShapeBackend
from serving.errors import InputError, SimError
from serving.inference.images import IMAGE_EXTENSIONS, ImageLike, load_image
from serving.model_config import config_to_dict
from serving.prediction import Prediction


class VerificationError(SimError):
    """The exported model does not reproduce PyTorch within the tolerances."""


@dataclass
class VerifyRow:
    """One image in one mode ("automatic" or "prompt")."""

    image: str
    mode: str
    torch_count: int
    export_count: int
    matched: int
    max_box_diff: float
    min_mask_iou: float
    max_score_diff: float
    ok: bool


@dataclass
class VerifyReport:
    """All rows plus the tolerances they were judged with."""

    rows: list[VerifyRow] = field(default_factory=list)
    box_tolerance: float = 0.5
    min_iou: float = 0.99

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)

    def table(self) -> str:
        """A Markdown table, one row per image and mode."""
        lines = ["| image | mode | torch | export | matched | max box diff (px) | "
                 "min mask IoU | max score diff | ok |", "|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r.image} | {r.mode} | {r.torch_count} | {r.export_count} | "
                         f"{r.matched} | {r.max_box_diff:.4f} | {r.min_mask_iou:.4f} | "
                         f"{r.max_score_diff:.2e} | {'yes' if r.ok else 'NO'} |")
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(f"\n{verdict}: same detections, boxes within {self.box_tolerance} px, "
                     f"mask IoU >= {self.min_iou}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "box_tolerance": self.box_tolerance,
                "min_iou": self.min_iou, "rows": [asdict(r) for r in self.rows]}

    def raise_if_failed(self) -> None:
        if not self.passed:
            bad = [f"{r.image} ({r.mode})" for r in self.rows if not r.ok]
            raise VerificationError(
                f"exported model differs from PyTorch on {', '.join(bad) or 'no images'}; "
                "see the table above"
            )


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def compare_automatic(ref: Prediction, got: Prediction) -> tuple[int, float, float, float]:
    """Greedy matching: each PyTorch detection (in score order) takes the unmatched exported
    detection of the same label with the smallest max-abs box difference.

    Returns:
        (matched pairs, max box diff, min mask IoU, max score diff) over the pairs.
    """
    used = np.zeros(len(got), dtype=bool)
    box_diff, ious, score_diff = [0.0], [1.0], [0.0]
    matched = 0
    for i in range(len(ref)):
        cand = np.flatnonzero(~used & (got.labels == ref.labels[i]))
        if not len(cand):
            continue
        diffs = np.abs(got.boxes[cand] - ref.boxes[i]).max(axis=1)
        j = cand[int(diffs.argmin())]
        used[j] = True
        matched += 1
        box_diff.append(float(diffs.min()))
        ious.append(mask_iou(ref.masks[i], got.masks[j]))
        score_diff.append(abs(float(ref.scores[i]) - float(got.scores[j])))
    return matched, max(box_diff), min(ious), max(score_diff)


def default_prompts(height: int, width: int) -> np.ndarray:
    """Three prompt boxes (XYXY, original pixels): the centre half and two quadrants."""
    return np.array([[width / 4, height / 4, 3 * width / 4, 3 * height / 4],
                     [0, 0, width / 2, height / 2],
                     [width / 2, height / 2, width, height]], dtype=np.float32)


def collect_images(items: Sequence[str | os.PathLike]) -> list[Path]:
    """Files and folders (their images) -> image paths; missing paths raise ``InputError``."""
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            paths += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            paths.append(p)
        else:
            raise InputError(f"verify image {p}: not found; pass image files or folders")
    if not paths:
        raise InputError("verify: no images found; pass image files or a folder of images")
    return paths


def _as_segmenter(exported: str | os.PathLike | Segmenter, device: str) -> Segmenter:
    if isinstance(exported, Segmenter):
        return exported
    suffix = Path(exported).suffix.lower()
    if suffix in (".engine", ".plan", ".trt"):
        return Segmenter.from_tensorrt(exported)
    return Segmenter.from_onnx(exported, device=device)


def verify_export(checkpoint: str | os.PathLike, exported: str | os.PathLike | Segmenter,
                  images: Sequence[ImageLike], *, device: str = "cpu",
                  prompts: Sequence[np.ndarray] | None = None, box_tolerance: float = 0.5,
                  min_iou: float = 0.99, raise_on_failure: bool = False) -> VerifyReport:
    """Run PyTorch and the exported model on ``images`` and compare them.

    Args:
        checkpoint: the ``.safetensors`` checkpoint the export came from.
        exported: the export's sidecar / ``.onnx`` / ``.engine`` path, or a ``Segmenter``.
        images: paths, bytes, PIL images or (H, W, 3) uint8 RGB arrays.
        prompts: optional (M, 4) prompt boxes per image (original pixels); default
            :func:`default_prompts`.
        box_tolerance / min_iou: pass criteria (fp32 defaults 0.5 px and 0.99).
        raise_on_failure: raise :class:`VerificationError` when the report fails.
    """
    export_seg = _as_segmenter(exported, device)
    overrides = config_to_dict(export_seg.cfg)
    torch_seg = Segmenter.from_checkpoint(checkpoint, device=device, **overrides)
    if isinstance(export_seg.backend, StaticShapeBackend):  # same canvas as the export
        b = export_seg.backend
        torch_seg.backend = StaticShapeBackend(torch_seg.backend, b.batch, b.height, b.width)
    report = VerifyReport(box_tolerance=box_tolerance, min_iou=min_iou)
    for index, item in enumerate(images):
        label = Path(item).name if isinstance(item, (str, os.PathLike)) else f"image {index}"
        array = load_image(item)
        ref, got = torch_seg.predict(array), export_seg.predict(array)
        matched, box_diff, iou, score_diff = compare_automatic(ref, got)
        ok = (len(ref) == len(got) == matched and box_diff <= box_tolerance and iou >= min_iou)
        report.rows.append(VerifyRow(label, "automatic", len(ref), len(got), matched, box_diff,
                                     iou, score_diff, ok))
        boxes = prompts[index] if prompts is not None else default_prompts(*array.shape[:2])
        ref, got = torch_seg.predict(array, boxes=boxes), export_seg.predict(array, boxes=boxes)
        same = int((ref.labels == got.labels).sum())
        ious = [mask_iou(a, b) for a, b in zip(ref.masks, got.masks)] or [1.0]
        score_diff = float(np.abs(ref.scores - got.scores).max()) if len(ref) else 0.0
        ok = len(ref) == len(got) == same and min(ious) >= min_iou
        report.rows.append(VerifyRow(label, "prompt", len(ref), len(got), same, 0.0, min(ious),
                                     score_diff, ok))
    if raise_on_failure:
        report.raise_if_failed()
    return report
