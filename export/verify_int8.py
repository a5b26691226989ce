"""Verify an INT8 export against fp32 PyTorch, with INT8 tolerances.

The fp32 check (:func:`export.verify.verify_export`) asks for the same detections, boxes within
0.5 px and mask IoU >= 0.99. INT8 rounding moves scores a little, so detections near the score
threshold or an NMS decision legitimately come and go; the INT8 check therefore judges the
**confident** detections and averages over all images:

- detection agreement: detections of either model scoring >= ``score`` (0.3) that the other
  model also finds (same class, box IoU >= 0.5, at any score above the threshold), as a
  fraction of all such detections: (matched PyTorch + matched INT8) / (PyTorch + INT8);
- box error: for matched confident pairs, the largest coordinate difference relative to the
  PyTorch box's longer side (the 90th percentile over pairs; also reported in pixels);
- mask IoU: mean over matched confident pairs, and mean over prompt boxes in prompt mode.

>>> report = verify_int8("model.safetensors", "exported/model.int8.json", images)
>>> print(report.table()); report.raise_if_failed()
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serving import Segmenter
from serving.backends.exported import StaticShapeBackend
from serving.inference.images import ImageLike, load_image
from serving.model.ops import box_iou_pairwise
from serving.model_config import config_to_dict
from serving.prediction import Prediction

from .verify import VerificationError, default_prompts, mask_iou


@dataclass(frozen=True)
class Int8Tolerances:
    """Pass criteria of an INT8 export (see the module docstring)."""

    score: float = 0.3
    min_agreement: float = 0.9
    max_box_error: float = 0.05
    min_mask_iou: float = 0.85
    min_prompt_iou: float = 0.85


INT8_TOLERANCES = Int8Tolerances()


@dataclass
class Int8Row:
    """One image: confident detections of each model, matches, errors, IoUs."""

    image: str
    torch_confident: int
    export_confident: int
    matched_torch: int
    matched_export: int
    box_errors: list[float]
    box_errors_px: list[float]
    mask_ious: list[float]
    prompt_ious: list[float]


def _mean(values: Sequence[float], empty: float = 1.0) -> float:
    return float(np.mean(values)) if len(values) else empty


@dataclass
class Int8Report:
    """Rows plus the aggregate figures the tolerances judge."""

    rows: list[Int8Row] = field(default_factory=list)
    tolerances: Int8Tolerances = INT8_TOLERANCES

    @property
    def agreement(self) -> float:
        total = sum(r.torch_confident + r.export_confident for r in self.rows)
        matched = sum(r.matched_torch + r.matched_export for r in self.rows)
        return 1.0 if total == 0 else matched / total

    @property
    def box_error(self) -> float:
        errors = [e for r in self.rows for e in r.box_errors]
        return float(np.percentile(errors, 90)) if errors else 0.0

    @property
    def mask_iou(self) -> float:
        return _mean([v for r in self.rows for v in r.mask_ious])

    @property
    def prompt_iou(self) -> float:
        return _mean([v for r in self.rows for v in r.prompt_ious])

    def checks(self) -> dict[str, tuple[float, str, float, bool]]:
        """name -> (value, comparison, limit, ok)."""
        t = self.tolerances
        return {
            "detection agreement": (self.agreement, ">=", t.min_agreement,
                                    self.agreement >= t.min_agreement),
            "box error (p90, of box size)": (self.box_error, "<=", t.max_box_error,
                                             self.box_error <= t.max_box_error),
            "mask IoU (automatic, mean)": (self.mask_iou, ">=", t.min_mask_iou,
                                           self.mask_iou >= t.min_mask_iou),
            "mask IoU (prompt, mean)": (self.prompt_iou, ">=", t.min_prompt_iou,
                                        self.prompt_iou >= t.min_prompt_iou),
        }

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(c[3] for c in self.checks().values())

    def table(self) -> str:
        """Per-image Markdown table, then the aggregate checks and the verdict."""
        lines = [f"| image | torch >= {self.tolerances.score} | int8 >= {self.tolerances.score} "
                 "| matched | mean box err (px) | mean mask IoU | mean prompt IoU |",
                 "|---|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r.image} | {r.torch_confident} | {r.export_confident} | "
                         f"{r.matched_torch}/{r.matched_export} | {_mean(r.box_errors_px, 0):.2f}"
                         f" | {_mean(r.mask_ious):.3f} | {_mean(r.prompt_ious):.3f} |")
        lines.append("")
        for name, (value, op, limit, ok) in self.checks().items():
            lines.append(f"- {name}: {value:.3f} ({op} {limit}: {'ok' if ok else 'FAIL'})")
        lines.append(f"\n{'PASS' if self.passed else 'FAIL'} (INT8 tolerances)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "precision": "int8",
                "tolerances": asdict(self.tolerances),
                "checks": {k: {"value": v[0], "limit": v[2], "ok": v[3]}
                           for k, v in self.checks().items()},
                "rows": [asdict(r) for r in self.rows]}

    def raise_if_failed(self) -> None:
        if not self.passed:
            bad = [k for k, v in self.checks().items() if not v[3]] or ["no images"]
            raise VerificationError(
                f"INT8 export differs from PyTorch beyond the INT8 tolerances ({', '.join(bad)});"
                " calibrate on more representative images (--calibration) or keep more in fp32"
            )


def match_confident(ref: Prediction, got: Prediction, score: float,
                    min_iou: float = 0.5) -> list[tuple[int, int]]:
    """Greedy one-to-one pairs (i in ``ref``, j in ``got``): same label, box IoU >= ``min_iou``,
    at least one of the two scoring >= ``score``; highest IoU first."""
    if not len(ref) or not len(got):
        return []
    iou = box_iou_pairwise(torch.from_numpy(ref.boxes)[:, None],
                           torch.from_numpy(got.boxes)[None, :]).numpy()  # (N_ref, N_got)
    ok = (ref.labels[:, None] == got.labels[None, :]) & (iou >= min_iou)
    ok &= (ref.scores[:, None] >= score) | (got.scores[None, :] >= score)
    pairs, used_i, used_j = [], set(), set()
    for flat in np.argsort(-np.where(ok, iou, -1.0), axis=None):
        i, j = divmod(int(flat), iou.shape[1])
        if not ok[i, j]:
            break
        if i in used_i or j in used_j:
            continue
        used_i.add(i)
        used_j.add(j)
        pairs.append((i, j))
    return pairs


def compare_int8(label: str, ref: Prediction, got: Prediction, score: float) -> Int8Row:
    """Automatic-mode figures of one image (prompt IoUs are filled in by the caller)."""
    pairs = match_confident(ref, got, score)
    conf_ref, conf_got = ref.scores >= score, got.scores >= score
    row = Int8Row(label, int(conf_ref.sum()), int(conf_got.sum()),
                  sum(bool(conf_ref[i]) for i, _ in pairs),
                  sum(bool(conf_got[j]) for _, j in pairs), [], [], [], [])
    for i, j in pairs:
        if not conf_ref[i]:
            continue
        diff = float(np.abs(ref.boxes[i] - got.boxes[j]).max())
        side = float(max(ref.boxes[i, 2] - ref.boxes[i, 0], ref.boxes[i, 3] - ref.boxes[i, 1]))
        row.box_errors_px.append(diff)
        row.box_errors.append(diff / max(side, 1.0))
        row.mask_ious.append(mask_iou(ref.masks[i], got.masks[j]))
    return row


def verify_int8(checkpoint: str | os.PathLike, exported: str | os.PathLike | Segmenter,
                images: Sequence[ImageLike], *, device: str = "cpu",
                prompts: Sequence[np.ndarray] | None = None,
                tolerances: Int8Tolerances = INT8_TOLERANCES,
                raise_on_failure: bool = False) -> Int8Report:
    """Run fp32 PyTorch and the INT8 export on ``images`` (both modes) and judge the INT8
    export with ``tolerances``. Arguments as :func:`export.verify.verify_export`."""
    seg = exported if isinstance(exported, Segmenter) else \
        Segmenter.from_onnx(exported, device=device)
    torch_seg = Segmenter.from_checkpoint(checkpoint, device=device, **config_to_dict(seg.cfg))
    if isinstance(seg.backend, StaticShapeBackend):  # same canvas as the export
        b = seg.backend
        torch_seg.backend = StaticShapeBackend(torch_seg.backend, b.batch, b.height, b.width)
    report = Int8Report(tolerances=tolerances)
    for index, item in enumerate(images):
        label = Path(item).name if isinstance(item, (str, os.PathLike)) else f"image {index}"
        array = load_image(item)
        row = compare_int8(label, torch_seg.predict(array), seg.predict(array), tolerances.score)
        boxes = prompts[index] if prompts is not None else default_prompts(*array.shape[:2])
        ref, got = torch_seg.predict(array, boxes=boxes), seg.predict(array, boxes=boxes)
        row.prompt_ious = [mask_iou(a, b) for a, b in zip(ref.masks, got.masks)]
        report.rows.append(row)
    if raise_on_failure:
        report.raise_if_failed()
    return report
