"""Building blocks of the batch CLI: image discovery, box checks, prefetching, batch isolation,
the progress log and polygons."""

from __future__ import annotations

import json
import math
import threading
import time

import numpy as np
import pytest
from cli_data import decode, mixed_folder, one_torch_thread, plain_folder

from serving import Segmenter
from serving.cli.common import find_images, prefetch, run_batch
from serving.errors import BoxError, DatasetError, InputError
from serving.files import check_writable_dir, check_writable_file
from serving.formats.coco import coco_box, read_coco_json
from serving.formats.polygons import mask_to_polygons


@pytest.fixture(autouse=True)
def _one_thread():
    yield from one_torch_thread()


def test_find_images_folder_glob_file_and_exclusion(tmp_path):
    root = mixed_folder(tmp_path / "in")
    (root / "out").mkdir()
    plain_folder(root / "out", 2)  # an output folder inside the input: never read back
    files = find_images([str(root)], exclude=root / "out")
    rels = [f.rel for f in files]
    assert rels == sorted(rels, key=lambda r: str((root / r).resolve()))
    assert "notes.txt" not in rels and not any(r.startswith("out/") for r in rels)
    assert set(rels) == {"rgb.jpg", "sub/rgb.png", "gray.png", "rgba.png", "deep16.png",
                         "exif_rotated.jpg", "truncated.jpg", "zero.jpg", "text.png"}
    globbed = find_images([str(root / "**" / "*.png")])
    assert {f.rel for f in globbed} == {"sub/rgb.png", "gray.png", "rgba.png", "deep16.png",
                                        "text.png", "out/img_00.png", "out/img_01.png"}
    single = find_images([str(root / "notes.txt"), str(root / "gray.png")])
    assert [f.rel for f in single] == ["gray.png", "notes.txt"]  # explicit files are kept
    with pytest.raises(InputError, match="no such file or folder"):
        find_images([str(root / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found"):
        find_images([str(tmp_path / "empty")])


def test_output_names_are_unique(tmp_path):
    plain_folder(tmp_path, 1)
    (tmp_path / "img_00.jpg").write_bytes((tmp_path / "img_00.png").read_bytes())
    names = [f.name for f in find_images([str(tmp_path)])]
    assert names == ["img_00_jpg", "img_00_png"]


def test_coco_box_checks_and_clips():
    size = (50, 80)  # h, w
    np.testing.assert_allclose(coco_box({"id": 1, "bbox": [10, 5, 20, 30]}, size),
                               [10, 5, 30, 35])
    np.testing.assert_allclose(coco_box({"id": 2, "bbox": [-5, 40, 100, 30]}, size),
                               [0, 40, 80, 50])  # clipped to the image
    cases = {3: ([10, 10, -5, 5], "negative width/height"), 4: ([10, 10, 0, 5], "zero"),
             5: ([math.nan, 1, 2, 3], "NaN"), 6: ([200, 200, 10, 10], "outside the 80x50"),
             7: ("10 10 5 5", "not \\[x, y, width, height\\]"), 8: ([1, 2, 3], "not"),
             10: ("1234", "'1234' is not"), 11: ([1, 2, True, 4], "not"),
             12: ([1, "2", 3, 4], "not")}
    for ann_id, (bbox, reason) in cases.items():
        with pytest.raises(BoxError, match=f"^annotation {ann_id}: bbox .*{reason}"):
            coco_box({"id": ann_id, "bbox": bbox}, size)
    with pytest.raises(BoxError, match="annotation 9: bbox None"):
        coco_box({"id": 9}, size)


def test_read_coco_json_errors(tmp_path):
    p = tmp_path / "boxes.json"
    for text, message in [("{not json", "not valid JSON"), ("[]", "needs an 'images' list"),
                          ('{"images": [{"id": 1}]}', "lacks 'file_name'"),
                          ('{"images": [{"id": "a", "file_name": "x"}]}',
                           "has id 'a'; it must be an integer"),
                          ('{"images": [], "annotations": [{"id": 1}]}', "lacks 'image_id'"),
                          ('{"images": [], "annotations": [{"id": [1], "image_id": 1}]}',
                           r"annotations\[0\] has id \[1\]; it must be an integer"),
                          ('{"images": [], "annotations": [{"id": 1, "image_id": [2]}]}',
                           r"has image_id \[2\]"),
                          ('{"images": [{"id": 1, "file_name": "a", "height": "96"}]}',
                           "has height '96'"),
                          ('{"images": [{"id": 1, "file_name": "a", "height": 0}]}',
                           "has height 0; it must be the image's size in pixels"),
                          ('{"images": [{"id": 1, "file_name": "a", "width": -5}]}',
                           "has width -5"),
                          ('{"images": [], "categories": [{"id": 1.5, "name": "x"}]}',
                           "has id 1.5"),
                          ('{"images": [], "categories": [{"id": 1, "name": "x"}, '
                           '{"id": 1, "name": "y"}]}', "duplicate category ids"),
                          ("[" * 100_000 + "]" * 100_000, "not valid JSON")]:
        p.write_text(text)
        with pytest.raises(DatasetError, match=message):
            read_coco_json(p, "boxes")
    with pytest.raises(DatasetError, match="file not found"):
        read_coco_json(tmp_path / "nope.json")


def test_check_writable_dir(tmp_path):
    made = tmp_path / "a" / "b"
    assert check_writable_dir(made) == made and made.is_dir() and not list(made.iterdir())
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="exists and is not a folder"):
        check_writable_dir(blocker)
    with pytest.raises(InputError, match="not writable"):
        check_writable_dir(blocker / "out")


def test_check_writable_file(tmp_path):
    with pytest.raises(InputError, match="is a folder"):
        check_writable_file(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="not writable"):
        check_writable_file(blocker / "labels.json")


def test_prefetch_order_errors_and_bounded_queue():
    pulled = []

    def items():
        for i in range(10):
            pulled.append(i)
            yield i

    def load(i):
        time.sleep(0.002 * (i % 3))
        if i == 4:
            raise ValueError("bad 4")
        return np.full((1,), i)

    seen = []
    for item, image, error in prefetch(items(), load, workers=3, depth=3):
        if not seen:
            assert len(pulled) <= 4  # at most depth queued (+ the one being refilled)
        seen.append((item, None if image is None else int(image[0]), error))
    assert [s[0] for s in seen] == list(range(10))
    assert seen[4][1] is None and str(seen[4][2]) == "bad 4"
    assert all(s[1] == s[0] for s in seen if s[0] != 4)
    assert [s[0] for s in prefetch(range(3), lambda i: np.zeros(1), 0, 1)] == [0, 1, 2]


def test_prefetch_overlaps_decoding_with_the_consumer():
    """While the consumer works on item 0, the workers already decode the next items."""
    started = []
    lock = threading.Lock()

    def load(i):
        with lock:
            started.append(i)
        return np.zeros(1)

    gen = prefetch(range(6), load, workers=2, depth=4)
    next(gen)
    time.sleep(0.2)
    assert len(started) >= 3
    gen.close()


def test_run_batch_isolates_a_failing_image_and_splits_many_boxes(tiny_checkpoint, sample_image):
    seg = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu", max_prompt_boxes=2)
    boxes = np.array([[10, 10, 60, 50], [30, 20, 80, 60], [90, 50, 150, 110],
                      [5, 5, 40, 40], [100, 10, 150, 60]], np.float32)
    labels = np.array([0, -1, 2, 1, -1], np.int64)
    prompt = seg.check_prompt(boxes, labels, sample_image.shape[:2])
    bad = seg.check_prompt(boxes[:1], None, (60, 80))  # checked for another image's size
    out = run_batch(seg, [sample_image, sample_image, sample_image], [prompt, bad, None],
                    batch_size=4)
    assert isinstance(out[1], InputError)
    assert "80x60 image, given with a 160x120 one" in str(out[1])
    assert len(out[0]) == 5 and len(out[2]) > 0
    np.testing.assert_allclose(out[0].boxes, boxes)
    whole = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu").predict(
        sample_image, boxes=boxes, labels=labels)  # one pass: the same instances
    np.testing.assert_array_equal(out[0].labels, whole.labels)
    np.testing.assert_array_equal(out[0].scores, whole.scores)
    np.testing.assert_array_equal(out[0].masks, whole.masks)


def test_mask_to_polygons_outer_boundaries():
    m = np.zeros((20, 20), bool)
    m[3:15, 4:16] = True
    m[7:10, 8:12] = False  # a hole: not expressible in COCO polygons
    m[17:19, 1:3] = True  # a second component
    polys = mask_to_polygons(m, tolerance=0)
    assert len(polys) == 2
    filled = m.copy()
    filled[7:10, 8:12] = True
    np.testing.assert_array_equal(decode(polys, 20, 20), filled)
    assert mask_to_polygons(np.zeros((5, 5), bool)) == []
    disc = np.hypot(*np.mgrid[-20:21, -20:21]) <= 15
    got = decode(mask_to_polygons(disc), 41, 41)
    assert (got & disc).sum() / (got | disc).sum() > 0.95


def test_write_json_is_atomic_and_not_private(tmp_path):
    import os
    import stat

    from serving.files import write_json

    target = tmp_path / "results.json"
    write_json(target, [{"a": 1}])
    write_json(target, [{"a": 2}])
    assert json.loads(target.read_text()) == [{"a": 2}]
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp files left
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
