"""``python -m training.quickstart``: the README's main job, end to end on the built-in data.

1. generate the synthetic dataset (boxes for training, masks kept for evaluation only);
2. train the CPU quickstart model (MobileNetV2-FPN, offline ImageNet weights, SIM);
3. evaluate mask and box AP on the validation split, next to the untrained model;
4. export to ONNX and verify it against PyTorch (when the export extra is installed);
5. run the batch command line on a few validation images, automatic and box-prompted,
   and print where the results and pictures are.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from serving import Segmenter
from serving.errors import SimError

from .config import load_config
from .evaluate import evaluate_untrained
from .train import train


def _run(cmd: list[str]) -> int:
    print("$", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart_cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        cfg = load_config(args.config, args.overrides)
        result = train(cfg)
        out = Path(cfg.output_dir)
        ckpt = result["checkpoint"]
        trained = result["metrics"]
        untrained = evaluate_untrained(load_config(args.config, args.overrides),
                                       out / "model_untrained.safetensors")
    except SimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    summary = {"trained": trained, "untrained": untrained,
               "train_and_eval_seconds": round(time.perf_counter() - start, 1)}
    (out / "quickstart_summary.json").write_text(json.dumps(summary, indent=2))

    val_json = json.loads(Path(cfg.data.val_json).read_text())
    names = [img["file_name"] for img in val_json["images"][:6]]
    images = [str(Path(cfg.data.val_images) / n) for n in names]
    export_dir = out / "export"
    exported = _run([sys.executable, "-m", "export", "--checkpoint", ckpt, "--format", "onnx",
                     "--exporter", "torchscript",
                     "--output", str(export_dir), "--verify", *images[:2]]) == 0
    pred_dir = out / "predictions"
    _run([sys.executable, "-m", "serving", "predict", "--model", ckpt, "--input", *images,
          "--output", str(pred_dir), "--save-vis"])
    prompt_dir = out / "predictions_prompted"
    _run([sys.executable, "-m", "serving", "predict", "--model", ckpt, "--input", *images,
          "--boxes", cfg.data.val_json, "--output", str(prompt_dir), "--save-vis"])

    seg = Segmenter.from_checkpoint(ckpt, device="cpu")
    print("\n=== quickstart done ===")
    classes = ", ".join(seg.class_names)
    print(f"model:        {ckpt}  ({seg.info.get('backbone')}, classes {classes})")
    print(f"mask AP:      {trained.get('segm/AP', float('nan')):.1f} trained vs "
          f"{untrained.get('segm/AP', float('nan')):.1f} untrained "
          f"(box AP {trained.get('bbox/AP', float('nan')):.1f} vs "
          f"{untrained.get('bbox/AP', float('nan')):.1f})")
    print(f"metrics:      {out / 'metrics.json'}   summary: {out / 'quickstart_summary.json'}")
    print(f"tensorboard:  tensorboard --logdir {out}")
    if exported:
        print(f"onnx:         {export_dir}")
    print(f"pictures:     {pred_dir / 'vis'} (automatic), {prompt_dir / 'vis'} (box-prompted)")
    print(f"time:         {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
