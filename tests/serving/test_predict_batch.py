"""``Segmenter.predict_batch`` as a hard API: every list length checked with a one-line
``SimError``, images streamed (bounded memory), results independent of the other images of a
batch, per-image score thresholds, extreme aspect ratios refused, pickles refused."""

from __future__ import annotations

import io
import re
import weakref

import numpy as np
import pytest
from PIL import Image

import serving.segmenter as segmenter_mod
from serving import Segmenter, SimError
from serving.errors import ImageError, InputError


@pytest.fixture(scope="module")
def seg(varied_checkpoint) -> Segmenter:
    """A tiny model whose masks depend on the location (min_size 128, max_size 256)."""
    return Segmenter.from_checkpoint(varied_checkpoint, device="cpu")


def picture(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    img[height // 4: height // 2, width // 5: width // 2] = (230, 30, 30)
    return img


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


BOX = [[10, 10, 60, 50]]


# ------------------------------------------------------------------ list lengths
@pytest.mark.parametrize("kwargs, message", [
    ({"boxes": [BOX, BOX], "labels": [[0]]}, "labels: 1 entries for 2 images"),
    ({"boxes": [BOX]}, "boxes: 1 entries for 2 images"),
    ({"boxes": [BOX, BOX, BOX]}, "boxes: 3 entries for 2 images"),
    ({"labels": [[0], [1]]}, "labels: given without boxes"),
    ({"boxes": [BOX, None], "labels": [[0], [1]]}, "labels[1]: given for image 1, which has no"),
    ({"score_threshold": [0.5]}, "score_threshold: 1 entries for 2 images"),
    ({"boxes": "10,10,60,50"}, "boxes: expected a list with one entry per image"),
    ({"batch_size": 0}, "batch_size=0 must be an integer of at least 1"),
])
def test_list_lengths_and_options_are_checked(seg, kwargs, message):
    image = picture(60, 80, 0)
    with pytest.raises(SimError, match=re.escape(message)) as exc:
        seg.predict_batch([image, image], **kwargs)
    assert "\n" not in str(exc.value) and isinstance(exc.value, InputError)


def test_lengths_are_checked_for_a_generator_of_images(seg):
    image = picture(60, 80, 0)
    with pytest.raises(InputError, match="boxes: 1 entries for more images"):
        seg.predict_batch((image for _ in range(2)), boxes=[BOX])
    with pytest.raises(InputError, match="boxes: 3 entries for 2 images"):
        seg.predict_batch((image for _ in range(2)), boxes=[BOX, BOX, BOX])


def test_labels_given_without_boxes_for_one_image_is_refused_like_the_server(seg):
    """The issue's reproduction: labels for fewer images than boxes is a SimError (it used to
    be an IndexError), and so are labels for an image in automatic mode."""
    image = picture(60, 80, 0)
    with pytest.raises(SimError):
        seg.predict_batch([image, image], boxes=[BOX, BOX], labels=[[0]])
    with pytest.raises(SimError, match="labels: given without boxes"):
        seg.predict(image, labels=[0])


# ------------------------------------------------------------------ streaming
def test_images_are_decoded_one_batch_at_a_time(seg, monkeypatch):
    """A generator of 12 encoded images, batch 3: at most 3 decoded arrays alive at any time,
    and the first result comes after reading only the first batch."""
    alive, peak, pulled = [0], [0], []
    real_load = segmenter_mod.load_image

    def counting_load(source):
        arr = real_load(source)
        alive[0] += 1
        peak[0] = max(peak[0], alive[0])
        weakref.finalize(arr, lambda: alive.__setitem__(0, alive[0] - 1))
        return arr

    monkeypatch.setattr(segmenter_mod, "load_image", counting_load)
    encoded = [png(picture(60, 80, i)) for i in range(12)]

    def source():
        for i, data in enumerate(encoded):
            pulled.append(i)
            yield data

    stream = seg.predict_stream(source(), batch_size=3)
    first = next(stream)
    assert len(pulled) == 3 and first.image_size == (60, 80)
    preds = [first, *stream]
    assert len(preds) == 12 and len(pulled) == 12
    assert peak[0] <= 3 and alive[0] == 0
    assert len(seg.predict_batch(iter(encoded[:5]), batch_size=2)) == 5


# ------------------------------------------------------------------ batch partners
def _mixed_images() -> list[np.ndarray]:
    """Landscape and portrait images: padded together they would share a 192x192 canvas."""
    return [picture(120, 160, 1), picture(160, 120, 2), picture(100, 170, 3),
            picture(170, 90, 4)]


def assert_identical(a, b) -> None:
    """Same detections and the same boolean masks; boxes and scores equal up to the float
    rounding of convolutions run at another batch size (~1e-6)."""
    assert len(a) == len(b)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_allclose(a.boxes, b.boxes, rtol=0, atol=1e-4)
    np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-5)


def test_automatic_results_do_not_depend_on_batch_partners(seg):
    images = _mixed_images()
    alone = [seg.predict(im) for im in images]
    together = seg.predict_batch(images, batch_size=4)
    assert all(len(p) > 0 for p in alone)
    for a, b in zip(alone, together, strict=True):
        assert_identical(a, b)


def test_prompted_results_do_not_depend_on_batch_partners(seg):
    images = _mixed_images()
    boxes = [np.array([[5, 5, 70, 60], [30, 40, 85, 95]], np.float32)[: 1 + i % 2]
             for i in range(4)]
    alone = [seg.predict(im, boxes=bx) for im, bx in zip(images, boxes)]
    together = seg.predict_batch(images, boxes=boxes, batch_size=4)
    mixed_modes = seg.predict_batch(images, boxes=[boxes[0], None, boxes[2], None],
                                    batch_size=4)
    for a, b in zip(alone, together, strict=True):
        assert_identical(a, b)
        assert all(m.any() for m in a.masks)
    assert_identical(mixed_modes[2], alone[2])
    assert_identical(mixed_modes[1], seg.predict(images[1]))


# ------------------------------------------------------------------ thresholds
def test_score_threshold_per_image(seg):
    image = picture(120, 160, 5)
    full = seg.predict(image)
    k = int(np.argmax(-np.diff(full.scores)))  # a threshold in the widest gap between scores
    t = float(full.scores[k] + full.scores[k + 1]) / 2
    preds = seg.predict_batch([image, image, image], score_threshold=[None, t, 1.0])
    assert len(preds[0]) == len(full)
    kept = full.scores >= t  # batch 3 vs 1: scores may differ by float rounding (~1e-7)
    np.testing.assert_allclose(preds[1].scores, full.scores[kept], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(preds[1].masks, full.masks[kept])
    assert len(preds[1]) == k + 1 and preds[1].scores.min() >= t
    assert len(preds[2]) == 0 and preds[2].masks.shape == (0, 120, 160)
    assert len(seg.predict(image, score_threshold=t)) == len(preds[1])


# ------------------------------------------------------------------ aspect ratio
def test_extreme_aspect_ratio_is_a_one_line_image_error(seg, tmp_path):
    """max_size 256 keeps the shorter side >= 8 px up to about 32:1; 20x2000 (100:1) would
    resize its short side to 3 px (and 1:512 to 0 px, a torch error before)."""
    path = tmp_path / "strip.png"
    Image.fromarray(picture(20, 2000, 6)).save(path)
    with pytest.raises(ImageError) as exc:
        seg.predict(path)
    message = str(exc.value)
    assert str(path) in message and "100:1" in message and "limit of 32:1" in message
    assert "\n" not in message
    with pytest.raises(ImageError, match="512:1"):
        seg.predict(picture(8, 4096, 7))
    assert seg.predict(picture(10, 336, 8)).image_size == (10, 336)  # short side 7.6 -> 8 px
    with pytest.raises(ImageError):
        seg.predict(picture(10, 350, 8))  # short side 7.3 -> 7 px


def test_extreme_aspect_ratio_in_the_cli_is_reported_and_skipped(seg, tmp_path, capsys):
    from serving.__main__ import main

    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(picture(20, 2000, 6)).save(folder / "strip.png")
    Image.fromarray(picture(120, 160, 1)).save(folder / "good.png")
    checkpoint = seg.info["path"]
    code = main(["predict", "--model", checkpoint, "--input", str(folder), "--output",
                 str(tmp_path / "out"), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 3  # partial: the good image is done, the bad one reported
    assert "strip.png" in err and "limit of 32:1" in err and "Traceback" not in err


def test_extreme_aspect_ratio_on_the_server_is_a_422(seg):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from serving.server.app import create_app
    from serving.server.requests import ServerSettings

    with TestClient(create_app(seg, ServerSettings()), raise_server_exceptions=False) as client:
        reply = client.post("/v1/segment",
                            files={"image": ("strip.png", png(picture(20, 2000, 6)), "image/png")})
        assert reply.status_code == 422, reply.text
        assert "limit of 32:1" in reply.json()["error"]["message"]
        good = client.post("/v1/segment",
                           files={"image": ("ok.png", png(picture(120, 160, 1)), "image/png")})
        assert good.status_code == 200


# ------------------------------------------------------------------ loading
@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_load_refuses_pickle_checkpoints(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(InputError, match=r"not loaded .*\.safetensors checkpoint") as exc:
        Segmenter.load(path)
    assert "\n" not in str(exc.value)
