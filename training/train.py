"""The training loop: ``accelerate launch -m training --config configs/<name>.yaml key=value``.

One flat loop on Hugging Face Accelerate (DDP on GPUs or CPU/gloo, bf16/fp16 autocast,
gradient accumulation), with checkpoints that resume everything: model, EMA teacher,
prototypes, optimizer, scheduler, iteration counters, RNG and the copy-paste memory bank
(:mod:`training.run_checkpoints`). Tests, benchmarks and tools look inside through callbacks
(:mod:`training.callbacks`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from serving import Segmenter
from serving.backends.torch_backend import TorchBackend
from serving.errors import SimError
from serving.files import check_writable_dir
from serving.model import build_condinst
from serving.model.card import Calibration
from serving.model.model_file import new_card, save_checkpoint
from serving.model_config import ModelConfig, config_to_dict
from serving.sharding.shards import multi_process_cpu

from .batch_losses import TrainingError, batch_losses, check_finite
from .callbacks import Callback, CallbackList, TrainingRun
from .data import CocoInstanceDataset
from .data.coco_dataset import CocoIndex, check_image_files
from .data.collate import Batch
from .data.loader import build_train_loader
from .evaluate import evaluate_model
from .optim import build_optimizer, build_scheduler
from .run_checkpoints import ResumePoint, restore, save_checkpoint_folder, select_resume_point
from .run_state import RunState
from .score_calibration import calibration, object_sizes
from .sim.iteration import SIMState
from .train_config import PRESET_HELP, TrainConfig, load_config, save_config

__all__ = ["TrainingError", "main", "train"]


def train(cfg: TrainConfig, resume: str | None = None,
          callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train ``cfg``; returns ``{"checkpoint": model_final path, "metrics": last evaluation,
    "step": steps done}``.

    Args:
        cfg: the experiment. ``cfg.model.num_classes`` is set from the training data.
        resume: a checkpoint folder, ``"auto"`` (the newest intact one of ``cfg.output_dir``)
            or None. The folder is checked in full before anything in the run folder changes.
        callbacks: called on every process at fixed points of the loop.
    """
    check_writable_dir(cfg.output_dir)  # a file or a read-only folder: refused before work
    accelerator = _make_accelerator(cfg)
    set_seed(cfg.seed)
    dataset = _load_dataset(cfg, accelerator)
    run = _build_run(cfg, accelerator, dataset)
    point = select_resume_point(cfg, resume, accelerator.num_processes,
                                accelerator.process_index, accelerator.print,
                                apply=lambda p: restore(run, p))
    _open_run_folder(run, point)
    hooks = CallbackList(callbacks)
    _train_loop(run, hooks)
    final = _finish(run, hooks)
    return {"checkpoint": str(final), "metrics": run.metrics, "step": run.state.step}


# --------------------------------------------------------------------------- setup
def _make_accelerator(cfg: TrainConfig) -> Accelerator:
    return Accelerator(cpu=multi_process_cpu(), mixed_precision=cfg.mixed_precision,
                       gradient_accumulation_steps=cfg.optim.grad_accum_steps,
                       log_with="tensorboard", project_dir=cfg.output_dir)


def _load_dataset(cfg: TrainConfig, accelerator: Accelerator) -> CocoInstanceDataset:
    """The training set (box mode never reads segmentations); generates the built-in
    synthetic data first when the config asks for it and it is missing. Sets
    ``cfg.model.num_classes`` from the data."""
    train_json = Path(cfg.data.train_json)
    if not train_json.is_file() and cfg.data.synthetic_images > 0:
        if accelerator.is_main_process:
            from .data.synthetic import generate_dataset

            generate_dataset(train_json.parent, cfg.data.synthetic_images,
                             seed=cfg.data.synthetic_seed, size=cfg.data.synthetic_size)
        accelerator.wait_for_everyone()
    mode = "mask" if cfg.supervision == "mask" else "box"
    dataset = CocoInstanceDataset(cfg.data.train_json, cfg.data.train_images, mode=mode)
    dataset.check_files()
    if cfg.data.val_json and cfg.data.val_images and Path(cfg.data.val_json).is_file():
        val = CocoIndex(cfg.data.val_json)
        check_image_files(val, cfg.data.val_images,
                          list(val.images)[:cfg.data.max_val_images])
    if cfg.model.num_classes != dataset.num_classes:
        cfg.model = ModelConfig(**{**config_to_dict(cfg.model), "num_classes": dataset.num_classes})
    return dataset


def _build_run(cfg: TrainConfig, accelerator: Accelerator,
               dataset: CocoInstanceDataset) -> TrainingRun:
    """Model, SIM state, optimizer and scheduler (prepared by Accelerate) and the data stream."""
    model = build_condinst(cfg.model)
    sim = None
    if cfg.uses_sim:
        all_reduce_sum = (lambda t: accelerator.reduce(t, "sum")) \
            if accelerator.num_processes > 1 else None
        sim = SIMState(model, cfg, accelerator.device, accelerator.process_index, all_reduce_sum)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim)
    prepared, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    loader = build_train_loader(dataset, cfg, accelerator.process_index,
                                accelerator.num_processes)
    return TrainingRun(cfg=cfg, accelerator=accelerator, model=prepared,
                       student=accelerator.unwrap_model(prepared), optimizer=optimizer,
                       scheduler=scheduler, sim=sim, state=RunState(), dataset=dataset,
                       loader=loader, output_dir=Path(cfg.output_dir))


