"""The training loop: ``accelerate launch -m training --config configs/<name>.yaml key=value``.

One flat loop on Hugging Face Accelerate (DDP on GPUs or CPU/gloo, bf16/fp16 autocast,
gradient accumulation), with checkpoints that resume everything: model, EMA teacher,
prototypes, optimizer, scheduler, iteration counter, RNG and the copy-paste memory bank.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.profiler import record_function
from tqdm.auto import tqdm

from serving.config import ModelConfig, config_to_dict
from serving.errors import SimError
from serving.model import CondInst, build_condinst
from serving.model.checkpoint import save_checkpoint

from .config import TrainConfig, load_config, save_config
from .data import CocoInstanceDataset
from .data.loader import build_train_loader
from .evaluate import evaluate_model
from .losses.criterion import bottom_removed_valid, compute_losses, targets_from_batch
from .optim import build_optimizer, build_scheduler
from .run_state import RunState, latest_checkpoint, save_state_atomic
from .sim.step import SIMState, sim_losses

#: Set to 1 to make every process write ``<output_dir>/debug/prototypes_rank{r}.pt`` at the end
#: of training: its prototypes and the image ids of every batch it trained on. Custom checkpoint
#: objects are saved from the main process only, so this per-rank dump is how the distributed
#: test checks that prototypes agree across processes while the data differ.
DEBUG_DUMP_ENV = "SIM_DEBUG_DUMP_PROTOTYPES"


class TrainingError(SimError):
    """Training cannot continue (NaN/inf loss, bad data)."""


def _prepare_data(cfg: TrainConfig, accelerator: Accelerator) -> None:
    """Generate the built-in synthetic dataset when the config asks for it and it is missing."""
    train_json = Path(cfg.data.train_json)
    if train_json.is_file() or cfg.data.synthetic_images <= 0:
        return
    if accelerator.is_main_process:
        from .data.synthetic import generate_dataset

        generate_dataset(train_json.parent, cfg.data.synthetic_images, seed=cfg.data.synthetic_seed,
                         size=cfg.data.synthetic_size, background=cfg.data.synthetic_background)
    accelerator.wait_for_everyone()


def _multi_process_cpu() -> bool:
    """True when several processes were launched (``WORLD_SIZE > 1``) on a machine without an
    accelerator device.

    Accelerate forms a gloo process group on CPUs only when told to use the CPU; otherwise
    ``accelerate launch --multi_gpu --num_processes 2`` (or ``torchrun``) on such a machine
    starts independent single-process runs that overwrite each other's output. (With
    ``accelerate launch --cpu --num_processes N --mpirun_hostfile H`` MPI starts the processes
    and Accelerate forms the group itself; without a hostfile ``--cpu`` starts ONE process.)
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()


