"""The Accelerate training loop end to end on the tiny config (CPU, a few steps each).

Run A (the session fixture ``tiny_run``: 6 steps, SIM exercised, final evaluation) checks the
run folder; short runs check the mask supervision and the ablation switches; a crashed run
resumed with ``resume="auto"`` must end with run A's exact weights and SIM state; a NaN loss
stops with the step and the loss name and leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from train_helpers import SIM_EXERCISE, Recorder

from serving.model_config import config_to_dict
from training.callbacks import Callback
from training.run_checkpoints import (
    CHECKPOINT_DIR,
    MANIFEST,
    SIM_STATE,
    memory_bank_file,
    read_tensor_state,
)
from training.train import TrainingError, train
from training.train_config import load_config

pytestmark = pytest.mark.slow

SIM_LOSSES = {"loss_pseudo", "loss_paste"}
FCOS_LOSSES = {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr"}


def run_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / MANIFEST).read_text())["run_state"]


def sim_state(checkpoint: Path) -> dict:
    """{"teacher": state dict, "prototypes": {"prototypes": (C, L, D)}} of a checkpoint."""
    return read_tensor_state(checkpoint / SIM_STATE)


def bank_state(checkpoint: Path) -> dict:
    return read_tensor_state(checkpoint / memory_bank_file(0))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_same_bank(a: dict, b: dict) -> None:
    assert a["capacity"] == b["capacity"] and len(a["entries"]) == len(b["entries"])
    for ea, eb in zip(a["entries"], b["entries"]):
        assert torch.equal(ea["labels"], eb["labels"]) and torch.equal(ea["scores"], eb["scores"])
        for key in ("patches", "masks"):
            assert len(ea[key]) == len(eb[key])
            assert all(torch.equal(x, y) for x, y in zip(ea[key], eb[key]))


# --------------------------------------------------------------------------- run A
def test_run_folder(tiny_run, tiny_data) -> None:
    out, cfg = tiny_run.out, tiny_run.cfg
    assert tiny_run.result["step"] == 6
    # The resolved config (num_classes set from the data) is saved and reloads equal.
    assert load_config(out / "config.yaml") == cfg
    assert cfg.model.num_classes == 6
    # Checkpoints: the last two periodic ones, complete, no temporary folder left.
    root = out / CHECKPOINT_DIR
    assert sorted(p.name for p in root.iterdir()) == ["step_0000003", "step_0000006"]
    for ckpt in root.iterdir():
        names = {p.name for p in ckpt.iterdir()}
        assert names == {"model.safetensors", "optimizer.bin", "scheduler.bin",
                         "random_states_0.pkl", SIM_STATE, memory_bank_file(0), MANIFEST}
        manifest = json.loads((ckpt / MANIFEST).read_text())
        assert set(manifest["files"]) == names - {MANIFEST}
        assert manifest["config"] == config_to_dict(cfg)
        assert manifest["num_processes"] == 1
    assert run_state(root / "step_0000003") == {"step": 3, "epoch": 0, "batches_in_epoch": 3}
    assert run_state(root / "step_0000006") == {"step": 6, "epoch": 1, "batches_in_epoch": 1}
    # Final evaluation.
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 6
    for key in ("segm/AP", "bbox/AP", "segm/AP50", "bbox/AP75", "segm/APl"):
        assert -1.0 <= metrics[key] <= 100.0
    assert tiny_run.result["metrics"] == {k: v for k, v in metrics.items() if k != "step"}


def test_final_checkpoint_serves(tiny_run, tiny_data) -> None:
    from serving import Segmenter
    from serving.inference.images import load_image
    from serving.model.model_file import read_checkpoint_card
    from training.data.coco_dataset import CocoIndex

    path = Path(tiny_run.result["checkpoint"])
    assert path == tiny_run.out / "model_final.safetensors"
    info = read_checkpoint_card(path)
    assert info.provenance.made_by == "train" and info.provenance.details["step"] == 6
    assert info.model.num_classes == 6
    index = CocoIndex(tiny_data.train_json)
    segmenter = Segmenter.from_checkpoint(path, device="cpu")
    assert len(segmenter.class_names) == 6
    image_id = next(iter(index.images))
    image = load_image(tiny_data.images / index.images[image_id][0])
    # One 128 x 128 image: P7 is 1 x 1 (one value per GroupNorm group at 32 channels).
    boxes = [[10.0, 12.0, 70.0, 80.0], [40.0, 30.0, 120.0, 100.0]]
    pred = segmenter.predict(image, boxes=boxes)
    assert pred.masks.shape == (2, 128, 128)  # one mask per prompt box, original size
    assert segmenter.predict(image).masks.shape[1:] == (128, 128)
    # The weights are the trained ones (final step), not the initial ones.
    final = load_file(str(path))
    step6 = load_file(str(tiny_run.out / CHECKPOINT_DIR / "step_0000006" / "model.safetensors"))
    assert_same_tensors({k: final[k] for k in step6}, step6)


def test_tensorboard_scalars(tiny_run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted((tiny_run.out / "tb").rglob("events.out.tfevents.*"))
    assert files
    tags: dict[str, list[int]] = {}
    for f in files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            tags.setdefault(tag, []).extend(e.step for e in acc.Scalars(tag))
    for tag in ("loss_fcos_cls", "loss_prj", "loss_pairwise", "loss_pseudo", "loss_paste", "lr",
                "images_per_s"):
        assert sorted(tags[tag]) == [1, 2, 3, 4, 5, 6], tag  # log_every: 1
    assert tags["eval/segm/AP"] == [6]


def test_losses_and_sim_parts_act(tiny_run) -> None:
    records = tiny_run.records
    assert [r.step for r in records] == list(range(6))
    expected = FCOS_LOSSES | {"loss_prj", "loss_pairwise"} | SIM_LOSSES
    assert all(set(r.losses) == expected for r in records)
    # Pairwise warm-up min(step / 1, 1): off at step 0, on afterwards.
    assert records[0].losses["loss_pairwise"] == 0.0
    assert all(r.losses["loss_pairwise"] > 0 for r in records[1:])
    # SIM starts at sim.start_iter = 2; copy-paste once the bank holds an entry.
    assert all(r.losses["loss_pseudo"] == 0.0 for r in records[:2])
    assert all(r.losses["loss_pseudo"] > 0 for r in records[2:])
    assert [r.bank_size for r in records[:3]] == [0, 0, 0]
    assert records[3].bank_size > 0
    assert any(r.losses["loss_paste"] > 0 for r in records[3:])
    # Prototypes moved away from their seeded initialisation.
    from training.sim import PrototypeMemory

    step6 = sim_state(tiny_run.out / CHECKPOINT_DIR / "step_0000006")["prototypes"]
    init = PrototypeMemory(6, tiny_run.cfg.sim.num_prototypes, 16, seed=0).prototypes
    assert (step6["prototypes"] - init).abs().max() > 1e-3
    # The two images of a batch differ and the 6 steps cover more than one epoch of 10 images.
    assert all(len(set(r.image_ids)) == 2 for r in records)


# --------------------------------------------------------------------------- short runs
def _short_run(tiny_cfg, out: Path, *overrides: str):
    cfg = tiny_cfg(out, "optim.max_iter=2", "data.val_json=null", "checkpoint_every=0",
                   "sim.start_iter=0", *overrides)
    rec = Recorder(snapshot_first=False)
    result = train(cfg, callbacks=[rec])
    return result, rec.records


def test_mask_supervision(tiny_cfg, tmp_path: Path) -> None:
    result, records = _short_run(tiny_cfg, tmp_path, "supervision=mask")
    assert result["step"] == 2 and Path(result["checkpoint"]).is_file()
    for r in records:
        assert set(r.losses) == FCOS_LOSSES | {"loss_mask"}
        assert 0.0 < r.losses["loss_mask"] <= 1.0  # dice loss
        assert r.bank_size is None  # no SIM state in mask mode
    assert result["metrics"] == {}  # data.val_json=null: no evaluation


@pytest.mark.parametrize(("override", "absent", "present"), [
    ("sim.enabled=false", SIM_LOSSES, {"loss_prj", "loss_pairwise"}),
    ("sim.copy_paste=false", {"loss_paste"}, {"loss_pseudo", "loss_pairwise"}),
    ("sim.pseudo_loss=false", {"loss_pseudo"}, {"loss_paste", "loss_pairwise"}),
    ("boxinst.pairwise=false", {"loss_pairwise"}, {"loss_prj"} | SIM_LOSSES),
])
def test_ablation_switches(tiny_cfg, tmp_path: Path, override: str,
                           absent: set[str], present: set[str]) -> None:
    _, records = _short_run(tiny_cfg, tmp_path, override, *SIM_EXERCISE)
    assert len(records) == 2
    for r in records:
        assert FCOS_LOSSES | present <= set(r.losses)
        assert not absent & set(r.losses)
    if override == "sim.enabled=false":
        assert all(r.bank_size is None for r in records)
    if override == "sim.copy_paste=false":
        assert [r.bank_size for r in records] == [0, 0]  # nothing is stored for pasting


@pytest.mark.parametrize("foreground", [True, False])
def test_pseudo_foreground_switch(tiny_cfg, tmp_path: Path, monkeypatch,
                                  foreground: bool) -> None:
    """``sim.pseudo_foreground=false`` drops the foreground labels from the pseudo loss only:
    its W never covers the pseudo mask, while copy-paste still stores the pseudo masks."""
    import training.sim.iteration as sim_iteration

    calls = []
    original = sim_iteration.bce_dice_loss

    def wrapped(logits, target, weight=None):
        calls.append((target.detach().clone(), None if weight is None else weight.clone()))
        return original(logits, target, weight)

    monkeypatch.setattr(sim_iteration, "bce_dice_loss", wrapped)
    _, records = _short_run(tiny_cfg, tmp_path, "optim.max_iter=3",
                            f"sim.pseudo_foreground={str(foreground).lower()}", *SIM_EXERCISE,
                            # An untrained teacher's blended map lies within 0.50-0.58:
                            "sim.tau_high_range=[0.55, 0.55]", "sim.tau_low=0.54")
    pseudo = [(t, w) for t, w in calls if w is not None]  # the paste loss has no W
    assert len(pseudo) == 3
    assert all(float(t.sum()) > 0 for t, _ in pseudo)  # the teacher labels foreground
    labelled_fg = sum(float((t * w).sum()) for t, w in pseudo)
    assert (labelled_fg > 0) == foreground
    assert all(float(w.sum()) > 0 for _, w in pseudo)
    assert records[-1].bank_size > 0  # paste masks are stored either way
    assert all(r.losses["loss_pseudo"] > 0 for r in records)


# --------------------------------------------------------------------------- resume
def test_resume_matches_uninterrupted_run(tiny_run, tiny_cfg, tmp_path: Path,
                                          monkeypatch) -> None:
    cfg = tiny_cfg(tmp_path, *SIM_EXERCISE)  # run A's config, another folder
    # B1: crashes before the 4th step, after the step-3 checkpoint.
    with pytest.raises(RuntimeError, match="simulated crash before step 4"):
        train(cfg, callbacks=[Recorder(crash_at=3)])
    root = tmp_path / CHECKPOINT_DIR
    assert [p.name for p in root.iterdir()] == ["step_0000003"]
    assert not (tmp_path / "model_final.safetensors").exists()
    a3 = tiny_run.out / CHECKPOINT_DIR / "step_0000003"
    b3 = root / "step_0000003"
    # Up to the crash B1 is run A (same seed, same data order).
    assert_same_tensors(load_file(str(a3 / "model.safetensors")),
                        load_file(str(b3 / "model.safetensors")))

    # B2: resume from the latest checkpoint.
    rec = Recorder()
    result = train(tiny_cfg(tmp_path, *SIM_EXERCISE), resume="auto", callbacks=[rec])
    records = rec.records
    # The counters continue at step 3 (warm-ups and SIM gating do not restart).
    assert [r.step for r in records] == [3, 4, 5]
    first = records[0]
    assert first.bank_size == len(bank_state(b3)["entries"]) > 0
    assert torch.equal(first.prototypes, sim_state(b3)["prototypes"]["prototypes"])
    assert_same_tensors(first.teacher, sim_state(b3)["teacher"])
    # Same batches and the same losses as run A's steps 3-5.
    a_records = tiny_run.records[3:]
    assert [r.image_ids for r in records] == [r.image_ids for r in a_records]
    assert [r.losses for r in records] == [r.losses for r in a_records]

    # Final weights, teacher, prototypes and memory bank are identical to run A's.
    assert result["step"] == 6
    assert_same_tensors(load_file(str(tiny_run.out / "model_final.safetensors")),
                        load_file(result["checkpoint"]))
    a6, b6 = tiny_run.out / CHECKPOINT_DIR / "step_0000006", root / "step_0000006"
    assert_same_tensors(sim_state(a6)["teacher"], sim_state(b6)["teacher"])
    assert torch.equal(sim_state(a6)["prototypes"]["prototypes"],
                       sim_state(b6)["prototypes"]["prototypes"])
    assert_same_bank(bank_state(a6), bank_state(b6))
    assert run_state(b6) == run_state(a6)
    for name in ("model.safetensors", "optimizer.bin", "scheduler.bin", SIM_STATE):
        assert (a6 / name).read_bytes() == (b6 / name).read_bytes(), name


# --------------------------------------------------------------------------- NaN / inf
def test_nan_loss_stops_with_step_and_name(tiny_cfg, tmp_path: Path, monkeypatch) -> None:
    import training.losses.criterion as criterion

    original = criterion.projection_loss
    calls = []

    def nan_on_second_step(*args, **kwargs):
        loss = original(*args, **kwargs)
        calls.append(1)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(criterion, "projection_loss", nan_on_second_step)
    cfg = tiny_cfg(tmp_path, "optim.max_iter=3", "checkpoint_every=1", "data.val_json=null")
    with pytest.raises(TrainingError) as info:
        train(cfg)
    message = str(info.value)
    assert message.startswith("step 2: non-finite loss (loss_prj=nan)")
    assert "\n" not in message
    # The step-1 checkpoint is complete and untouched by the failed step.
    root = tmp_path / CHECKPOINT_DIR
    assert [p.name for p in root.iterdir()] == ["step_0000001"]
    ckpt = root / "step_0000001"
    assert run_state(ckpt)["step"] == 1
    weights = load_file(str(ckpt / "model.safetensors"))
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    assert not (tmp_path / "model_final.safetensors").exists()


# --------------------------------------------------------------------------- callbacks
class _EndOfTraining(Callback):
    """Records what ``on_train_end`` sees and renders the quality benchmark's SIM figure."""

    def __init__(self, figure: Path | None) -> None:
        self.figure = figure
        self.calls: list = []
        self.steps: list[int] = []

    def on_step_end(self, run, losses) -> None:
        self.steps.append(run.state.step)

    def on_train_end(self, run) -> None:
        from benchmarks.sim_figure import render_sim_maps

        final = run.output_dir / "model_final.safetensors"
        self.calls.append((run.student.training, run.sim, final.is_file(), run.metrics))
        if self.figure is not None:
            render_sim_maps(run.student, run.sim, run.cfg, self.figure, num_instances=3)


