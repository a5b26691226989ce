"""What ``sim label`` tells the user at the end: labels per class and per image, the empty or
near-empty masks, and where to look first.

A mask is *empty* when it covers fewer than ``EMPTY_FRACTION`` of its box (a box of a few
pixels, or an object the model did not see), or when it scores exactly 0 (the per-box scale's
fallback for a mask the model left empty, :mod:`serving.inference.box_scale`): it is counted
apart from the labelled masks and
flagged ``"sim_empty": true`` in the output annotation (or left unlabelled with
``--skip-empty``). The full table goes to ``<output>.report.json``; the terminal gets the
per-class lines and the images with the lowest mean score, the labels to inspect first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..masks import EMPTY_FRACTION, is_empty
from ..prediction import format_score

__all__ = ["EMPTY_FRACTION", "LabelReport", "Tally", "is_empty"]

#: Images listed in the terminal as "inspect first" (lowest mean score).
WORST_IMAGES = 5


@dataclass
class Tally:
    """Boxes, summed score and empty masks of one class or one image."""

    boxes: int = 0
    score: float = 0.0
    empty: int = 0

    def add(self, score: float, empty: bool) -> None:
        self.boxes += 1
        self.score += score
        self.empty += int(empty)

    def row(self) -> dict[str, Any]:
        mean = round(self.score / self.boxes, 3) if self.boxes else None
        return {"boxes": self.boxes, "mean_score": mean, "empty": self.empty}


@dataclass
class LabelReport:
    """Per-class and per-image tallies of a finished ``label`` run."""

    classes: dict[str, Tally] = field(default_factory=dict)
    images: dict[str, Tally] = field(default_factory=dict)
    empty: list[Any] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)

    def add(self, category: str, image: str, ann_id: Any, score: float, empty: bool) -> None:
        self.classes.setdefault(category, Tally()).add(score, empty)
        self.images.setdefault(image, Tally()).add(score, empty)
        self.scores.append(score)
        if empty:
            self.empty.append(ann_id)

    def worst_images(self, count: int = WORST_IMAGES) -> list[tuple[str, Tally]]:
        ranked = sorted(self.images.items(), key=lambda kv: kv[1].score / max(kv[1].boxes, 1))
        return ranked[:count]

    def lines(self) -> list[str]:
        """The terminal summary: one line per class, then the images to inspect first."""
        out = [f"  {'class':<16} {'boxes':>7} {'mean score':>10} {'empty':>6}"]
        for name, tally in sorted(self.classes.items()):
            row = tally.row()
            out.append(f"  {name:<16} {row['boxes']:>7} {row['mean_score']:>10.3f} "
                       f"{row['empty']:>6}")
        worst = self.worst_images()
        if worst:
            out.append("lowest mean score (inspect these labels first): " + ", ".join(
                f"{name} ({format_score(t.score / t.boxes)})" for name, t in worst))
        return out

    def write(self, path: Path) -> None:
        path.write_text(json.dumps({
            "empty_fraction": EMPTY_FRACTION,
            "classes": {k: v.row() for k, v in sorted(self.classes.items())},
            "images": {k: v.row() for k, v in self.images.items()},
            "empty_annotations": self.empty,
        }, indent=1), encoding="utf-8")