def _open_run_folder(run: TrainingRun, point: ResumePoint | None) -> None:
    """Write the resolved config, start tensorboard and say what is being trained (after the
    resume checks, so a refused resume leaves the run folder untouched)."""
    acc = run.accelerator
    if point is not None:
        acc.print(f"resumed from {point.path} at step {run.state.step}")
    if acc.is_main_process:
        save_config(run.cfg, run.output_dir / "config.yaml")
        acc.init_trackers("tb", config=_flat_scalars(config_to_dict(run.cfg)))
        data = run.dataset
        acc.print(f"data: {len(data)} images, {data.num_classes} classes "
                  f"({data.num_skipped_images} images without boxes skipped)")


# --------------------------------------------------------------------------- the loop
class _Throughput:
    """Images per second between two log lines."""

    def __init__(self) -> None:
        self.start, self.images = time.perf_counter(), 0

    def rate(self) -> float:
        now = time.perf_counter()
        value = self.images / max(now - self.start, 1e-9)
        self.start, self.images = now, 0
        return value


def _train_loop(run: TrainingRun, hooks: Callback) -> None:
    """Epochs of batches until ``optim.max_iter`` optimiser steps are done."""
    bar = tqdm(total=run.cfg.optim.max_iter, initial=run.state.step, desc="train",
               disable=not run.accelerator.is_local_main_process, dynamic_ncols=True)
    speed = _Throughput()
    run.model.train()
    try:  # close the bar on errors too (NaN stop, Ctrl-C): no stray output later
        while run.state.step < run.cfg.optim.max_iter:
            for batch in run.loader.iterate(run.state):
                losses = _train_on_batch(run, batch, hooks, speed)
                if losses is None:  # gradients still accumulating
                    continue
                run.state.step += 1
                bar.update(1)
                _after_step(run, losses, bar, speed)
                hooks.on_step_end(run, losses)
                if run.state.step >= run.cfg.optim.max_iter:
                    break
            else:
                run.state.next_epoch()
    finally:
        bar.close()


