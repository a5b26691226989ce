"""The running app through ``gradio_client``: two boxes give two masks inside them; bad
uploads, too many boxes and oversized images give error messages; the server keeps serving."""

from __future__ import annotations

import json

import numpy as np
import pytest
from app_helpers import SERVER_MAX_BOXES, SERVER_MAX_SIDE, two_rect_image
from PIL import Image

pytest.importorskip("gradio", reason="the app needs the 'app' extra: pip install -e .[app]")
pytest.importorskip("gradio_image_annotation", reason="the app needs the 'app' extra")
gradio_client = pytest.importorskip("gradio_client", reason="needs gradio_client")
from gradio_client.exceptions import AppError  # noqa: E402

BOXES = [[25, 15, 85, 65], {"box": [85, 45, 155, 115], "label": "ring"}]
XYXY = [[25, 15, 85, 65], [85, 45, 155, 115]]


@pytest.fixture(scope="module")
def client(app_server):
    return gradio_client.Client(app_server, verbose=False)


@pytest.fixture(scope="module")
def good_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("client") / "two_rects.png"
    two_rect_image(path)
    return path


def _segment(client, path, boxes, mode="boxes", threshold=0.3):
    return client.predict(gradio_client.handle_file(str(path)), json.dumps(boxes), mode,
                          threshold, api_name="/segment_json")


def _check_two_masks(result):
    from pycocotools import mask as mask_util

    overlay_path, coco, png_path = result
    assert np.asarray(Image.open(overlay_path)).shape == (120, 160, 3)
    anns = coco["annotations"]
    assert len(anns) == 2
    assert [a["category_name"] for a in anns][1] == "ring"  # the class chosen for box 2
    label_png = np.asarray(Image.open(png_path))
    for i, (ann, (x1, y1, x2, y2)) in enumerate(zip(anns, XYXY, strict=True)):
        mask = mask_util.decode(ann["segmentation"]).astype(bool)
        assert mask.shape == (120, 160) and mask.any()
        assert not mask[:y1].any() and not mask[y2:].any()  # inside its box
        assert not mask[:, :x1].any() and not mask[:, x2:].any()
        assert ann["bbox"] == [x1, y1, x2 - x1, y2 - y1]
        np.testing.assert_array_equal(label_png == i + 1, mask)


def test_two_boxes_then_corrupt_file_then_good_again(client, good_png, tmp_path):
    _check_two_masks(_segment(client, good_png, BOXES))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(good_png.read_bytes()[:200])  # a truncated PNG
    with pytest.raises(AppError, match="corrupt.png: corrupt or truncated"):
        _segment(client, corrupt, BOXES)
    _check_two_masks(_segment(client, good_png, BOXES))  # still serving


def test_refusals_have_messages(client, good_png, tmp_path):
    too_many = [[0, 0, 10 + i, 10] for i in range(SERVER_MAX_BOXES + 1)]
    with pytest.raises(AppError, match=f"takes at most {SERVER_MAX_BOXES} per image"):
        _segment(client, good_png, too_many)
    with pytest.raises(AppError, match="box 1: .*reversed or has zero area"):
        _segment(client, good_png, [[0, 0, 10, 10], [50, 50, 40, 60]])
    with pytest.raises(AppError, match="not valid JSON"):
        client.predict(gradio_client.handle_file(str(good_png)), "[[1, 2", "boxes", 0.3,
                       api_name="/segment_json")
    wide = tmp_path / "wide.png"
    Image.new("RGB", (SERVER_MAX_SIDE + 1, 16)).save(wide)
    with pytest.raises(AppError, match=f"larger than the {SERVER_MAX_SIDE} px limit"):
        _segment(client, wide, BOXES)


def test_upload_size_limit(client, tmp_path):
    big = tmp_path / "big.png"  # incompressible noise: over the 0.5 MB upload limit
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (500, 500, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 600_000
    with pytest.raises(Exception, match="exceeds the maximum file size"):
        _segment(client, big, BOXES)


def test_automatic_mode_and_model_info(client, good_png):
    info = client.predict(api_name="/model_info")
    assert info["classes"] == ["disc", "ring", "triangle"] and info["backend"] == "torch"
    assert info["max_boxes"] == SERVER_MAX_BOXES and info["max_side"] == SERVER_MAX_SIDE
    assert info["max_prompt_boxes"] == 256  # per forward pass: --max-boxes leaves it alone
    _, coco, _ = _segment(client, good_png, [], mode="automatic", threshold=0.5)
    scores = [a["score"] for a in coco["annotations"]]
    assert scores and min(scores) >= 0.5


def test_page_endpoint_takes_annotator_values(client, good_png):
    value = {"image": gradio_client.handle_file(str(good_png)),
             "boxes": [{"xmin": 25, "ymin": 15, "xmax": 85, "ymax": 65, "label": "disc"}],
             "orientation": 0}
    overlay, table, coco_path, png_path, status = client.predict(value, False, 0.3,
                                                                 api_name="/segment")
    assert status.startswith("**Done:**")
    assert table["data"][0][:2] == [1, "disc"]
    coco = json.loads(open(coco_path).read())
    assert coco["annotations"][0]["category_id"] == 1
