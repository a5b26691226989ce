"""Labels made through each labelling format agree box for box and score the same mask AP.

The validation split's boxes (its masks withheld) are written as a COCO box file, a YOLO
detection folder (6 decimals) and a Label Studio export (percent of the image), and labelled
with the same model through each path a user takes:

- ``coco rle`` / ``coco polygon``: ``sim label`` on the COCO file (``--format rle|polygon``);
- ``yolo``: ``sim label`` on the YOLO folder, written as YOLO segmentation (polygons);
- ``labelstudio file``: ``sim label`` on the export, written as Label Studio brush predictions;
- ``labelstudio backend``: the ML backend (``POST /labelstudio/predict`` of ``sim serve
  --label-studio``, in process), one request per 4 tasks, brush results.

Each path's masks are read back from its own output format and compared with the COCO path
of the same encoding (brush with RLE, YOLO polygons with the COCO polygons' largest part):
the IoU of every box's two masks, and mask AP of every path against the withheld masks
(pycocotools, :func:`serving.formats.cocoeval.evaluate_coco`).

    python benchmarks/labelling_formats.py \\
        --model runs/quickstart_nuclei/model_final.safetensors --data data/nuclei

Writes ``benchmarks/results/labelling_formats.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from pycocotools import mask as mask_util  # noqa: E402

from benchmarks.common import (  # noqa: E402
    coco_rle,
    machine_info,
    machine_markdown,
    markdown_table,
    write_results,
)
from serving.cli.label import run_label  # noqa: E402
from serving.formats.cocoeval import evaluate_coco  # noqa: E402
from serving.formats.labelstudio import ls_rle_to_mask  # noqa: E402
from serving.formats.polygons import largest_polygon  # noqa: E402

PREFIX = "0a1b2c3d-"  # a Label Studio upload's file-name prefix


def _mask(segm: Any, h: int, w: int) -> np.ndarray:
    if isinstance(segm, list):
        segm = mask_util.merge(mask_util.frPyObjects(segm, h, w))
    elif isinstance(segm.get("counts"), str):
        segm = dict(segm, counts=segm["counts"].encode("ascii"))
    return mask_util.decode(segm).astype(bool)


def write_sources(gt: dict[str, Any], work: Path) -> dict[str, Path]:
    """The withheld-mask boxes as COCO, YOLO and a Label Studio export; their paths."""
    boxes = copy.deepcopy(gt)
    for ann in boxes["annotations"]:
        ann.pop("segmentation", None)
    (work / "boxes.json").write_text(json.dumps(boxes))
    index = {c["id"]: i for i, c in enumerate(gt["categories"])}
    (work / "yolo" / "labels").mkdir(parents=True)
    (work / "yolo" / "classes.txt").write_text("".join(c["name"] + "\n"
                                                       for c in gt["categories"]))
    tasks = []
    for img in gt["images"]:
        w, h = img["width"], img["height"]
        anns = [a for a in gt["annotations"] if a["image_id"] == img["id"]
                and not a.get("iscrowd")]
        lines, results = [], []
        for a in anns:
            x, y, bw, bh = a["bbox"]
            lines.append(f"{index[a['category_id']]} {(x + bw / 2) / w:.6f} "
                         f"{(y + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}")
            results.append({"id": f"a{a['id']}", "type": "rectanglelabels",
                            "from_name": "box", "to_name": "image", "original_width": w,
                            "original_height": h, "value": {
                                "x": x / w * 100, "y": y / h * 100, "width": bw / w * 100,
                                "height": bh / h * 100, "rotation": 0,
                                "rectanglelabels": [gt["categories"][index[a["category_id"]]]
                                                    ["name"]]}})
        stem = Path(img["file_name"]).with_suffix(".txt")
        (work / "yolo" / "labels" / stem).parent.mkdir(parents=True, exist_ok=True)
        (work / "yolo" / "labels" / stem).write_text("".join(x + "\n" for x in lines))
        tasks.append({"id": img["id"], "data": {"image": f"/data/upload/1/{PREFIX}"
                                                         f"{img['file_name']}"},
                      "annotations": [{"result": results}]})
    (work / "export.json").write_text(json.dumps(tasks))
    return {"coco": work / "boxes.json", "yolo": work / "yolo", "ls": work / "export.json"}


def backend_masks(model: Path, gt: dict[str, Any], images: Path, export: Path,
                  ) -> list[list[tuple[np.ndarray, float]]]:
    """Per task, (mask, score) per box from the ML backend's ``/predict`` (in process)."""
    from fastapi.testclient import TestClient

    from serving import Segmenter
    from serving.server.app import create_app
    from serving.server.labelstudio_images import LabelStudioSettings

    app = create_app(Segmenter.load(model, device="cpu"),
                     label_studio=LabelStudioSettings())
    tasks = json.loads(export.read_text())
    for task, img in zip(tasks, gt["images"], strict=True):
        data = (images / img["file_name"]).read_bytes()
        task["data"]["image"] = "data:image/png;base64," + base64.b64encode(data).decode()
    out = []
    with TestClient(app) as client:
        for start in range(0, len(tasks), 4):
            answer = client.post("/labelstudio/predict", json={"tasks": tasks[start:start + 4]})
            for pred in answer.json()["results"]:
                assert "error" not in pred, pred
                out.append([(ls_rle_to_mask(r["value"]["rle"], r["original_height"],
                                            r["original_width"]), r["score"])
                             for r in pred["result"]])
    return out


