"""Against a real Label Studio (the PyPI package, SQLite, 127.0.0.1): a project with
RectangleLabels and BrushLabels gets images and box annotations through label-studio-sdk, the
SIM backend (``sim serve --label-studio``) is connected, predictions are retrieved for every
task, and each box's mask equals ``sim label``'s for the same image and box (IoU >= 0.99).
The interactive path (a drawn rectangle in ``context``) and the file round trip (the export ->
``sim label`` -> Label Studio predictions -> imported through the SDK) are checked too.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import labelstudio_server as lss
import numpy as np
import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not lss.available(), reason="no .venv-labelstudio; run "
                                 "bash .ci/install-dev.sh")]

sys.path.insert(0, str(Path(__file__).parent / "cli"))
from cli_data import shapes_dataset  # noqa: E402

NAMES = {1: "disc", 2: "square", 3: "triangle"}
LABELS = "".join(f'<Label value="{n}"/>' for n in NAMES.values())
CONFIG = (f'<View><Image name="image" value="$image" zoom="true"/><RectangleLabels name="box" '
          f'toName="image">{LABELS}</RectangleLabels><BrushLabels name="mask" toName="image">'
          f'{LABELS}</BrushLabels></View>')


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope="module")
def servers(tiny_checkpoint, tmp_path_factory):
    """Label Studio and ``sim serve --label-studio``, started side by side; their URLs."""
    port = lss.free_port()
    url = f"http://127.0.0.1:{port}"
    begin = time.monotonic()
    studio = lss.launch(tmp_path_factory.mktemp("label-studio"), port)
    backend, backend_url = lss.launch_backend(tiny_checkpoint, url,
                                              tmp_path_factory.mktemp("backend"))
    try:
        lss.wait_up(backend, backend_url + "/readyz")
        lss.wait_up(studio, url + "/health")
        print(f"label-studio and the backend up in {time.monotonic() - begin:.1f} s")
        yield url, backend_url + "/labelstudio"
    finally:
        lss.stop(backend)
        lss.stop(studio)


def _steps(step: str, args: dict, tmp_path: Path) -> dict:
    return lss.run_steps(step, args, tmp_path)


def _label(model, annotations: Path, images: Path, output: Path) -> None:
    from serving.cli.label import main

    code = main(["--model", str(model), "--annotations", str(annotations), "--images",
                 str(images), "--output", str(output), "--device", "cpu", "--no-progress",
                 "--workers", "0", "--label-config", str(output.parent / "config.xml")])
    assert code == 0


def test_label_studio_backend_and_round_trip(tiny_checkpoint, servers, tmp_path):
    label_studio, backend = servers
    coco = json.loads(shapes_dataset(tmp_path / "data", num_images=3).read_text())
    images = tmp_path / "data" / "images"
    boxes = {img["file_name"]: [a["bbox"] + [NAMES[a["category_id"]]]
                                for a in coco["annotations"] if a["image_id"] == img["id"]]
             for img in coco["images"]}
    sizes = {img["file_name"]: [img["width"], img["height"]] for img in coco["images"]}
    args = {"url": label_studio, "token": lss.TOKEN, "config": CONFIG, "backend": backend,
            "images": [str(images / n) for n in boxes], "boxes": boxes, "sizes": sizes}
    begin = time.monotonic()
    found = _steps("backend", args, tmp_path)
    print(f"project, uploads, boxes, backend, predictions, export: "
          f"{time.monotonic() - begin:.1f} s")
    # sim label on the project's own export: the reference masks, box for box
    (tmp_path / "export.json").write_text(json.dumps(found["export"]))
    (tmp_path / "config.xml").write_text(CONFIG)
    _label(tiny_checkpoint, tmp_path / "export.json", images, tmp_path / "labels.json")
    from serving.formats.labelstudio import ls_rle_to_mask

    reference = json.loads((tmp_path / "labels.json").read_text())
    assert len(found["tasks"]) == len(reference) == 3
    for task, ours in zip(found["tasks"], reference, strict=True):
        (prediction,) = task["predictions"]
        got, want = prediction["result"], ours["predictions"][0]["result"]
        assert len(got) == len(want) == 3 and prediction["model_version"].startswith("sim-")
        for a, b in zip(got, want, strict=True):
            assert a["type"] == "brushlabels" and (a["from_name"], a["to_name"]) == \
                ("mask", "image")
            assert a["value"]["brushlabels"] == b["value"]["brushlabels"]
            h, w = a["original_height"], a["original_width"]
            assert _iou(ls_rle_to_mask(a["value"]["rle"], h, w),
                        ls_rle_to_mask(b["value"]["rle"], h, w)) >= 0.99
    # interactive: the rectangle drawn in the first task gets one mask, its first box's
    (drawn,) = found["interactive"]["data"]["result"]
    first = next(i for i, t in enumerate(found["tasks"]) if t["id"] == found["first_task"])
    want = reference[first]["predictions"][0]["result"][0]
    h, w = want["original_height"], want["original_width"]
    assert _iou(ls_rle_to_mask(drawn["value"]["rle"], h, w),
                ls_rle_to_mask(want["value"]["rle"], h, w)) >= 0.99
    # round trip: sim label's predictions file imports through the SDK unchanged
    back = _steps("import", {**args, "predictions": str(tmp_path / "labels.json")}, tmp_path)
    assert len(back["tasks"]) == 3
    for task, ours in zip(back["tasks"], reference, strict=True):
        (prediction,) = task["predictions"]
        assert [r["value"]["rle"] for r in prediction["result"]] == \
            [r["value"]["rle"] for r in ours["predictions"][0]["result"]]
        assert len(task["annotations"]) == 1  # the boxes came along