def train(cfg: TrainConfig, resume: str | None = None,
          on_end: Callable[[CondInst, SIMState | None], None] | None = None) -> dict[str, Any]:
    """Run training; returns the final metrics (and paths) as a dict.

    ``on_end(model, sim)`` runs on the main process after the last step, before evaluation,
    with the bare student and the SIM state (teacher, prototypes; None without SIM); the
    quality benchmark renders its figure of SIM's maps there.
    """
    out = Path(cfg.output_dir)
    accelerator = Accelerator(
        cpu=_multi_process_cpu(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.optim.grad_accum_steps,
        log_with="tensorboard",
        project_dir=str(out),
    )
    set_seed(cfg.seed)
    _prepare_data(cfg, accelerator)
    mode = "mask" if _needs_masks(cfg) else "box"
    dataset = CocoInstanceDataset(cfg.data.train_json, cfg.data.train_images, mode=mode)
    if cfg.model.num_classes != dataset.num_classes:
        cfg.model = ModelConfig(**{**config_to_dict(cfg.model), "num_classes": dataset.num_classes})
    if accelerator.is_main_process:
        save_config(cfg, out / "config.yaml")
        accelerator.print(
            f"data: {len(dataset)} images, {dataset.num_classes} classes "
            f"({dataset.num_skipped_images} images without boxes skipped)"
        )
    model = build_condinst(cfg.model)
    all_reduce_sum = (lambda t: accelerator.reduce(t, "sum")) if accelerator.num_processes > 1 \
        else None
    sim = SIMState(model, cfg, accelerator.device, accelerator.process_index, all_reduce_sum) \
        if cfg.supervision == "box" and cfg.sim.enabled else None
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = RunState()
    # RunState first, then SIM's objects: SIMState.load_checkpoint relies on this order
    # (sim_step.FIRST_CUSTOM_CHECKPOINT).
    accelerator.register_for_checkpointing(state)
    if sim is not None:
        for obj in sim.checkpoint_objects():
            accelerator.register_for_checkpointing(obj)
    if resume:
        path = latest_checkpoint(out) if resume == "auto" else Path(resume)
        if path is None:
            accelerator.print("resume: no checkpoint found, starting from scratch")
        else:
            accelerator.load_state(str(path))
            accelerator.print(f"resumed from {path} at step {state.step}")
    if accelerator.is_main_process:
        accelerator.init_trackers("tb", config=_flat_scalars(config_to_dict(cfg)))
    unwrapped = accelerator.unwrap_model(model)
    loader = build_train_loader(dataset, cfg, accelerator.process_index,
                                accelerator.num_processes)
    bar = tqdm(total=cfg.optim.max_iter, initial=state.step, desc="train",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    reduce_mean = (lambda t: accelerator.reduce(t, "mean")) if accelerator.num_processes > 1 \
        else (lambda t: t)
    t_last, n_images = time.perf_counter(), 0
    metrics: dict[str, Any] = {}
    seen_ids: list[list[int]] = []
    model.train()
    try:  # close the bar on errors too (NaN stop, Ctrl-C): no stray output later
        while state.step < cfg.optim.max_iter:
            for batch in loader.iterate(state):
                batch = batch.to(accelerator.device)
                seen_ids.append(list(batch.image_ids))
                with accelerator.accumulate(model):
                    losses = _train_step(model, unwrapped, batch, cfg, state.step, sim, reduce_mean)
                    total = sum(losses.values())
                    _check_finite(losses, state.step, accelerator)
                    accelerator.backward(total)
                    if accelerator.sync_gradients and cfg.optim.clip_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                state.batches_in_epoch += 1
                n_images += len(batch) * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                state.step += 1
                if sim is not None:
                    sim.after_step(unwrapped)
                bar.update(1)
                if state.step % cfg.log_every == 0 or state.step == cfg.optim.max_iter:
                    now = time.perf_counter()
                    scalars = {k: float(v.detach()) for k, v in losses.items()}
                    scalars["lr"] = scheduler.get_last_lr()[0]
                    scalars["images_per_s"] = n_images / max(now - t_last, 1e-9)
                    t_last, n_images = now, 0
                    accelerator.log(scalars, step=state.step)
                    bar.set_postfix({k.replace("loss_", ""): f"{v:.3f}" for k, v in scalars.items()
                                     if k.startswith("loss_")} | {
                                        "img/s": f"{scalars['images_per_s']:.1f}"})
                if sim is not None and cfg.log_images_every and \
                        state.step % cfg.log_images_every == 0 and accelerator.is_main_process:
                    sim.log_images(accelerator, state.step)
                if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                    save_state_atomic(accelerator, out, state.step)
                if cfg.eval_every and state.step % cfg.eval_every == 0 and cfg.data.val_json:
                    metrics = _evaluate(accelerator, unwrapped, dataset.class_names, cfg,
                                        state.step, dataset.label_to_category_id)
                    model.train()
                if state.step >= cfg.optim.max_iter:
                    break
            else:
                state.next_epoch()
    finally:
        bar.close()
    save_state_atomic(accelerator, out, state.step)
    if os.environ.get(DEBUG_DUMP_ENV) == "1" and sim is not None:
        _dump_debug(out, accelerator.process_index, sim, seen_ids, state.step)
    final = out / "model_final.safetensors"
    if accelerator.is_main_process:
        save_checkpoint(final, unwrapped, cfg.model, dataset.class_names, cfg.inference,
                        extra={"train_config": config_to_dict(cfg), "step": state.step,
                               "category_ids": dataset.label_to_category_id})
    if on_end is not None and accelerator.is_main_process:
        on_end(unwrapped, sim)
        model.train()
    if cfg.data.val_json and (not cfg.eval_every or cfg.optim.max_iter % cfg.eval_every):
        metrics = _evaluate(accelerator, unwrapped, dataset.class_names, cfg, state.step,
                            dataset.label_to_category_id)
    accelerator.end_training()
    return {"checkpoint": str(final), "metrics": metrics, "step": state.step}


def _needs_masks(cfg: TrainConfig) -> bool:
    """Training reads instance masks: full supervision, or the oracle-M_S diagnostic."""
    return cfg.supervision == "mask" or (cfg.sim.enabled and cfg.sim.oracle_semantic_map)


def _train_step(model, unwrapped, batch, cfg: TrainConfig, step: int, sim: SIMState | None,
                reduce_mean) -> dict[str, torch.Tensor]:
    """Losses of one batch: copy-paste (SIM), student forward, FCOS + mask + SIM losses."""
    h, w = batch.images.shape[-2:]
    targets = targets_from_batch(batch.boxes, batch.labels, h, w,
                                 batch.masks if _needs_masks(cfg) else None)
    images = batch.images
    if sim is not None:
        with record_function("sim.copy_paste"):
            images, targets = sim.copy_paste(images, batch.valid, targets, step)
    color_valid = bottom_removed_valid(batch.valid, batch.image_sizes,
                                       [s[0] for s in batch.orig_sizes],
                                       cfg.boxinst.bottom_pixels_removed)
    x = unwrapped.normalize(images, batch.valid)
    with record_function("student.forward"):
        outputs = model(x)
    # The SIM code's colour x feature affinity reads the teacher at every step; its outputs
    # are then reused by SIM's maps instead of a second teacher forward.
    t_out = sim.teacher_forward(x) if sim is not None and \
        cfg.boxinst.pairwise_affinity == "color_feature" else None
    with record_function("losses.fcos_boxinst"):
        result = compute_losses(unwrapped, outputs, images, color_valid, targets, cfg, step,
                                reduce_mean, None if t_out is None else t_out.mask_feats)
    losses = result.losses
    if sim is not None:
        with record_function("sim.losses"):
            losses.update(sim_losses(sim, unwrapped, x, images, outputs, result, targets, cfg,
                                     step, t_out))
    return losses


def _dump_debug(out: Path, rank: int, sim: SIMState, seen_ids: list[list[int]],
                step: int) -> None:
    """Per-process prototypes (C, L, D) and image ids of each batch (see ``DEBUG_DUMP_ENV``)."""
    (out / "debug").mkdir(parents=True, exist_ok=True)
    torch.save({"prototypes": sim.prototypes.prototypes.detach().cpu(), "image_ids": seen_ids,
                "step": step, "rank": rank}, out / "debug" / f"prototypes_rank{rank}.pt")


def _check_finite(losses: dict[str, torch.Tensor], step: int, accelerator: Accelerator) -> None:
    bad = [name for name, v in losses.items() if not torch.isfinite(v.detach()).all()]
    flag = torch.tensor(float(len(bad)), device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, "sum")
    if float(flag) > 0:
        detail = ", ".join(f"{n}={float(losses[n].detach()):.4g}" for n in bad) or \
            "on another process"
        raise TrainingError(
            f"step {step + 1}: non-finite loss ({detail}); lower optim.lr, enable "
            "optim.clip_grad_norm, or resume from the last checkpoint with --resume auto"
        )


def _evaluate(accelerator: Accelerator, model, class_names, cfg: TrainConfig, step: int,
              category_ids: list[int]) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    if accelerator.is_main_process:
        model.eval()
        metrics = evaluate_model(model, class_names, cfg.inference, cfg.data.val_json,
                                 cfg.data.val_images, category_ids, cfg.data.max_val_images)
        accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        path = Path(cfg.output_dir) / "metrics.json"
        path.write_text(json.dumps({"step": step, **metrics}, indent=2))
        accelerator.print(f"step {step}: mask AP {metrics.get('segm/AP', float('nan')):.2f}, "
                          f"box AP {metrics.get('bbox/AP', float('nan')):.2f} -> {path}")
    accelerator.wait_for_everyone()
    return metrics


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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train CondInst with SIM / BoxInst (box supervision) or full masks.",
    )
    parser.add_argument("--config", help="YAML experiment file (see configs/)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        help="resume from a checkpoint folder, or 'auto' for the latest one")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
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