def read_paths(gt: dict[str, Any], work: Path, backend: list) -> dict[str, list[dict]]:
    """Each path's labels as COCO results (one per box, in box order)."""
    sizes = {img["id"]: (img["height"], img["width"]) for img in gt["images"]}
    anns = [a for a in gt["annotations"] if not a.get("iscrowd")]
    paths: dict[str, list[dict]] = {}
    for name, file in (("coco rle", "rle.json"), ("coco polygon", "poly.json")):
        labelled = json.loads((work / file).read_text())["annotations"]
        paths[name] = [{"image_id": a["image_id"], "category_id": a["category_id"],
                        "segmentation": a["segmentation"], "score": a["score"]}
                       for a in labelled if "score" in a]
    lines = {img["id"]: iter((work / "yolo_seg" / "labels" / Path(img["file_name"])
                              .with_suffix(".txt")).read_text().splitlines())
             for img in gt["images"]}
    yolo, ls = [], []
    for a in paths["coco polygon"]:  # a mask without a polygon has no YOLO line
        h, w = sizes[a["image_id"]]
        if not isinstance(a["segmentation"], list):
            yolo.append(coco_rle(np.zeros((h, w), bool)))
            continue
        coords = [float(v) for v in next(lines[a["image_id"]]).split()[1:]]
        yolo.append([[c * (w if k % 2 == 0 else h) for k, c in enumerate(coords)]])
    for task in json.loads((work / "ls.json").read_text()):
        ls += task["predictions"][0]["result"]
    ref = paths["coco rle"]
    paths["yolo"] = [dict(r, segmentation=p) for r, p in zip(ref, yolo, strict=True)]
    paths["labelstudio file"] = [
        dict(r, segmentation=coco_rle(ls_rle_to_mask(x["value"]["rle"], *sizes[r["image_id"]])))
        for r, x in zip(ref, ls, strict=True)]
    flat = [m for task in backend for m in task]
    paths["labelstudio backend"] = [dict(r, segmentation=coco_rle(m), score=s)
                                    for r, (m, s) in zip(ref, flat, strict=True)]
    assert len(ref) == len(anns)
    return paths


