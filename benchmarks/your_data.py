"""The path of docs/your_data.md, run on the real nuclei as a user would, with every number.

The napari nuclei stand in for "your" box dataset: the training split is used as boxes only,
five validation images play the few images a user masks by hand, the rest of the validation
split the boxes to label. Stages (each a ``sim`` command, timed):

1. ``sim train``: the paper's SIM (`configs/quickstart_nuclei.yaml`), and our ``sim_bg`` preset;
2. ``sim info --annotations``: the boxes' sizes against the model's training objects;
3. ``sim label --evaluate``: labels of the validation boxes, mask AP on the hand-masked images,
   at the model's size and at two other image sizes (picking the size on the hand masks);
4. ``sim label`` of the training boxes, then ``sim train --preset mask`` on those labels
   ("retrain on the labels"), evaluated on the validation masks;
5. the out-of-domain check across datasets: each model (the quickstart's synthetic-shapes
   model and the nuclei SIM model) labels its own validation boxes at three image sizes and
   the other dataset's boxes, with the median box score against its validation median. Needs a
   quickstart run first (``--synthetic-model``, default
   ``runs/quickstart/model_final.safetensors``; skipped without). ``--domain-only`` redoes this
   stage alone with the models of an earlier run.

    python benchmarks/your_data.py                 # about 20 min on 2 CPU cores

Writes ``benchmarks/results/your_data_nuclei.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine_info, machine_markdown, markdown_table, write_results  # noqa: E402

HAND_MASKED = 5


def sim(*args: str, log: list[dict[str, Any]], out: Path | None = None) -> str:
    """Run ``sim ARGS`` (one torch thread), record its time; returns its stdout."""
    cmd = [sys.executable, "-m", "sim_cli", *args]
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = round(time.perf_counter() - start, 1)
    log.append({"command": "sim " + " ".join(args), "seconds": seconds,
                "exit_code": proc.returncode})
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"sim {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    print(f"{seconds:7.1f} s  sim {' '.join(args)[:110]}", flush=True)
    if out is not None:
        out.write_text(proc.stdout + proc.stderr)
    return proc.stdout + proc.stderr


def split_validation(val_json: Path, work: Path) -> tuple[Path, Path]:
    """``hand.json``: the first images with their masks (what a user masks by hand);
    ``boxes.json``: every validation image with boxes only."""
    val = json.loads(val_json.read_text())
    hand_ids = {img["id"] for img in val["images"][:HAND_MASKED]}
    hand = {**val, "images": [i for i in val["images"] if i["id"] in hand_ids],
            "annotations": [a for a in val["annotations"] if a["image_id"] in hand_ids]}
    boxes = {**val, "annotations": [{k: v for k, v in a.items()
                                     if k not in ("segmentation", "area")}
                                    for a in val["annotations"]]}
    (work / "hand.json").write_text(json.dumps(hand))
    (work / "boxes.json").write_text(json.dumps(boxes))
    return work / "hand.json", work / "boxes.json"


def mask_ap(text: str) -> float:
    line = next(ln for ln in text.splitlines() if ln.startswith("segm/AP "))
    return float(line.split()[1])


def run(work: Path, synthetic_model: Path) -> dict[str, Any]:
    log: list[dict[str, Any]] = []
    data = ROOT / "data" / "nuclei"
    if not (data / "train.json").is_file():
        from training.data.nuclei import convert_nuclei

        convert_nuclei(data)
    hand, boxes = split_validation(data / "val.json", work)
    images = str(data / "images")
    models: dict[str, str] = {}
    for preset in ("sim", "sim_bg"):
        out = work / preset
        sim("train", "--config", "configs/quickstart_nuclei.yaml", "--preset", preset,
            f"output_dir={out}", log=log)
        models[preset] = str(out / "model_final.safetensors")
    results: dict[str, Any] = {"metrics": {p: json.loads((work / p / "metrics.json").read_text())
                                           for p in models}}
    results["info"] = sim("info", models["sim"], "--annotations", str(boxes), log=log)
    results["label_ap"] = {}
    for preset, model in models.items():
        for size in ("256", "320", "384"):
            text = sim("label", "--model", model, "--annotations", str(boxes), "--images",
                       images, "--output", str(work / f"labels_{preset}_{size}.json"),
                       "--evaluate", str(hand), "--image-size", size, "--no-progress", log=log)
            results["label_ap"][f"{preset} @ {size}"] = mask_ap(text)
    labelled = work / "train_labelled.json"
    sim("label", "--model", models["sim"], "--annotations", str(data / "train.json"), "--images",
        images, "--output", str(labelled), "--no-progress", log=log)
    sim("train", "--config", "configs/quickstart_nuclei.yaml", "--preset", "mask",
        f"data.train_json={labelled}", f"output_dir={work / 'retrained'}", log=log)
    results["metrics"]["mask on SIM's labels"] = json.loads(
        (work / "retrained" / "metrics.json").read_text())
    if synthetic_model.is_file():
        results["domain"] = domain_check(work, synthetic_model, models["sim"], boxes, log)
    results["log"] = log
    return results


def domain_check(work: Path, synthetic_model: Path, nuclei_model: str, nuclei_boxes: Path,
                 log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each model labels its own validation boxes (in domain) and the other dataset's (out of
    domain) at the default settings (the per-box scale, whose scores the calibration's
    reference measures; with an ``--image-size`` the scores are the model's box scores and
    are not compared); records whether ``label`` warned "out of domain", the median score
    and its ratio to the model's validation median."""
    synthetic, nuclei = ROOT / "data" / "synthetic", ROOT / "data" / "nuclei"
    data = {"synthetic": (synthetic / "val.json", synthetic / "images"),
            "nuclei": (nuclei_boxes, nuclei / "images")}
    models = {"synthetic": str(synthetic_model), "nuclei": nuclei_model}
    runs = [(m, d) for m in models for d in (m, *(x for x in models if x != m))]
    rows = []
    for model_name, data_name in runs:
        boxes, images = data[data_name]
        out = work / f"domain_{model_name}_on_{data_name}.json"
        text = sim("label", "--model", models[model_name], "--annotations", str(boxes),
                   "--images", str(images), "--output", str(out), "--no-progress", log=log)
        rows.append({"model": f"{model_name} model", "data": data_name, "image_size": "default",
                     **domain_row(text, out, models[model_name])})
    return rows


