"""``load_image``: every kind of image DESIGN.md section 7 names, and the one-line errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import serving.inference.images as images_mod
from serving import ImageError, load_image


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg, f"message is not one line: {msg!r}"
    return msg


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def rgb_image(w: int = 40, h: int = 30) -> np.ndarray:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = np.arange(w, dtype=np.uint8)[None] * 5
    arr[..., 1] = np.arange(h, dtype=np.uint8)[:, None] * 7
    arr[..., 2] = 99
    return arr


# ------------------------------------------------------------------ good inputs
def test_png_path_bytes_pil_and_array_agree(tmp_path):
    arr = rgb_image()
    path = tmp_path / "a.png"
    Image.fromarray(arr).save(path)
    for source in (path, str(path), path.read_bytes(), Image.open(path), arr):
        out = load_image(source)
        assert out.dtype == np.uint8 and out.shape == (30, 40, 3)
        assert np.array_equal(out, arr)


def test_grayscale_png(tmp_path):
    gray = np.full((20, 30), 77, np.uint8)
    gray[5, 6] = 200
    path = tmp_path / "g.png"
    Image.fromarray(gray, mode="L").save(path)
    out = load_image(path)
    assert out.shape == (20, 30, 3)
    assert out[0, 0].tolist() == [77, 77, 77] and out[5, 6].tolist() == [200, 200, 200]


def test_rgba_png_is_composited_on_black(tmp_path):
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 0
    rgba[1, 1, 3] = 128
    path = tmp_path / "a.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    out = load_image(path)
    assert out.shape == (16, 16, 3)
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[2, 2].tolist() == [200, 100, 50]
    expected = np.array([200, 100, 50]) * 128 / 255
    assert np.abs(out[1, 1].astype(float) - expected).max() <= 1.0


def test_16bit_png_is_scaled_by_257(tmp_path):
    data = np.zeros((10, 12), np.uint16)
    data[0, 0] = 65535
    data[1, 1] = 257 * 100
    data[2, 2] = 25700 + 128  # 100.498 -> 100
    path = tmp_path / "d.png"
    Image.fromarray(data).save(path)
    assert Image.open(path).mode.startswith("I")
    out = load_image(path)
    assert out.shape == (10, 12, 3)
    assert out[0, 0].tolist() == [255] * 3
    assert out[1, 1].tolist() == [100] * 3
    assert out[2, 2].tolist() == [100] * 3
    assert out[3, 3].tolist() == [0] * 3
    # a dim 16-bit image is not stretched to the full range
    dim = np.full((10, 12), 257 * 40, np.uint16)
    Image.fromarray(dim).save(path)
    assert np.all(load_image(path) == 40)


def test_palette_png(tmp_path):
    img = Image.new("P", (12, 10))
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    px = np.zeros((10, 12), np.uint8)
    px[:, 6:] = 1
    px[0, 0] = 2
    img.putdata(px.flatten().tolist())
    path = tmp_path / "p.png"
    img.save(path)
    out = load_image(path)
    assert out[5, 8].tolist() == [255, 0, 0]
    assert out[0, 0].tolist() == [0, 255, 0]
    assert out[5, 2].tolist() == [0, 0, 0]


def test_cmyk_jpeg(tmp_path):
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:, :8] = (255, 0, 0)
    rgb[:, 8:] = (0, 0, 255)
    path = tmp_path / "c.jpg"
    Image.fromarray(rgb).convert("CMYK").save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    out = load_image(path)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert np.abs(out[8, 3].astype(int) - [255, 0, 0]).max() <= 12
    assert np.abs(out[8, 12].astype(int) - [0, 0, 255]).max() <= 12


def test_exif_orientation_6_is_applied(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 tall as stored
    stored[:8, :8] = (255, 0, 0)  # red marker at the stored top-left corner
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "r.jpg"
    img.save(path, quality=95, exif=exif.tobytes())
    out = load_image(path)
    assert out.shape == (40, 20, 3)  # displayed: 20 wide, 40 tall
    # stored top-left (x=0, y=0) is displayed at the top-right
    assert np.abs(out[2:6, 14:18].astype(int) - [255, 0, 0]).max() <= 30
    assert out[34:38, 2:6].max() <= 30
    assert out[2:6, 2:6].max() <= 30


def test_numpy_inputs_convert():
    gray = np.arange(100, dtype=np.uint8).reshape(10, 10)
    out = load_image(gray)
    assert out.shape == (10, 10, 3) and np.array_equal(out[..., 1], gray)
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 0
    out = load_image(rgba)
    assert out[1, 1].tolist() == [200] * 3 and out[0, 0].tolist() == [0] * 3
    flt = np.full((10, 10, 3), 0.5, np.float32)
    flt[0, 0] = 1.0
    out = load_image(flt)
    assert out[1, 1].tolist() == [128] * 3 and out[0, 0].tolist() == [255] * 3
    u16 = np.full((10, 10, 3), 257 * 33, np.uint16)
    assert np.all(load_image(u16) == 33)
    boolean = np.zeros((10, 10), bool)
    boolean[2, 2] = True
    assert load_image(boolean)[2, 2].tolist() == [255] * 3
    arr = rgb_image()
    assert np.array_equal(load_image(arr), arr)


# ------------------------------------------------------------------ bad inputs
def test_missing_path(tmp_path):
    with pytest.raises(ImageError) as exc:
        load_image(tmp_path / "nope.jpg")
    assert "file not found" in one_line(exc)
    with pytest.raises(ImageError) as exc:
        load_image(tmp_path)  # a folder is not an image file
    assert "file not found" in one_line(exc)


def test_zero_byte_file_and_bytes(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageError) as exc:
        load_image(empty)
    assert "0 bytes" in one_line(exc)
    with pytest.raises(ImageError) as exc:
        load_image(b"")
    assert "0 bytes" in one_line(exc)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(tmp_path, fmt):
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as exc:
        load_image(path)
    assert "truncated" in one_line(exc)
    with pytest.raises(ImageError) as exc:
        load_image(data[: len(data) // 2])
    assert "truncated" in one_line(exc)


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello, I am not an image\n")
    with pytest.raises(ImageError) as exc:
        load_image(path)
    msg = one_line(exc)
    assert "not a readable image" in msg and "notes.png" in msg


def test_enormous_image(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(path)
    monkeypatch.setattr(images_mod, "MAX_IMAGE_PIXELS", 1000)  # our limit: checked on the header
    with pytest.raises(ImageError) as exc:
        load_image(path)
    assert "40x40 pixels exceeds the limit of 1000 pixels" in one_line(exc)
    with pytest.raises(ImageError) as exc:
        load_image(np.zeros((40, 40, 3), np.uint8))
    assert "exceeds the limit" in one_line(exc)
    # Pillow's own decompression-bomb guard (as an application may set it) is honoured too
    monkeypatch.setattr(images_mod, "MAX_IMAGE_PIXELS", 64_000_000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 px > 2 x 100: Pillow refuses
    with pytest.raises(ImageError) as exc:
        load_image(path.read_bytes())
    assert "decompression-bomb guard" in one_line(exc)


def test_loading_changes_no_process_wide_state_and_is_thread_safe(tmp_path, monkeypatch):
    """Decoding in a thread pool leaves Pillow's global limit and the warning filters alone
    (a watcher thread samples both all along) and gives each thread its own image."""
    import threading
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 12_345_678)  # an application's own setting
    paths = []
    for i in range(8):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((30 + i, 20, 3), i, np.uint8)).save(paths[-1])
    filters = list(warnings.filters)
    seen, done = set(), threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.add((Image.MAX_IMAGE_PIXELS, tuple(warnings.filters) == tuple(filters)))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            arrays = list(pool.map(load_image, paths * 25))
    finally:
        done.set()
        watcher.join()
    assert seen == {(12_345_678, True)}
    for k, arr in enumerate(arrays):
        i = k % 8
        assert arr.shape == (30 + i, 20, 3) and (arr == i).all()


def test_tiny_image(tmp_path):
    path = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)
    with pytest.raises(ImageError) as exc:
        load_image(path)
    assert "too small" in one_line(exc)
    with pytest.raises(ImageError) as exc:
        load_image(np.zeros((4, 4, 3), np.uint8))
    assert "too small" in one_line(exc)


@pytest.mark.parametrize("arr, phrase", [
    (np.zeros((10, 10, 2), np.uint8), "expected an HxW"),
    (np.zeros((10,), np.uint8), "expected an HxW"),
    (np.zeros((10, 10, 3), np.int32), "unsupported dtype"),
    (np.full((10, 10, 3), np.nan, np.float32), "NaN"),
])
def test_bad_arrays(arr, phrase):
    with pytest.raises(ImageError) as exc:
        load_image(arr)
    assert phrase in one_line(exc)


def test_unsupported_type():
    with pytest.raises(ImageError) as exc:
        load_image([[1, 2], [3, 4]])  # type: ignore[arg-type]
    assert "unsupported type" in one_line(exc)
