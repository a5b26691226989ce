"""Pascal VOC XML -> COCO conversion on hand-written files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.errors import DatasetError
from training.data.coco_dataset import CocoInstanceDataset
from training.data.voc import VOC_CLASSES, convert_voc, main

XML = """<annotation>
  <folder>VOC2012</folder><filename>{name}.jpg</filename>
  <size><width>100</width><height>80</height><depth>3</depth></size>
  <object><name>dog</name><difficult>0</difficult>
    <bndbox><xmin>10</xmin><ymin>20</ymin><xmax>50</xmax><ymax>79</ymax></bndbox></object>
  <object><name>person</name><difficult>1</difficult>
    <bndbox><xmin>1</xmin><ymin>1</ymin><xmax>100</xmax><ymax>80</ymax></bndbox></object>
</annotation>
"""


def _voc(root: Path, xml: str = XML, name: str = "2007_000001") -> Path:
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main" / "train.txt").write_text(f"{name}\n")
    (root / "Annotations" / f"{name}.xml").write_text(xml.format(name=name))
    Image.fromarray(np.zeros((80, 100, 3), np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
    return root


def test_conversion_gives_expected_coco_boxes(tmp_path: Path) -> None:
    coco = convert_voc(_voc(tmp_path / "voc"), "train")
    assert coco["images"] == [{"id": 1, "file_name": "2007_000001.jpg", "width": 100,
                               "height": 80, "voc_id": "2007_000001"}]
    dog, person = coco["annotations"]
    # 1-based inclusive (10, 20, 50, 79) -> x = 9, y = 19, w = 41, h = 60
    assert dog["bbox"] == [9.0, 19.0, 41.0, 60.0] and dog["area"] == 41 * 60
    assert dog["category_id"] == VOC_CLASSES.index("dog") + 1 == 12 and dog["iscrowd"] == 0
    assert person["bbox"] == [0.0, 0.0, 100.0, 80.0] and person["iscrowd"] == 1
    assert [c["id"] for c in coco["categories"]] == list(range(1, 21))
    dropped = convert_voc(tmp_path / "voc", "train", drop_difficult=True)
    assert [a["category_id"] for a in dropped["annotations"]] == [12]


def test_cli_output_loads_in_box_mode(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = _voc(tmp_path / "voc")
    out = tmp_path / "out" / "train.json"
    main(["--voc-root", str(root), "--split", "train", "--out", str(out)])
    assert "1 images, 2 objects" in capsys.readouterr().out
    ds = CocoInstanceDataset(out, root / "JPEGImages", mode="box")
    assert ds.num_crowd == 1 and ds[0]["boxes"].tolist() == [[9, 19, 50, 79]]
    assert ds.class_names[ds[0]["labels"][0]] == "dog"
    assert json.loads(out.read_text())["annotations"][0]["bbox"] == [9.0, 19.0, 41.0, 60.0]


@pytest.mark.parametrize("xml,pattern", [
    ("<annotation><size><width>10</width>", "malformed XML at line 1"),
    (XML.replace("<name>dog</name>", "<name>dragon</name>"), "unknown class 'dragon'"),
    (XML.replace("<xmin>10</xmin>", ""), "missing <bndbox/xmin>"),
])
def test_bad_xml_names_the_file(tmp_path: Path, xml: str, pattern: str) -> None:
    root = _voc(tmp_path / "voc", xml)
    with pytest.raises(DatasetError, match=pattern) as info:
        convert_voc(root, "train")
    assert "2007_000001.xml" in str(info.value)


def test_missing_split_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="val.txt"):
        convert_voc(_voc(tmp_path / "voc"), "val")
    with pytest.raises(SystemExit, match="error: VOC split file"):
        main(["--voc-root", str(tmp_path / "voc"), "--split", "val", "--out",
              str(tmp_path / "x.json")])
