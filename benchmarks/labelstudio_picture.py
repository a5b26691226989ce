"""The picture of docs/labelling_tools.md: a task labelled with SIM masks in Label Studio.

Starts a real Label Studio (``.venv-labelstudio``, see tests/labelstudio_server.py) and ``sim
serve --label-studio``, makes a project with RectangleLabels and BrushLabels, uploads
``--images`` validation images with their boxes, connects the backend, retrieves predictions
for every task, accepts the first task's masks into its annotation (as a reviewer would) and
saves Label Studio's editor on that task, as headless Chromium shows it.

    python benchmarks/labelstudio_picture.py \\
        --model runs/quickstart_nuclei/model_final.safetensors --data data/nuclei

Writes ``benchmarks/results/labelstudio_task.png`` and prints how long each step took.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import labelstudio_server as lss  # noqa: E402


def config(names: list[str]) -> str:
    """The labelling config the docs give: boxes, and brush masks with the same labels."""
    boxes = "".join(f'<Label value="{n}" background="#00c8ff"/>' for n in names)
    masks = "".join(f'<Label value="{n}" background="#ff3b30"/>' for n in names)
    return (f'<View><Image name="image" value="$image" zoom="true"/><RectangleLabels '
            f'name="box" toName="image" smart="true" fillOpacity="0" strokeWidth="2">'
            f'{boxes}'
            f'</RectangleLabels><BrushLabels name="mask" toName="image">{masks}</BrushLabels>'
            '</View>')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path,
                        default=ROOT / "runs/quickstart_nuclei/model_final.safetensors")
    parser.add_argument("--data", type=Path, default=ROOT / "data/nuclei")
    parser.add_argument("--split", default="val")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/"
                                                          "labelstudio_task.png")
    args = parser.parse_args()
    gt = json.loads((args.data / f"{args.split}.json").read_text())
    names = {c["id"]: c["name"] for c in gt["categories"]}
    chosen = gt["images"][: args.images]
    boxes = {img["file_name"]: [a["bbox"] + [names[a["category_id"]]]
                                for a in gt["annotations"] if a["image_id"] == img["id"]]
             for img in chosen}
    sizes = {img["file_name"]: [img["width"], img["height"]] for img in chosen}
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        begin = time.monotonic()
        studio = lss.start(work / "label-studio", lss.free_port())
        url = f"http://127.0.0.1:{studio.args[studio.args.index('-p') + 1]}"
        times["label-studio start"] = time.monotonic() - begin
        backend, backend_url = lss.start_backend(args.model, url, work / "backend")
        try:
            begin = time.monotonic()
            found = lss.run_steps("backend", {
                "url": url, "token": lss.TOKEN, "config": config(list(names.values())),
                "backend": backend_url, "images": [str(args.data / "images" / n)
                                                   for n in boxes],
                "boxes": boxes, "sizes": sizes}, work)
            times["project, upload, predictions"] = time.monotonic() - begin
            lss.run_steps("accept", {"url": url, "token": lss.TOKEN,
                                     "task": found["first_task"]}, work)
            begin = time.monotonic()
            lss.screenshot(url, found["project"], found["first_task"], args.out)
            times["screenshot"] = time.monotonic() - begin
        finally:
            lss.stop(backend)
            lss.stop(studio)
    for step, seconds in times.items():
        print(f"{step}: {seconds:.1f} s")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