def domain_row(text: str, labelled: Path, model: str) -> dict[str, Any]:
    """What one cross-dataset ``label`` run said and scored: whether it warned (and the line),
    the median box score of its labels, the model's validation median and the empty masks."""
    from serving.model.model_file import read_checkpoint_card

    line = next((ln for ln in text.splitlines() if "out of domain" in ln), "")
    anns = json.loads(labelled.read_text())["annotations"]
    reference = read_checkpoint_card(model).calibration.prompt_scores.get("p50")
    median = float(np.median([a["score"] for a in anns]))
    return {"warned": bool(line), "warning": line.strip(), "median_score": round(median, 3),
            "validation_median": reference,
            "ratio": round(median / reference, 2) if reference else None,
            "empty": sum(1 for a in anns if a.get("sim_empty")), "boxes": len(anns)}


def write(results: dict[str, Any], info: dict[str, Any], name: str,
          command: str | None = None) -> None:
    out = ROOT / "benchmarks" / "results"
    command = command or "python benchmarks/your_data.py " + " ".join(sys.argv[1:])
    rows = [[k, round(m["segm/AP"], 1), round(m["bbox/AP"], 1)]
            for k, m in results["metrics"].items()]
    label_rows = [[k, v] for k, v in results["label_ap"].items()]
    times = [[e["command"][:90], e["seconds"]] for e in results["log"]]
    domain = ""
    if results.get("domain"):
        domain_rows = [[r["model"], r["data"], r["image_size"], r["boxes"], r["median_score"],
                        r["validation_median"], r["ratio"], r["empty"],
                        "yes" if r["warned"] else "no"] for r in results["domain"]]
        warnings = sorted({r["warning"] for r in results["domain"] if r["warned"]})
        domain = ("## Out-of-domain warning, each model on each dataset's validation boxes\n\n"
                  "The warning fires when the median box score is below 0.6 of the model's "
                  "validation median (`ratio`).\n\n"
                  + markdown_table(["model", "boxes of", "--image-size", "boxes",
                                    "median score", "validation median", "ratio",
                                    "empty masks", "warns"], domain_rows)
                  + "\n\n" + "".join(f"- `{w}`\n" for w in warnings) + "\n")
    text = (f"# Your data, end to end: the nuclei\n\n`{command.strip()}`\n\n"
            f"{machine_markdown(info)}\n\n## Models (validation split, 300 iterations)\n\n"
            f"{markdown_table(['model', 'mask AP', 'box AP'], rows)}\n\n"
            f"## Labels of the validation boxes, mask AP on {HAND_MASKED} hand-masked images\n\n"
            f"{markdown_table(['model @ --image-size', 'mask AP'], label_rows)}\n\n"
            f"## Sizes\n\n```\n{results['info'].strip()}\n```\n\n{domain}## Commands and times\n\n"
            f"{markdown_table(['command', 'seconds'], times)}\n")
    write_results(out, name, {"command": command.strip(), "machine": info, **results},
                  text.rstrip("\n"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="runs/your_data", help="folder for runs and labels")
    parser.add_argument("--name", default="your_data_nuclei")
    parser.add_argument("--synthetic-model", default="runs/quickstart/model_final.safetensors",
                        help="the quickstart's model, for the cross-dataset domain check")
    parser.add_argument("--domain-only", action="store_true",
                        help="redo only the domain check with the models of an earlier run")
    args = parser.parse_args()
    info = machine_info()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.domain_only:  # the models of an earlier full run; only the domain table is redone
        results = json.loads((ROOT / "benchmarks" / "results" / f"{args.name}.json").read_text())
        command = results.pop("command")
        results.pop("machine")
        results["log"] = [e for e in results["log"] if "/domain_" not in e["command"]]
        results["domain"] = domain_check(
            work, Path(args.synthetic_model), str(work / "sim" / "model_final.safetensors"),
            work / "boxes.json", results["log"])
        write(results, info, args.name, command=f"{command}; {' '.join(['python', *sys.argv])}")
        return 0
    write(run(work, Path(args.synthetic_model)), info, args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
