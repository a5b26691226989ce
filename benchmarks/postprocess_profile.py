"""The work after the network, per function and per call, on the CPU (not a test).

For the random-weight MobileNetV2-FPN of ``benchmarks/export_speed.py`` (the paper's heads,
class bias raised so every image keeps ``max_detections`` = 100 detections), the network runs
once per input size (256x256, 512x512, 800x1333); then every step that follows it in
``Segmenter.predict`` is timed on those outputs, per call, side by side in one process
(``common.interleaved_times``, medians):

- ``graph_detections``: the exported graph's padded outputs -> one ``Detections`` per image
  (what ONNX Runtime and TensorRT add; the torch backend returns them directly),
- ``above``: the score filter (``Segmenter.predict(score_threshold=...)``),
- ``scale_boxes``: boxes to the original image,
- ``mask_crops`` and its three steps (``serving/inference/paste.py``): ``_plan`` (groups of
  pixels and the certainly True / False ones, all masks at once), ``_edges`` (interpolating
  the pixels of edge groups), crops (bounds, ``_expand`` into one buffer, ``InstanceMasks``),
- ``Prediction``: the result object,
- ``total``: all of them, as ``Segmenter._run_auto`` / ``_run_prompted`` run them,

at batch 1 and 8 (a batch repeats the image's outputs: per-image work is independent), with
10 and 100 instances, for images at the input size and 1.5x larger (resized), automatic and
with 10 prompt boxes; ``--gap-ms`` pauses after each call (the caches then start cold, as
in ``export_speed.py``). ``--baseline REF`` also times ``mask_crops`` of git revision REF
(the implementation before this one) on the same outputs and checks both give the same masks.
Writes ``benchmarks/results/postprocess_profile.{json,md}``.

    python benchmarks/postprocess_profile.py --threads 2 --baseline a972c2d
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    interleaved_times,
    machine_info,
    machine_markdown,
    markdown_table,
    summarize,
    write_results,
)
from export_speed import make_checkpoint, prompt_boxes  # noqa: E402

from serving import Segmenter  # noqa: E402
from serving.backends.exported import graph_detections  # noqa: E402
from serving.inference import paste  # noqa: E402
from serving.inference.bilinear import cpu_fused  # noqa: E402
from serving.inference.postprocess import Detections, PaddedDetections  # noqa: E402
from serving.inference.transforms import scale_boxes  # noqa: E402
from serving.prediction import Prediction  # noqa: E402

SIZES = {"256x256": (256, 256), "512x512": (512, 512), "800x1333": (800, 1333)}
STEPS = ("graph_detections", "above", "scale_boxes", "mask_crops: _plan", "mask_crops: _edges",
         "mask_crops", "Prediction", "total")


def baseline_paste(ref: str):
    """``serving.inference.paste`` of git revision ``ref`` (``ab_speed.import_ref``: the
    revision's whole ``serving`` package, so its own ``paste_groups`` too), or ``None``."""
    from ab_speed import import_ref

    try:
        package = import_ref(ref, Path(tempfile.mkdtemp()) / "ref")
    except (OSError, subprocess.CalledProcessError):
        return None
    return importlib.import_module(f"{package.__name__}.inference.paste")


def network_outputs(seg: Segmenter, size: tuple[int, int]):
    """The automatic detections and the 10-box prompt results of one random image."""
    image = np.random.default_rng(1).integers(0, 256, (*size, 3), dtype=np.uint8)
    batch, _, sizes = seg._preprocess([image])
    boxes = prompt_boxes(*size)
    with torch.inference_mode():
        det = seg.backend.detect(batch, sizes)[0]
        prompt = seg.backend.segment_boxes(batch, sizes, torch.from_numpy(boxes)[None],
                                           torch.full((1, len(boxes)), -1))
    return det, prompt, boxes


def crop_steps(probs: np.ndarray, resized, orig, clip: np.ndarray | None) -> dict:
    """Two steps of ``mask_crops`` (its CPU fast path), each on its own inputs (the crops
    step is the rest of ``mask_crops``)."""
    fused = cpu_fused()
    plan = paste._plan(probs, resized, orig, 0.5, clip, fused)
    return {"mask_crops: _plan": lambda: paste._plan(probs, resized, orig, 0.5, clip, fused),
            "mask_crops: _edges": lambda: paste._edges(plan, probs, 0.5, fused)}


def case_variants(det: Detections, names, resized, orig, batch: int, clip, baseline) -> dict:
    """{step: callable running it for a batch of ``batch`` images} for one case."""
    n = len(det.scores)
    padded = PaddedDetections(det.boxes[None], det.scores[None], det.labels[None],
                              det.mask_probs[None], torch.tensor([n]))
    probs = det.mask_probs.numpy()
    clip_t = None if clip is None else torch.from_numpy(clip)
    boxes_np = det.boxes.numpy()

    def one(masks_fn):
        out = []
        for _ in range(batch):
            d = det.above(0.05)
            boxes = clip if clip is not None else scale_boxes(d.boxes.numpy(), resized, orig)
            masks = masks_fn(d.mask_probs, resized, orig, 0.5, clip_t)
            out.append(Prediction(boxes, d.scores.numpy(), d.labels.numpy(), masks, names))
        return out

    steps = {
        "graph_detections": lambda: [graph_detections(padded, _cfg, _cfg)
                                     for _ in range(batch)],
        "above": lambda: [det.above(0.05) for _ in range(batch)],
        "scale_boxes": lambda: [scale_boxes(boxes_np, resized, orig) for _ in range(batch)],
        **{k: (lambda f=f: [f() for _ in range(batch)])
           for k, f in crop_steps(probs, resized, orig, clip).items()},
        "mask_crops": lambda: [paste.mask_crops(det.mask_probs, resized, orig, 0.5, clip_t)
                               for _ in range(batch)],
        "Prediction": lambda: [Prediction(boxes_np, det.scores.numpy(), det.labels.numpy(),
                                          masks, names) for _ in range(batch)],
        "total": lambda: one(paste.mask_crops),
    }
    masks = paste.mask_crops(det.mask_probs, resized, orig, 0.5, clip_t)
    if baseline is not None and batch == 1:
        old = baseline.mask_crops(det.mask_probs, resized, orig, 0.5, clip_t)
        if not np.array_equal(old.dense(), masks.dense()):
            raise SystemExit(f"baseline masks differ at {orig}")
        steps["mask_crops before"] = lambda: baseline.mask_crops(det.mask_probs, resized, orig,
                                                                 0.5, clip_t)
    return steps


_cfg = None  # the model's InferenceConfig (set in main)


def cases(outputs: dict, names, baseline):
    """(label fields, variants) of every case: size x original x mode x instances x batch."""
    for key, (det, prompt, boxes) in outputs.items():
        h, w = SIZES[key]
        for scale in (1.0, 1.5):
            orig = (int(h * scale), int(w * scale))
            for k in (10, 100):
                if scale > 1 and (key != "512x512" and k == 100):
                    continue  # 100 random masks of 1200x2000 (83 % full): gigabytes, skipped
                for batch in (1, 8) if scale == 1 else (1,):
                    sub = Detections(det.boxes[:k], det.scores[:k], det.labels[:k],
                                     det.mask_probs[:k].contiguous())
                    yield ([key, f"{orig[0]}x{orig[1]}", "automatic", k, batch],
                           case_variants(sub, names, (h, w), orig, batch, None, baseline))
            sub = Detections(torch.from_numpy(boxes), prompt.scores[0], prompt.labels[0],
                             prompt.mask_probs[0].contiguous())
            clip = scale_boxes(boxes, (h, w), orig)
            yield ([key, f"{orig[0]}x{orig[1]}", "prompt", len(boxes), 1],
                   case_variants(sub, names, (h, w), orig, 1, clip, baseline))


def main() -> int:
    global _cfg
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", default=None, help="git revision to compare mask_crops")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--gap-ms", type=float, default=0.0,
                        help="untimed pause after each call (as export_speed.py's: the caches "
                             "go cold, as for a request after an idle moment)")
    parser.add_argument("--name", default="postprocess_profile")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    baseline = baseline_paste(args.baseline) if args.baseline else None
    outputs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.sizes:
            size = SIZES[key]
            ckpt = make_checkpoint("mobilenet_v2", size, Path(tmp) / f"{key}.safetensors")
            seg = Segmenter.from_checkpoint(ckpt, device="cpu")
            outputs[key] = network_outputs(seg, size)
    _cfg = seg.cfg
    rows, results = [], []
    for fields, variants in cases(outputs, seg.class_names, baseline):
        start = time.perf_counter()
        with torch.inference_mode():
            times = interleaved_times(variants, rounds=args.rounds, warmup=1,
                                      on_result=lambda *_: time.sleep(args.gap_ms / 1000))
        stats = {k: summarize(v) for k, v in times.items()}
        results.append({"case": fields, "stats": stats})
        ms = {s: stats[s]["median_ms"] for s in STEPS}
        crops = ms["mask_crops"] - ms["mask_crops: _plan"] - ms["mask_crops: _edges"]
        rows.append([*fields, *[ms[s] for s in STEPS[:5]], max(crops, 0.0),
                     *[ms[s] for s in STEPS[5:]],
                     stats.get("mask_crops before", {}).get("median_ms")])
        print(fields, f"{time.perf_counter() - start:.0f} s", flush=True)
    payload = {"machine": machine_info(), "command": "python " + " ".join(sys.argv),
               "threads": args.threads, "baseline": args.baseline, "results": results}
    text = "\n\n".join([
        "# After the network: per function and per call (CPU)",
        machine_markdown(payload["machine"]),
        f"Command: `{payload['command']}`. Random-weight MobileNetV2-FPN (100 detections per "
        "image, masks covering ~80 % of the image); median ms per call of "
        f"{args.rounds} interleaved rounds, {args.gap_ms:g} ms untimed pause after each call; "
        "a batch of 8 repeats one image's outputs. "
        "`mask_crops: crops` = `mask_crops` - `_plan` - `_edges` (bounds, crops, "
        f"`InstanceMasks`). `mask_crops before`: revision {args.baseline} (same masks, "
        "checked).",
        markdown_table(["input", "original", "mode", "instances", "batch", *STEPS[:5],
                        "mask_crops: crops", *STEPS[5:], "mask_crops before"], rows),
    ])
    write_results(Path(args.output), args.name, payload, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
