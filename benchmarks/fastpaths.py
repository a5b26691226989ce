"""Before/after timing of the inference and SIM fast paths, side by side in one process.

Each "before" is the straightforward code the fast path replaced (kept here, or reached by
switching the fast paths off with :func:`legacy_paths`); each pair is timed interleaved (A B A B
...) and checked to give identical results.

- ``preprocess``: per-image float copy + clamp + ``pad_batch`` vs writing into the batch;
- ``mask_head``: one (P, 18, h*w) pass vs instance chunks with in-place bias/ReLU (no autograd);
- ``segment_boxes``: every (box, slot) mask vs only the valid slots, in chunks of boxes;
- ``postprocess_masks``: 16-mask chunks with the identity resize vs the per-region crops of
  ``mask_crops`` (made dense here);
- ``segmenter_auto`` / ``segmenter_prompt``: ``Segmenter.predict_batch`` end to end with every
  inference fast path off vs on;
- ``teacher_forward``: SIM's teacher with vs without the class tower;
- ``ema_update``: per-tensor loop vs multi-tensor calls.

    python benchmarks/fastpaths.py            # R-50-FPN geometry (800x1333), 80 classes
    python benchmarks/fastpaths.py --quick    # MobileNetV2-FPN geometry (512x512), fewer rounds

Writes ``benchmarks/results/fastpaths[_quick].json`` and ``.md``. Random weights.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import serving.inference.postprocess as postprocess_module  # noqa: E402
import serving.model.heads as heads_module  # noqa: E402
import serving.segmenter as segmenter_module  # noqa: E402
from benchmarks.common import (  # noqa: E402
    interleaved_times,
    machine_info,
    machine_markdown,
    markdown_table,
    summarize,
)
from benchmarks.speed import MODELS, bench_image, build_checkpoint, prompt_boxes  # noqa: E402
from serving import ModelConfig, Segmenter, build_condinst  # noqa: E402
from serving.inference.postprocess import postprocess_masks, segment_boxes  # noqa: E402
from serving.inference.transforms import pad_batch, preprocess, resize_image, resized_shape  # noqa: E402
from serving.masks import InstanceMasks  # noqa: E402
from serving.model.ops import aligned_bilinear  # noqa: E402
from training.sim.ema import EMATeacher  # noqa: E402


# --------------------------------------------------------------------------- the "before" code
def legacy_preprocess(images, min_size, max_size, device="cpu"):
    resized, sizes = [], []
    for img in images:
        size = resized_shape(img.shape[0], img.shape[1], min_size, max_size)
        tensor = torch.from_numpy(np.require(img, requirements=["C", "W"])).to(device)
        resized.append(resize_image(tensor.permute(2, 0, 1), size))
        sizes.append(size)
    batch, valid = pad_batch(resized)
    return batch, valid, sizes


def legacy_postprocess_masks(mask_probs, resized_size, orig_size, threshold=0.5,
                             clip_boxes=None, chunk=16):
    h0, w0 = orig_size
    out = torch.zeros((mask_probs.shape[0], h0, w0), dtype=torch.bool, device=mask_probs.device)
    if clip_boxes is not None:
        ys = torch.arange(h0, device=mask_probs.device, dtype=torch.float32) + 0.5
        xs = torch.arange(w0, device=mask_probs.device, dtype=torch.float32) + 0.5
    for start in range(0, mask_probs.shape[0], chunk):
        part = aligned_bilinear(mask_probs[start:start + chunk, None].float(), 4)
        part = part[:, :, : resized_size[0], : resized_size[1]]
        part = F.interpolate(part, size=(h0, w0), mode="bilinear", align_corners=False)[:, 0]
        masks = part > threshold
        if clip_boxes is not None:
            bx = clip_boxes[start:start + chunk].float()
            inside_y = (ys[None] >= bx[:, 1:2]) & (ys[None] <= bx[:, 3:4])
            inside_x = (xs[None] >= bx[:, 0:1]) & (xs[None] <= bx[:, 2:3])
            masks &= inside_y[:, :, None] & inside_x[:, None, :]
        out[start:start + chunk] = masks
    return out


@contextlib.contextmanager
def legacy_paths() -> Iterator[None]:
    """Switch every inference fast path off: batched mask head, fixed-shape prompt path, the
    old mask post-processing and preprocessing inside ``Segmenter``."""
    saved = (heads_module.eager_no_grad, postprocess_module.eager_no_grad,
             segmenter_module.mask_crops, segmenter_module.preprocess)
    heads_module.eager_no_grad = postprocess_module.eager_no_grad = lambda: False
    segmenter_module.mask_crops = lambda *a, **k: InstanceMasks.from_dense(
        legacy_postprocess_masks(*a, **k).cpu().numpy())
    segmenter_module.preprocess = legacy_preprocess
    try:
        yield
    finally:
        (heads_module.eager_no_grad, postprocess_module.eager_no_grad,
         segmenter_module.mask_crops, segmenter_module.preprocess) = saved


def legacy_ema_update(teacher: EMATeacher, student: torch.nn.Module, m: float) -> None:
    with torch.no_grad():
        tp, sp, tb, sb = teacher._pairs(student)
        for t, s in zip(tp, sp):
            t.mul_(m).add_(s.detach().to(t.dtype), alpha=1.0 - m)
        for t, s in zip(tb, sb):
            t.copy_(s)


# --------------------------------------------------------------------------- pairs
def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if hasattr(a, "__dataclass_fields__"):
        return all(_equal(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return a == b


def run_pair(name: str, before, after, rounds: int, warmup: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    times = interleaved_times({"before": before, "after": after}, rounds, warmup,
                              on_result=lambda k, r: out.__setitem__(k, r))
    b, a = summarize(times["before"]), summarize(times["after"])
    row = {"name": name, "before_ms": b["median_ms"], "after_ms": a["median_ms"],
           "speedup": b["median_ms"] / a["median_ms"],
           "speedup_per_round": statistics.median(x / y for x, y in
                                                  zip(times["before"], times["after"])),
           "identical": _equal(out["before"], out["after"]), "rounds": rounds}
    print(f"{name}: {row['before_ms']:.1f} -> {row['after_ms']:.1f} ms "
          f"(x{row['speedup']:.2f}), identical={row['identical']}", file=sys.stderr)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="MobileNetV2 geometry, 3 rounds")
    p.add_argument("--model", choices=list(MODELS), default=None,
                   help="geometry (default r50_fpn, mobilenet_v2_fpn with --quick)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--work-dir", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 7)
    warmup = 1
    name = args.model or ("mobilenet_v2_fpn" if args.quick else "r50_fpn")
    fields, size, min_size, max_size = MODELS[name]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="fastpaths_"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt, _ = build_checkpoint(name, work)
    seg = Segmenter.from_checkpoint(ckpt, device="cpu")
    model = seg.backend.model
    image = bench_image(size)
    boxes = prompt_boxes(size)
    rows = []

    with torch.inference_mode():
        batch, valid, sizes = preprocess([image], min_size, max_size)
        out = model(model.normalize(batch, valid))
    rows.append(run_pair("preprocess (batch 8)",
                         lambda: legacy_preprocess([image] * 8, min_size, max_size),
                         lambda: preprocess([image] * 8, min_size, max_size), rounds, warmup))
    loc = torch.arange(160) * 7 % out.locations.shape[0]
    zero = torch.zeros(160, dtype=torch.long)
    head_args = (out.mask_feats, model.controller_params(out, zero, loc), out.locations[loc],
                 out.levels[loc], zero)

    def head_before():
        with torch.inference_mode(), legacy_paths():
            return model.mask_head(*head_args)

    def head_after():
        with torch.inference_mode():
            return model.mask_head(*head_args)

    rows.append(run_pair("mask_head (160 instances)", head_before, head_after, rounds, warmup))
    icfg = seg.cfg
    scale = torch.tensor([sizes[0][1] / size[1], sizes[0][0] / size[0]] * 2)
    boxes_in = torch.from_numpy(boxes)[None] * scale

    def prompt_before():
        with torch.inference_mode(), legacy_paths():
            return segment_boxes(model, out, boxes_in, None, icfg)

    def prompt_after():
        with torch.inference_mode():
            return segment_boxes(model, out, boxes_in, None, icfg)

    rows.append(run_pair("segment_boxes (10 boxes)", prompt_before, prompt_after, rounds, warmup))
    probs = torch.rand((100, out.mask_feats.shape[-2] * 2, out.mask_feats.shape[-1] * 2),
                       generator=torch.Generator().manual_seed(0))
    rows.append(run_pair("postprocess_masks (100 masks)",
                         lambda: legacy_postprocess_masks(probs, sizes[0], size, 0.5),
                         lambda: postprocess_masks(probs, sizes[0], size, 0.5), rounds, warmup))

    for mode, prompts in (("auto", None), ("prompt", [boxes])):
        def e2e_before(prompts=prompts):
            with legacy_paths():
                return [p.masks for p in seg.predict_batch([image], boxes=prompts)]

        def e2e_after(prompts=prompts):
            return [p.masks for p in seg.predict_batch([image], boxes=prompts)]

        rows.append(run_pair(f"Segmenter.predict {mode} (batch 1, end to end)", e2e_before,
                             e2e_after, rounds, warmup))

    torch.manual_seed(0)
    cfg = ModelConfig(**{**fields, "num_classes": 80})
    student = build_condinst(cfg)
    teacher = EMATeacher(student)
    x = torch.randn(2, 3, *[-(-s // 32) * 32 for s in size])

    def teacher_before():
        with torch.no_grad():
            return [t for n, t in zip(out._fields, teacher(x)) if n != "cls_logits"]

    def teacher_after():
        with torch.no_grad():
            return [t for n, t in zip(out._fields, teacher(x, with_classes=False))
                    if n != "cls_logits"]

    rows.append(run_pair("SIM teacher forward (batch 2)", teacher_before, teacher_after,
                         max(2, rounds // 2), warmup))
    twin = copy.deepcopy(teacher)
    rows.append(run_pair("SIM EMA update", lambda: legacy_ema_update(twin, student, 0.9999),
                         lambda: teacher.update(student, 0.9999), rounds, warmup))
    # the two EMA teachers were updated the same number of times from the same start
    rows[-1]["identical"] = all(torch.equal(a, b) for a, b in
                                zip(teacher.state_dict().values(), twin.state_dict().values()))

    result = {"mode": "quick" if args.quick else "full", "model": name,
              "input": f"{size[1]}x{size[0]}", "machine": machine_info(), "rows": rows}
    out_dir = Path(args.out) if args.out else ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "fastpaths_quick" if args.quick else "fastpaths"
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2))
    table = markdown_table(
        ["path", "before ms", "after ms", "speed-up (medians)", "speed-up (per round)",
         "identical"],
        [[r["name"], r["before_ms"], r["after_ms"], r["speedup"], r["speedup_per_round"],
          "yes" if r["identical"] else "NO"] for r in rows])
    text = "\n".join([f"# Fast paths, before vs after ({result['mode']})", "",
                      machine_markdown(result["machine"]), "",
                      f"{name} geometry ({result['input']}), 80 classes, random weights, CPU; "
                      f"{rounds} interleaved rounds after {warmup} warm-up (medians).", "",
                      table, ""])
    (out_dir / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