def test_callbacks_see_every_step_and_the_end(tiny_cfg, tmp_path: Path) -> None:
    """``train(callbacks=...)`` reports each optimiser step and hands over the trained
    student and SIM state after the final evaluation and the final model (whose calibration
    needs that evaluation); the quality benchmark's figure of M_S / M_I / pseudo mask / truth
    renders from them."""
    from PIL import Image

    from benchmarks.sim_figure import COLUMNS, TILE
    from training.sim.iteration import SIMState

    end = _EndOfTraining(tmp_path / "maps.png")
    cfg = tiny_cfg(tmp_path, "optim.max_iter=2", "checkpoint_every=0", "sim.start_iter=0",
                   *SIM_EXERCISE)
    result = train(cfg, callbacks=[end])
    assert end.steps == [1, 2]
    assert len(end.calls) == 1
    _, sim, final_written, metrics_then = end.calls[0]
    assert isinstance(sim, SIMState) and final_written
    assert metrics_then and metrics_then == result["metrics"]  # evaluated before the end
    sheet = np.asarray(Image.open(tmp_path / "maps.png"))
    assert sheet.shape[1] == TILE * len(COLUMNS)
    rows = (sheet.shape[0] - 18) // TILE
    assert sheet.shape[0] == 18 + rows * TILE and 1 <= rows <= 3
    truth = sheet[18:, -TILE:]
    assert truth.max() == 255 and truth.min() == 0  # each truth tile shows mask and background
    boxinst = _EndOfTraining(None)
    train(tiny_cfg(tmp_path / "boxinst", "optim.max_iter=1", "checkpoint_every=0",
                   "data.val_json=null", "preset=boxinst"), callbacks=[boxinst])
    assert [c[1] for c in boxinst.calls] == [None]  # no SIM state without SIM
