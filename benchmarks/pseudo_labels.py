"""How right SIM's pseudo labels are: a trained run's teacher targets scored against the truth.

    python benchmarks/pseudo_labels.py runs/bench_2400/synthetic/pseudo/s0 [RUN ...] \\
        --alphas 0 0.5 1 --name pseudo_labels_2400 [--set sim.tau_high_range=[0.7,0.8]]

For each run folder (a SIM training run of ``training.train`` with a checkpoint folder), the
latest checkpoint's EMA teacher and prototypes compute M_I, M_S and the pseudo masks of every
validation box exactly as a training step does (``compute_sim_maps`` on the validation images,
resized as at inference; positives assigned on the teacher's outputs), once per ``alpha``. The
labels are then compared with the ground-truth masks on the stride-4 mask grid, inside the
boxes, where the pseudo loss acts:

- ``fg precision``: share of pixels labelled foreground (``M_hat = 1``) that are object;
- ``object -> fg / bg``: shares of the object's pixels labelled foreground / confident
  background (the rest is the ignored band, ``W = 0``);
- ``background -> fg / bg``: the same for the box's background pixels (other objects included),
  with ``background -> fg`` split into ``near`` (within one stride-4 cell, 4 px, of the object:
  boundary blur) and ``far`` (holes, concavities, box corners);
- per class, ``background -> fg``; the teacher's calibration (the share of object among the
  box pixels in each M_I bin: how right its confident pixels are, whatever the threshold); and
  the mean M_S and M_I on object and background pixels.

It reads the validation masks: a diagnostic of the method, not part of box supervision. Writes
``benchmarks/results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Bin edges of the teacher-calibration table (M_I inside the boxes).
CALIBRATION_EDGES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)

#: Columns of :func:`count_labels`, pixel counts inside the boxes.
COUNTS = ("object", "object_fg", "object_bg", "background", "background_fg", "background_bg",
          "near", "near_fg")


def count_labels(target: Tensor, weight: Tensor, box: Tensor, gt: Tensor, labels: Tensor,
                 num_classes: int) -> Tensor:
    """Pixel counts of pseudo labels against the truth, inside the boxes, summed per class.

    Args:
        target: ``(G, h, w)`` pseudo mask ``M_hat`` in {0, 1} (float or bool).
        weight: ``(G, h, w)`` weight ``W`` in {0, 1}: labelled pixels (foreground or confident
            background).
        box: ``(G, h, w)`` box masks in {0, 1}.
        gt: ``(G, h, w)`` ground-truth masks in {0, 1}, same grid.
        labels: ``(G,)`` int64 class index of each box.
        num_classes: ``C``.

    Returns:
        ``(C, len(COUNTS))`` float64 counts, columns as in :data:`COUNTS`. ``near`` background
        pixels touch the object in the 8-neighbourhood (one cell of the grid).
    """
    box, gt = box > 0, gt > 0
    fg = (target > 0) & (weight > 0) & box
    bg = (target <= 0) & (weight > 0) & box
    obj, back = gt & box, ~gt & box
    near = back & (F.max_pool2d(gt[:, None].float(), 3, 1, 1)[:, 0] > 0)
    per_box = torch.stack([m.flatten(1).sum(1) for m in (
        obj, fg & obj, bg & obj, back, fg & back, bg & back, near, fg & near)], dim=1)
    out = torch.zeros(num_classes, len(COUNTS), dtype=torch.float64, device=per_box.device)
    return out.index_add_(0, labels, per_box.double()).cpu()


def calibration_counts(values: Tensor, edges: Tensor) -> Tensor:
    """How many of ``values`` fall in each bin ``[edges[k], edges[k+1])`` (the last bin closed
    at 1.0). Returns ``(len(edges) - 1,)`` float64."""
    # Edges in the values' dtype, so a float32 0.95 lands in the bin that starts at 0.95.
    values = values.cpu()
    index = torch.bucketize(values, edges.to(values.dtype), right=True) - 1
    index = index.clamp(0, len(edges) - 2)
    return torch.bincount(index, minlength=len(edges) - 1).double()


def summarise(counts: Tensor) -> dict[str, float]:
    """Shares from :func:`count_labels` rows summed over classes (``(len(COUNTS),)``)."""
    c = dict(zip(COUNTS, counts.tolist(), strict=True))

    def share(a: float, b: float) -> float:
        return a / b if b > 0 else float("nan")

    far, far_fg = c["background"] - c["near"], c["background_fg"] - c["near_fg"]
    return {"fg_precision": share(c["object_fg"], c["object_fg"] + c["background_fg"]),
            "bg_precision": share(c["background_bg"], c["background_bg"] + c["object_bg"]),
            "object_fg": share(c["object_fg"], c["object"]),
            "object_bg": share(c["object_bg"], c["object"]),
            "background_fg": share(c["background_fg"], c["background"]),
            "background_bg": share(c["background_bg"], c["background"]),
            "near_fg": share(c["near_fg"], c["near"]), "far_fg": share(far_fg, far),
            "object_pixels": c["object"], "background_pixels": c["background"]}


@torch.no_grad()
def pseudo_label_quality(sim: Any, cfg: Any, alphas: tuple[float, ...] = (0.0, 0.5, 1.0),
                         max_images: int | None = None, batch_size: int = 8) -> dict[str, Any]:
    """Score the pseudo labels of ``sim`` (a :class:`training.sim.iteration.SIMState`) on the
    validation split of ``cfg`` for each alpha; see the module docstring for the measures."""
    from benchmarks.sim_figure import val_dataset
    from training.data.collate import collate
    from training.losses.criterion import fcos_assign_batch, targets_from_batch
    from training.sim.iteration import compute_sim_maps
    from training.sim.pseudo import pseudo_masks

    teacher = sim.teacher.module
    device = next(teacher.parameters()).device
    data = val_dataset(cfg)
    num_classes = cfg.model.num_classes
    counts = {a: torch.zeros(num_classes, len(COUNTS), dtype=torch.float64) for a in alphas}
    means = torch.zeros(4, dtype=torch.float64)  # sums of M_S, M_I on object, background
    edges = torch.tensor(CALIBRATION_EDGES, dtype=torch.float64)
    calib = torch.zeros(2, len(edges) - 1, dtype=torch.float64)  # object, background per bin
    n_img = len(data) if max_images is None else min(max_images, len(data))
    for start in range(0, n_img, batch_size):
        batch = collate([data[i] for i in range(start, min(start + batch_size, n_img))])
        batch = batch.to(device)
        height, width = batch.images.shape[-2:]
        targets = targets_from_batch(batch.boxes, batch.labels, height, width)
        x = teacher.normalize(batch.images, batch.valid)
        out = sim.teacher(x)
        _, _, pos = fcos_assign_batch(out, targets, cfg.boxinst.topk_proposals_per_image,
                                      cfg.inference.center_radius)
        maps = compute_sim_maps(sim, x, pos, targets, cfg, out)
        h, w = maps.m_inst.shape[-2:]
        gt = torch.cat(batch.masks)[:, 2::4, 2::4][:, :h, :w] > 0
        # Boxes without a positive location have no M_I (and no pseudo loss): left out.
        box = (maps.box_s4 > 0) & (torch.bincount(pos.gt_global, minlength=pos.num_gts)
                                   > 0)[:, None, None]
        for a in alphas:
            pm = pseudo_masks(maps.m_inst, maps.m_sem, maps.box_s4, a, cfg.sim.tau_low,
                              cfg.sim.tau_high_range)
            counts[a] += count_labels(pm.target, pm.weight, box, gt, pos.gt_labels, num_classes)
        for i, sel in enumerate((box & gt, box & ~gt)):  # object, then background pixels
            calib[i] += calibration_counts(maps.m_inst[sel], edges)
            means[2 * i] += maps.m_sem[sel].double().sum().cpu()
            means[2 * i + 1] += maps.m_inst[sel].double().sum().cpu()
    total = counts[alphas[0]].sum(0)
    obj, back = total[COUNTS.index("object")], total[COUNTS.index("background")]
    names = getattr(data, "class_names", None) or [str(c) for c in range(num_classes)]
    return {
        "images": n_img,
        "alphas": {str(a): {**summarise(counts[a].sum(0)),
                            "per_class_background_fg": {
                                names[c]: summarise(counts[a][c])["background_fg"]
                                for c in range(num_classes)
                                if counts[a][c, COUNTS.index("background")] > 0}}
                   for a in alphas},
        "m_inst_calibration": [
            {"low": float(edges[k]), "high": float(edges[k + 1]),
             "pixels": float(calib[:, k].sum()),
             "object_share": float(calib[0, k] / calib[:, k].sum()) if calib[:, k].sum() > 0
             else float("nan")} for k in range(len(edges) - 1)],
        "m_sem_object": float(means[0] / obj), "m_inst_object": float(means[1] / obj),
        "m_sem_background": float(means[2] / back), "m_inst_background": float(means[3] / back),
    }


def load_run(run_dir: str | Path, overrides: Sequence[str] = ()) -> tuple[Any, Any, int]:
    """``(cfg, sim, step)`` of a SIM run folder: its ``config.yaml`` (with ``overrides``, for
    example other thresholds to label with) and latest checkpoint's teacher, prototypes and
    bank, on the CPU. Relative data paths resolve from the repository root (where the
    benchmarks run)."""
    from serving.model import build_condinst
    from training.run_checkpoints import latest_checkpoint, load_sim_state
    from training.sim.iteration import SIMState
    from training.train_config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml; pass a training run's output_dir")
    cfg = load_config(run_dir / "config.yaml", overrides)
    if cfg.supervision != "box" or not cfg.sim.enabled:
        raise ValueError(f"{run_dir}: not a SIM run (supervision={cfg.supervision}, "
                         f"sim.enabled={cfg.sim.enabled}); pass a run trained with SIM")
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoints/step_* folder; train with "
                                "checkpoint_every > 0 or let the run finish")
    for key in ("val_json", "val_images"):
        value = getattr(cfg.data, key)
        if value and not Path(value).is_absolute():
            setattr(cfg.data, key, str(ROOT / value))
    sim = SIMState(build_condinst(cfg.model), cfg, torch.device("cpu"))
    load_sim_state(sim, checkpoint)
    return cfg, sim, int(checkpoint.name.split("_")[-1])


def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.0f}"


def to_markdown(results: list[dict[str, Any]], command: str) -> str:
    lines = ["# SIM's pseudo labels against the validation masks", "",
             f"Command: `{command}`", "",
             "Inside the validation boxes, on the stride-4 mask grid, in % of pixels. A trained "
             "run's EMA teacher and prototypes label the validation images as in a training "
             "step; fg = foreground label (`M_hat` = 1), bg = confident background (`W` = 1, "
             "`M_hat` = 0), the rest is ignored. near = background within one grid cell (4 px) "
             "of the object; far = the rest of the box's background.", "",
             "| run | iterations | alpha | fg precision | object -> fg | object -> bg | "
             "background -> fg (near / far) | background -> bg | bg precision |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for a, s in r["alphas"].items():
            lines.append(
                f"| `{r['run']}` | {r['step']} | {a} | {_pct(s['fg_precision'])} | "
                f"{_pct(s['object_fg'])} | {_pct(s['object_bg'])} | "
                f"{_pct(s['background_fg'])} ({_pct(s['near_fg'])} / {_pct(s['far_fg'])}) | "
                f"{_pct(s['background_bg'])} | {_pct(s['bg_precision'])} |")
    classes = list(next(iter(results[0]["alphas"].values()))["per_class_background_fg"])
    lines += ["", "Background labelled foreground, per class, at the run's own alpha:", "",
              "| run | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
    for r in results:
        own = r["alphas"][str(r["alpha"])]["per_class_background_fg"] \
            if str(r["alpha"]) in r["alphas"] else {}
        lines.append(f"| `{r['run']}` (alpha {r['alpha']}) | " +
                     " | ".join(_pct(own.get(c, float("nan"))) for c in classes) + " |")
    lines += ["", "Teacher calibration: share of object among the box pixels whose M_I falls in "
              "each bin (the pseudo loss labels foreground above tau_high, 0.7-0.8):", "",
              "| run | " + " | ".join(f"{c['low']:g}-{c['high']:g}"
                                     for c in results[0]["m_inst_calibration"]) + " |",
              "|---|" + "---|" * len(results[0]["m_inst_calibration"])]
    lines += [f"| `{r['run']}` | " + " | ".join(_pct(c["object_share"])
                                                for c in r["m_inst_calibration"]) + " |"
              for r in results]
    lines += ["", "Mean maps inside the boxes (object / background pixels):", "",
              "| run | M_S | M_I |", "|---|---|---|"]
    lines += [f"| `{r['run']}` | {r['m_sem_object']:.2f} / {r['m_sem_background']:.2f} | "
              f"{r['m_inst_object']:.2f} / {r['m_inst_background']:.2f} |" for r in results]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="SIM training run folders (output_dir)")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides for every run, e.g. the labelling thresholds "
                        "sim.tau_high_range=[0.7,0.8] to score runs trained with others")
    parser.add_argument("--name", default="pseudo_labels", help="results file name")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"),
                        help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    for run in args.runs:
        cfg, sim, step = load_run(run, args.set)
        quality = pseudo_label_quality(sim, cfg, tuple(args.alphas), args.max_images)
        results.append({"run": run, "step": step, "alpha": cfg.sim.alpha, **quality})
    command = "python benchmarks/pseudo_labels.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    text = to_markdown(results, command)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(
        {"command": command, "runs": results}, indent=2))
    (out / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
