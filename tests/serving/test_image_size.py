"""The test-time image size: one option from ``Segmenter.load`` to every command, reaching the
canvas the network sees."""

from __future__ import annotations

import numpy as np
import pytest

from serving import InputError, Segmenter
from serving.backends.torch_backend import TorchBackend


@pytest.fixture()
def canvases(monkeypatch):
    """Records the (H, W) of every batch the torch backend runs."""
    seen: list[tuple[int, int]] = []
    detect, prompt = TorchBackend.detect, TorchBackend.segment_boxes

    def spy_detect(self, images, sizes):
        seen.append(tuple(images.shape[-2:]))
        return detect(self, images, sizes)

    def spy_prompt(self, images, sizes, *args):
        seen.append(tuple(images.shape[-2:]))
        return prompt(self, images, sizes, *args)

    monkeypatch.setattr(TorchBackend, "detect", spy_detect)
    monkeypatch.setattr(TorchBackend, "segment_boxes", spy_prompt)
    return seen


def test_image_size_sets_the_canvas(tiny_checkpoint, canvases):
    image = np.full((100, 150, 3), 90, np.uint8)
    base = Segmenter.load(tiny_checkpoint, device="cpu")  # min 128, max 256
    assert (base.cfg.min_size, base.cfg.max_size) == (128, 256)
    base.predict(image)
    small = Segmenter.load(tiny_checkpoint, device="cpu", image_size=64)  # long: 64 * 2
    assert (small.cfg.min_size, small.cfg.max_size) == (64, 128)
    small.predict(image, boxes=[[10, 10, 60, 60]])
    big = base.with_image_size(160, 200)
    big.predict(image)
    # 100x150 -> short side 128 (192 wide), 64 (96), 160 capped by 200 (133x200), padded to 32
    assert canvases == [(128, 192), (64, 96), (160, 224)]
    assert big.backend is base.backend  # the loaded model is shared
    assert small.predict(image).masks.shape[1:] == (100, 150)  # original size, as always


def test_bad_image_sizes_are_one_line_errors(tiny_checkpoint):
    seg = Segmenter.load(tiny_checkpoint, device="cpu")
    for args, match in [((16,), "need 32 <= SHORT <= LONG"), ((300, 200), "need 32")]:
        with pytest.raises(InputError, match=match):
            seg.with_image_size(*args)
    with pytest.raises(InputError, match="give SHORT or"):
        Segmenter.load(tiny_checkpoint, device="cpu", image_size=[64, 128, 256])
    with pytest.raises(InputError, match="need 32 <= SHORT <= LONG <= 4096"):
        Segmenter.load(tiny_checkpoint, device="cpu", image_size=100000)
    with pytest.raises(InputError, match="need 32 <= SHORT <= LONG <= 4096"):
        seg.with_image_size(800, 100000)
    assert seg.with_image_size(4000).cfg.max_size == 4096  # the default LONG is capped


def test_the_image_size_bound_is_stated_in_help(capsys):
    from serving.__main__ import main

    for command in ("predict", "label", "serve"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "<= 4096" in " ".join(capsys.readouterr().out.split()), command


@pytest.mark.parametrize("command", ["predict", "label"])
def test_batch_commands_pass_image_size_to_the_model(command, tiny_checkpoint, tmp_path,
                                                     canvases):
    import json

    from PIL import Image

    from serving.cli.main import main

    Image.fromarray(np.full((100, 150, 3), 90, np.uint8)).save(tmp_path / "a.png")
    coco = {"images": [{"id": 1, "file_name": "a.png", "height": 100, "width": 150}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40]}],
            "categories": [{"id": 1, "name": "disc"}]}
    (tmp_path / "boxes.json").write_text(json.dumps(coco))
    for size in ("64", "96"):
        out = tmp_path / f"out{size}"
        args = (["predict", "--input", str(tmp_path / "a.png"), "--output", str(out)]
                if command == "predict" else
                ["label", "--annotations", str(tmp_path / "boxes.json"), "--images",
                 str(tmp_path), "--output", str(out) + ".json"])
        assert main([*args, "--model", str(tiny_checkpoint), "--device", "cpu",
                     "--image-size", size, "--no-progress"]) == 0
    assert canvases == [(64, 96), (96, 160)]
    if command == "label":
        info = json.loads((tmp_path / "out96.json").read_text())["info"]["sim_label"]
        assert info["image_size"] == [96, 192]


def test_labels_that_are_no_class_are_one_line_errors(tiny_checkpoint):
    seg = Segmenter.load(tiny_checkpoint, device="cpu")
    image = np.full((64, 64, 3), 90, np.uint8)
    for bad in (float("nan"), {}, 1.5, True, "nope"):
        with pytest.raises(InputError, match="label 0: "):
            seg.predict(image, boxes=[[5, 5, 30, 30]], labels=[bad])
    assert len(seg.predict(image, boxes=[[5, 5, 30, 30]], labels=[np.int64(1)])) == 1
