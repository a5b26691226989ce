"""Shared helpers of the HTTP server tests: a tiny model, encoded images, app clients."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from pycocotools import mask as mask_util  # noqa: E402

from serving import Prediction, Segmenter  # noqa: E402
from serving.server.app import create_app  # noqa: E402
from serving.server.requests import ServerSettings  # noqa: E402


def encode(image: np.ndarray, fmt: str = "PNG") -> bytes:
    """(H, W, 3) uint8 RGB -> encoded image file bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()


def scene(seed: int, size: tuple[int, int] = (120, 160)) -> np.ndarray:
    """A distinct (H, W, 3) uint8 image per seed: coloured rectangles on noise."""
    rng = np.random.default_rng(seed)
    h, w = size
    img = rng.integers(60, 120, size=(h, w, 3), dtype=np.uint8)
    for _ in range(3):
        y, x = int(rng.integers(0, h - 30)), int(rng.integers(0, w - 30))
        img[y:y + int(rng.integers(15, 30)), x:x + int(rng.integers(15, 30))] = rng.integers(
            0, 256, 3)
    return img


def wait_ready(client: TestClient, timeout: float = 60.0) -> None:
    """Poll ``/readyz`` until 200 (the warm-up pass has run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(f"server not ready after {timeout} s: {client.get('/readyz').json()}")


@contextmanager
def serve(segmenter: Segmenter, **settings) -> Iterator[TestClient]:
    """A ready in-process client of ``create_app(segmenter, ServerSettings(**settings))``."""
    app = create_app(segmenter, ServerSettings(**settings))
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        yield client


def rle_counts(pred: Prediction) -> list[str]:
    """The COCO RLE ``counts`` string of each mask, as the server encodes them."""
    if not len(pred):
        return []
    rles = mask_util.encode(np.asfortranarray(pred.masks.transpose(1, 2, 0).astype(np.uint8)))
    return [r["counts"].decode("ascii") for r in rles]


def assert_same_answer(body: dict, pred: Prediction) -> None:
    """The server's JSON equals ``pred`` exactly: boxes, scores, labels, areas, RLE masks."""
    inst = body["instances"]
    assert len(inst) == len(pred)
    assert body["image_size"] == list(pred.image_size)
    assert [i["segmentation"]["counts"] for i in inst] == rle_counts(pred)
    assert all(i["segmentation"]["size"] == list(pred.image_size) for i in inst)
    np.testing.assert_array_equal([i["score"] for i in inst], pred.scores.astype(np.float64))
    np.testing.assert_array_equal([i["box"] for i in inst],
                                  pred.boxes.astype(np.float64).reshape(-1, 4))
    assert [i["label"] for i in inst] == pred.labels.tolist()
    assert [i["label_name"] for i in inst] == pred.label_names
    assert [i["area"] for i in inst] == pred.areas.tolist()


@pytest.fixture(scope="module")
def segmenter(tiny_checkpoint) -> Segmenter:
    return Segmenter.from_checkpoint(tiny_checkpoint, device="cpu")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def uvicorn_thread(app, on_drain=lambda: None, grace_s: float = 0.0,
                   **config) -> Iterator[tuple[object, str]]:
    """``app`` served by the server's own uvicorn setup (idle-timeout protocol, draining
    server) on a free loopback port, in a thread; yields (server, base URL)."""
    import threading

    import uvicorn

    from serving.server.app_runtime import DrainingServer, IdleTimeoutH11Protocol

    port = free_port()
    cfg = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                         http=IdleTimeoutH11Protocol, **config)
    server = DrainingServer(cfg, on_drain, grace_s)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