def _train_on_batch(run: TrainingRun, batch: Batch, hooks: Callback,
                    speed: _Throughput) -> dict[str, torch.Tensor] | None:
    """Forward, backward and (at the end of an accumulation) the optimiser step of one batch;
    returns its losses when an optimiser step was taken, else None."""
    acc, cfg = run.accelerator, run.cfg
    batch = batch.to(acc.device)
    hooks.on_batch_start(run, batch)
    reduce_mean = (lambda t: acc.reduce(t, "mean")) if acc.num_processes > 1 else (lambda t: t)
    with acc.accumulate(run.model):
        losses = batch_losses(run.model, run.student, batch, cfg, run.state.step, run.sim,
                              reduce_mean)
        check_finite(losses, run.state.step, acc)
        acc.backward(sum(losses.values()))
        if acc.sync_gradients and cfg.optim.clip_grad_norm:
            acc.clip_grad_norm_(run.model.parameters(), cfg.optim.clip_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    run.state.batches_in_epoch += 1
    speed.images += len(batch) * acc.num_processes
    return losses if acc.sync_gradients else None


def _after_step(run: TrainingRun, losses: dict[str, torch.Tensor], bar: tqdm,
                speed: _Throughput) -> None:
    """EMA update, then the periodic work of the step just counted: logs, SIM's pictures,
    checkpoint, evaluation."""
    cfg, step = run.cfg, run.state.step
    if run.sim is not None:
        run.sim.after_step(run.student)
    if step % cfg.log_every == 0 or step == cfg.optim.max_iter:
        _log_scalars(run, losses, bar, speed)
    if run.sim is not None and cfg.log_images_every and step % cfg.log_images_every == 0 \
            and run.accelerator.is_main_process:
        run.sim.log_images(run.accelerator, step)
    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
        save_checkpoint_folder(run)
    if cfg.eval_every and step % cfg.eval_every == 0 and cfg.data.val_json:
        _evaluate(run)
        run.model.train()


def _log_scalars(run: TrainingRun, losses: dict[str, torch.Tensor], bar: tqdm,
                 speed: _Throughput) -> None:
    scalars = {k: float(v.detach()) for k, v in losses.items()}
    scalars["lr"] = run.scheduler.get_last_lr()[0]
    scalars["images_per_s"] = speed.rate()
    run.accelerator.log(scalars, step=run.state.step)
    shown = {k.replace("loss_", ""): f"{v:.3f}" for k, v in scalars.items()
             if k.startswith("loss_")}
    bar.set_postfix(shown | {"img/s": f"{scalars['images_per_s']:.1f}"})


# --------------------------------------------------------------------------- the end
def _finish(run: TrainingRun, hooks: Callback) -> Path:
    """Last checkpoint folder, the final evaluation, the final model (with its calibration),
    the callbacks' end."""
    cfg = run.cfg
    if run.saved_step != run.state.step:
        save_checkpoint_folder(run)
    if cfg.data.val_json and (not cfg.eval_every or run.state.step % cfg.eval_every):
        _evaluate(run)
    final = _save_final_model(run)
    hooks.on_train_end(run)
    run.accelerator.end_training()
    return final


def _save_final_model(run: TrainingRun) -> Path:
    """``model_final.safetensors``: the student's weights, its model and inference configs,
    class names and what the run knows about itself (``extra``: the training config, step,
    category ids and, after a validation, the calibration of :mod:`training.score_calibration`),
    written by the main process."""
    path = run.output_dir / "model_final.safetensors"
    if run.accelerator.is_main_process:
        card = new_card(run.cfg.model, run.dataset.class_names, run.cfg.inference,
                        made_by="train", category_ids=run.dataset.label_to_category_id,
                        calibration=_calibrate(run), step=run.state.step,
                        train_config=config_to_dict(run.cfg))
        save_checkpoint(path, run.student, card)
    run.accelerator.wait_for_everyone()
    return path


def _calibrate(run: TrainingRun) -> Calibration | None:
    """The model's calibration from the last validation (None without one)."""
    cfg = run.cfg
    if not cfg.data.val_json or not run.metrics:
        return None
    run.student.eval()
    device = next(run.student.parameters()).device
    # the training objects' sizes in the card, so box prompts run at the per-box scale a
    # loaded model uses and the prompted scores are those `sim label` will give
    sizes = object_sizes(cfg.data.train_json, cfg.data.min_sizes, cfg.data.max_size)
    card = new_card(cfg.model, run.dataset.class_names, cfg.inference,
                    calibration=Calibration(object_sizes=sizes))
    segmenter = Segmenter(TorchBackend(run.student, cfg.inference, device=device),
                          run.dataset.class_names, cfg.inference, card=card)
    return calibration(segmenter, run.metrics, cfg.data, sizes)


def _evaluate(run: TrainingRun) -> None:
    """COCO mask and box AP on the validation set (main process); sets ``run.metrics`` and
    writes ``metrics.json``."""
    acc, cfg = run.accelerator, run.cfg
    if acc.is_main_process:
        run.student.eval()
        metrics = evaluate_model(run.student, run.dataset.class_names, cfg.inference,
                                 cfg.data.val_json, cfg.data.val_images,
                                 run.dataset.label_to_category_id, cfg.data.max_val_images)
        acc.log({f"eval/{k}": v for k, v in metrics.items()}, step=run.state.step)
        path = run.output_dir / "metrics.json"
        path.write_text(json.dumps({"step": run.state.step, **metrics}, indent=2))
        acc.print(f"step {run.state.step}: mask AP {metrics.get('segm/AP', float('nan')):.2f}, "
                  f"box AP {metrics.get('bbox/AP', float('nan')):.2f} -> {path}")
        run.metrics = metrics
    acc.wait_for_everyone()


def _flat_scalars(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat_scalars(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        elif value is not None:
            flat[name] = str(value)
    return flat


# --------------------------------------------------------------------------- command line
def parse_args(argv: Sequence[str] | None, prog: str = "python -m training") -> argparse.Namespace:
    presets = "; ".join(f"{name}: {text}" for name, text in PRESET_HELP.items())
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train CondInst with SIM / BoxInst (box supervision) or full masks.",
        epilog="examples:\n"
               "  sim train --config configs/quickstart_cpu.yaml   # the paper's SIM\n"
               "  sim train --config configs/quickstart_cpu.yaml --preset sim_bg  # our variant\n"
               "  sim train --config configs/quickstart_nuclei.yaml optim.max_iter=600\n"
               "  sim train --config configs/quickstart_cpu.yaml --resume        # continue\n"
               "  accelerate launch --num_processes 8 -m training --config "
               "configs/sim_r50_fpn_1x.yaml")
    parser.add_argument("--config", help="YAML experiment file (see configs/)")
    parser.add_argument("--preset", help=f"named starting point, applied before the file and "
                                         f"the overrides ({presets})")
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        help="resume from a checkpoint folder, or 'auto' for the newest intact "
                             "one of output_dir")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    if args.resume and "=" in args.resume and not Path(args.resume).exists():
        # ``--resume key=value ...``: the option took the first override as its value.
        args.overrides.insert(0, args.resume)
        args.resume = "auto"
    return args


def main(argv: Sequence[str] | None = None, prog: str = "python -m training") -> int:
    """``sim train``; ``prog`` is the name its ``--help`` shows. Returns the exit code."""
    args = parse_args(argv, prog)
    try:
        cfg = load_config(args.config, args.overrides, preset=args.preset)
        if args.print_config:
            print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
            return 0
        result = train(cfg, resume=args.resume)
    except SimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    metrics = result["metrics"]
    if metrics:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) and math.isfinite(v) else v
                          for k, v in metrics.items()}))
    print(f"checkpoint: {result['checkpoint']}")
    return 0
