"""``sim quickstart [--data synthetic|nuclei]``: the whole product path on built-in data.

1. data: generate the synthetic dataset (or convert the real napari nuclei slices); training
   reads boxes only, the masks are kept for evaluation;
2. train: the quickstart model (MobileNetV2-FPN, offline ImageNet weights, SIM);
3. evaluate: COCO mask and box AP on the validation split, next to the untrained model;
4. export: ONNX with the default exporter, verified against PyTorch on validation images;
5. predict: the batch command line on validation images, automatically and with the
   validation boxes as prompts, with pictures;
6. label: auto-label the validation boxes and measure the labels against the withheld masks.

Each stage prints one line with its time; a stage that fails stops the run with a message
naming it and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.errors import SimError

from .train_config import TrainConfig, load_config

CONFIGS = {"synthetic": "configs/quickstart_cpu.yaml", "nuclei": "configs/quickstart_nuclei.yaml"}
#: Validation images the predict stage segments.
PREDICT_IMAGES = 6


class StageError(SimError):
    """A quickstart stage failed; the message names the stage."""


@dataclass
class Run:
    """What the stages share: the config, where things go, what earlier stages produced."""

    cfg: TrainConfig
    config_path: str
    overrides: list[str]
    out: Path
    results: dict[str, Any] = field(default_factory=dict)


def _sub(stage: str, cmd: list[str]) -> None:
    """Run a command of a package above training (``python -m export``: training never
    imports export) as a user would, and fail the stage on a bad exit."""
    print("  $ " + " ".join(cmd), flush=True)
    code = subprocess.call(cmd)
    if code != 0:
        raise StageError(f"stage '{stage}' failed: `{' '.join(cmd[:4])} ...` exited with "
                         f"{code}; see its messages above")


def _command(stage: str, name: str, main: Callable[..., int], argv: list[str]) -> None:
    """Run the library's command ``sim <name> argv`` in this process through its Python
    entry ``main`` and fail the stage on a non-zero exit code (bad arguments included)."""
    print(f"  $ sim {name} " + " ".join(argv), flush=True)
    try:
        code = main(argv, prog=f"sim {name}")
    except SystemExit as exc:  # argparse rejected the arguments
        code = exc.code if isinstance(exc.code, int) else 2
    if code != 0:
        raise StageError(f"stage '{stage}' failed: `sim {name}` exited with {code}; see its "
                         "messages above")


def stage_data(run: Run) -> str:
    train_json = Path(run.cfg.data.train_json)
    if train_json.is_file():
        return f"{train_json.parent} (already there)"
    if "nuclei" in run.config_path:
        from .data.nuclei import convert_nuclei

        stats = convert_nuclei(train_json.parent)["stats"]
        return f"{train_json.parent}: " + ", ".join(f"{k} {n} images / {m} nuclei"
                                                    for k, (n, m) in stats.items())
    from .data.synthetic import generate_dataset

    d = run.cfg.data
    generate_dataset(train_json.parent, d.synthetic_images, seed=d.synthetic_seed,
                     size=d.synthetic_size)
    return f"{train_json.parent}: {d.synthetic_images} synthetic images"


def stage_train(run: Run) -> str:
    from .train import train

    result = train(run.cfg)
    run.results["checkpoint"] = result["checkpoint"]
    run.results["trained"] = result["metrics"]
    return result["checkpoint"]


def stage_evaluate(run: Run) -> str:
    from .evaluate import evaluate_untrained

    fresh = load_config(run.config_path, run.overrides)
    run.results["untrained"] = untrained = evaluate_untrained(
        fresh, run.out / "model_untrained.safetensors")
    trained = run.results["trained"]
    return (f"mask AP {trained.get('segm/AP', float('nan')):.1f} trained vs "
            f"{untrained.get('segm/AP', float('nan')):.1f} untrained (box AP "
            f"{trained.get('bbox/AP', float('nan')):.1f} vs "
            f"{untrained.get('bbox/AP', float('nan')):.1f})")


def _val_images(run: Run) -> list[str]:
    val = json.loads(Path(run.cfg.data.val_json).read_text())
    return [str(Path(run.cfg.data.val_images) / img["file_name"])
            for img in val["images"][:PREDICT_IMAGES]]


def stage_export(run: Run) -> str:
    folder = run.out / "export"
    _sub("export", [sys.executable, "-m", "export", "--model",
                    run.results["checkpoint"], "--output", str(folder), "--verify",
                    *_val_images(run)[:2]])
    return f"{folder} (verified against PyTorch)"


def stage_predict(run: Run) -> str:
    ckpt, images = run.results["checkpoint"], _val_images(run)
    auto, prompted = run.out / "predictions", run.out / "predictions_prompted"
    from serving.cli.predict import main as predict

    base = ["--model", ckpt, "--input", *images, "--save-vis", "--no-progress"]
    _command("predict", "predict", predict, [*base, "--output", str(auto)])
    _command("predict", "predict", predict,
             [*base, "--boxes", run.cfg.data.val_json, "--output", str(prompted)])
    run.results["pictures"] = [str(auto / "vis"), str(prompted / "vis")]
    return f"{auto / 'vis'} (automatic), {prompted / 'vis'} (box-prompted)"


def stage_label(run: Run) -> str:
    out = run.out / "labelled_val.json"
    from serving.cli.label import main as label

    _command("label", "label", label, [
        "--model", run.results["checkpoint"], "--annotations", run.cfg.data.val_json,
        "--images", run.cfg.data.val_images, "--output", str(out), "--evaluate",
        "--no-progress", "--overwrite"])
    return str(out)


STAGES: list[tuple[str, Callable[[Run], str]]] = [
    ("data", stage_data), ("train", stage_train), ("evaluate", stage_evaluate),
    ("export", stage_export), ("predict", stage_predict), ("label", stage_label)]


def run_stages(run: Run) -> dict[str, float]:
    """Run every stage, printing one line each; returns seconds per stage."""
    times: dict[str, float] = {}
    for i, (name, stage) in enumerate(STAGES, 1):
        print(f"[{i}/{len(STAGES)}] {name} ...", flush=True)
        start = time.perf_counter()
        try:
            what = stage(run)
        except StageError:
            raise
        except SimError as exc:
            raise StageError(f"stage '{name}' failed: {exc}") from None
        times[name] = round(time.perf_counter() - start, 1)
        print(f"[{i}/{len(STAGES)}] {name:<8} {times[name]:7.1f} s  {what}", flush=True)
    return times


def main(argv: Sequence[str] | None = None, prog: str = "python -m training.quickstart") -> int:
    """``sim quickstart``; ``prog`` is the name its ``--help`` shows. Returns the exit code."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  sim quickstart                 # synthetic shapes, ~5-10 min on "
               "2 CPU cores\n  sim quickstart --data nuclei   # real fluorescence nuclei\n"
               "  sim quickstart optim.max_iter=100   # shorter training")
    parser.add_argument("--data", choices=sorted(CONFIGS), default="synthetic",
                        help="built-in dataset (default: synthetic)")
    parser.add_argument("--config", default=None, help="training config (default: the data's)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = parser.parse_args(argv)
    config = args.config or CONFIGS[args.data]
    start = time.perf_counter()
    try:
        cfg = load_config(config, args.overrides)
        run = Run(cfg, config, list(args.overrides), Path(cfg.output_dir))
        times = run_stages(run)
    except SimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    total = round(time.perf_counter() - start, 1)
    summary = {"trained": run.results["trained"], "untrained": run.results["untrained"],
               "seconds": {**times, "total": total}}
    (run.out / "quickstart_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nquickstart done in {total:.0f} s. Pictures: {run.results['pictures'][0]} and "
          f"{run.results['pictures'][1]}; model: {run.results['checkpoint']}; summary: "
          f"{run.out / 'quickstart_summary.json'}; tensorboard --logdir {run.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
