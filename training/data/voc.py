"""Pascal VOC XML annotations -> COCO JSON (boxes only).

Run::

    python -m training.data.voc --voc-root VOCdevkit/VOC2012 --split train --out voc_train.json

Reads ``ImageSets/Main/{split}.txt`` and ``Annotations/{id}.xml``; images stay in
``JPEGImages`` (pass that folder as the dataset's image directory). The 20 VOC classes become
categories 1..20 in the usual order. VOC boxes are 1-based and inclusive, so
``(xmin, ymin, xmax, ymax)`` becomes COCO ``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin +
1]``. Objects marked ``difficult`` become ``iscrowd=1`` (ignored in training, not penalised in
evaluation) unless ``--drop-difficult`` removes them.
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from serving.errors import DatasetError, SimError

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)


def _text(node: ET.Element, path: str, xml_file: Path) -> str:
    found = node.find(path)
    if found is None or found.text is None or not found.text.strip():
        raise DatasetError(f"VOC annotation {xml_file}: missing <{path}>; fix or re-export the "
                           "file")
    return found.text.strip()


def _number(node: ET.Element, path: str, xml_file: Path) -> float:
    text = _text(node, path, xml_file)
    try:
        return float(text)
    except ValueError:
        raise DatasetError(f"VOC annotation {xml_file}: <{path}> is {text!r}, not a number; "
                           "fix the file") from None


def parse_voc_xml(xml_file: str | Path) -> dict[str, Any]:
    """Read one VOC XML file.

    Returns:
        ``{"file_name", "width", "height", "objects": [(class name, [x, y, w, h] COCO pixels,
        difficult bool)]}``.
    Raises:
        DatasetError: malformed XML, a missing field or an unknown class name.
    """
    xml_file = Path(xml_file)
    if not xml_file.is_file():
        raise DatasetError(f"VOC annotation {xml_file}: not found; check --voc-root and the "
                           "split file")
    try:
        root = ET.parse(xml_file).getroot()
    except ET.ParseError as exc:
        line, col = exc.position
        raise DatasetError(f"VOC annotation {xml_file}: malformed XML at line {line} column "
                           f"{col + 1}; fix or re-export the file") from None
    width = int(_number(root, "size/width", xml_file))
    height = int(_number(root, "size/height", xml_file))
    if width <= 0 or height <= 0:
        raise DatasetError(f"VOC annotation {xml_file}: image size {width}x{height} must be "
                           "positive; fix <size>")
    objects = []
    for obj in root.findall("object"):
        name = _text(obj, "name", xml_file).lower()
        if name not in VOC_CLASSES:
            raise DatasetError(f"VOC annotation {xml_file}: unknown class {name!r}; expected one "
                               "of the 20 VOC classes")
        x1, y1, x2, y2 = (_number(obj, f"bndbox/{k}", xml_file)
                          for k in ("xmin", "ymin", "xmax", "ymax"))
        difficult = obj.find("difficult")
        is_difficult = difficult is not None and (difficult.text or "0").strip() == "1"
        objects.append((name, [x1 - 1.0, y1 - 1.0, x2 - x1 + 1.0, y2 - y1 + 1.0], is_difficult))
    file_name = root.findtext("filename", default="").strip() or f"{xml_file.stem}.jpg"
    return {"file_name": file_name, "width": width, "height": height, "objects": objects}


def convert_voc(voc_root: str | Path, split: str, out_file: str | Path | None = None,
                drop_difficult: bool = False) -> dict[str, Any]:
    """Convert one VOC split to a COCO dict (written to ``out_file`` when given).

    Image ids are 1..N in split-file order; annotation ids 1..K; ``area`` is the box area.
    """
    root = Path(voc_root)
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        raise DatasetError(f"VOC split file {split_file}: not found; check --voc-root (the "
                           "folder holding Annotations/ and ImageSets/) and --split")
    ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
    images, annotations = [], []
    for image_id, voc_id in enumerate(ids, start=1):
        info = parse_voc_xml(root / "Annotations" / f"{voc_id}.xml")
        images.append({"id": image_id, "file_name": info["file_name"], "width": info["width"],
                       "height": info["height"], "voc_id": voc_id})
        for name, bbox, difficult in info["objects"]:
            if difficult and drop_difficult:
                continue
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id,
                "category_id": VOC_CLASSES.index(name) + 1, "bbox": bbox,
                "area": bbox[2] * bbox[3], "iscrowd": int(difficult)})
    coco = {"info": {"description": f"Pascal VOC {root.name} {split}"},
            "images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": n, "supercategory": "voc"}
                           for i, n in enumerate(VOC_CLASSES)]}
    if out_file is not None:
        out = Path(out_file)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(coco))
    return coco


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description="Convert Pascal VOC XML to COCO JSON.")
    parser.add_argument("--voc-root", required=True, help="folder with Annotations/, "
                        "ImageSets/ and JPEGImages/ (for example VOCdevkit/VOC2012)")
    parser.add_argument("--split", default="train", help="ImageSets/Main/<split>.txt")
    parser.add_argument("--out", required=True, help="output COCO JSON file")
    parser.add_argument("--drop-difficult", action="store_true",
                        help="drop difficult objects instead of marking them iscrowd=1")
    args = parser.parse_args(argv)
    try:
        coco = convert_voc(args.voc_root, args.split, args.out, args.drop_difficult)
    except SimError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"voc: {len(coco['images'])} images, {len(coco['annotations'])} objects -> {args.out} "
          f"(images in {Path(args.voc_root) / 'JPEGImages'})")


if __name__ == "__main__":
    main()