def agreement(gt: dict[str, Any], paths: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Per path, the IoU of each box's mask with the COCO path of the same encoding."""
    sizes = {img["id"]: (img["height"], img["width"]) for img in gt["images"]}
    out = {}
    for name, results in paths.items():
        ref_name = "coco polygon" if name == "yolo" else "coco rle"
        if name.startswith("coco"):
            continue
        ious = []
        for a, b in zip(results, paths[ref_name], strict=True):
            h, w = sizes[a["image_id"]]
            ref = b["segmentation"]
            if name == "yolo" and not isinstance(ref, list):  # no polygon: no YOLO line
                ref = coco_rle(np.zeros((h, w), bool))
            ref_mask = _mask([largest_polygon(ref)] if isinstance(ref, list) else ref, h, w)
            got = _mask(a["segmentation"], h, w)
            union = (got | ref_mask).sum()
            ious.append(float((got & ref_mask).sum() / union) if union else 1.0)
        out[name] = {"against": ref_name, "boxes": len(ious), "min_iou": min(ious),
                     "mean_iou": float(np.mean(ious)),
                     "share_iou_ge_0.99": float(np.mean([v >= 0.99 for v in ious]))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path,
                        default=ROOT / "runs/quickstart_nuclei/model_final.safetensors")
    parser.add_argument("--data", type=Path, default=ROOT / "data/nuclei")
    parser.add_argument("--split", default="val")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = parser.parse_args()
    gt = json.loads((args.data / f"{args.split}.json").read_text())
    images = args.data / "images"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = write_sources(gt, work)
        runs = [("coco rle", src["coco"], "rle.json", "rle"),
                ("coco polygon", src["coco"], "poly.json", "polygon"),
                ("yolo", src["yolo"], "yolo_seg", "yolo"),
                ("labelstudio file", src["ls"], "ls.json", "labelstudio")]
        for name, source, output, fmt in runs:
            summary = run_label(str(args.model), str(source), str(images), str(work / output),
                                fmt=fmt, device="cpu", progress=False, workers=0)
            assert summary.exit_code == 0, (name, summary.rejected, summary.failed_images)
        backend = backend_masks(args.model, gt, images, src["ls"])
        paths = read_paths(gt, work, backend)
    ap = {name: evaluate_coco(gt, results, iou_types=("segm",))["segm/AP"] * 100
          for name, results in paths.items()}
    agree = agreement(gt, paths)
    payload = {"model": str(args.model), "data": str(args.data), "split": args.split,
               "images": len(gt["images"]), "boxes": len(paths["coco rle"]),
               "mask_ap": ap, "agreement": agree,
               "max_ap_difference": max(ap.values()) - min(ap.values()),
               "machine": machine_info()}
    def fixed(value: float | None, digits: int) -> str | None:
        return None if value is None else f"{value:.{digits}f}"

    rows = [[name, fixed(ap[name], 2), agree.get(name, {}).get("against"),
             fixed(agree.get(name, {}).get("min_iou"), 4),
             fixed(agree.get(name, {}).get("share_iou_ge_0.99"), 3)] for name in paths]
    text = "\n".join([
        "# Labelling formats: the same boxes through COCO, YOLO and Label Studio", "",
        f"{len(gt['images'])} images, {payload['boxes']} boxes of `{args.data.name}/"
        f"{args.split}`, model `{args.model.name}`. Mask AP against the withheld masks; IoU "
        "of every box's mask with the COCO path of the same encoding.", "",
        markdown_table(["path", "mask AP", "compared with", "min IoU", "share IoU >= 0.99"],
                       rows), "",
        f"Largest mask AP difference between paths: {payload['max_ap_difference']:.2f} "
        "(polygon against RLE encodings; the paths of one encoding agree exactly).", "",
        machine_markdown(payload["machine"]), "",
        "`python benchmarks/labelling_formats.py " + " ".join(sys.argv[1:]) + "`"])
    write_results(args.out, "labelling_formats", payload, text)


if __name__ == "__main__":
    main()
