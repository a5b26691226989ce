"""Hostile-client cases of the HTTP server: nesting, bombs, limits, file parts, idle and slow
connections, shutdown readiness, the offline docs page, mask-area admission and the lanes."""

from __future__ import annotations

import asyncio
import base64
import re
import signal
import socket
import time
import zlib

import numpy as np
import pytest
from server_helpers import encode, scene, segmenter, serve, uvicorn_thread  # noqa: F401

from serving.__main__ import main as serving_main
from serving.server.app import create_app
from serving.server.batching import DynamicBatcher, SegmentJob
from serving.server.limits import ServerSettings, mask_pixels

httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def client(segmenter):  # noqa: F811
    with serve(segmenter, max_pixels=400 * 300, max_mask_pixels=5000, large_boxes=2) as c:
        yield c


def error_of(response, status: int, code: str, field: str | None = None) -> str:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert err["code"] == code and (field is None or err["field"] == field), err
    assert "\n" not in err["message"]
    return err["message"]


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (a decompression bomb's header)."""
    png = bytearray(encode(np.zeros((8, 8, 3), np.uint8)))
    png[16:20], png[20:24] = width.to_bytes(4, "big"), height.to_bytes(4, "big")
    png[29:33] = zlib.crc32(bytes(png[12:29])).to_bytes(4, "big")  # IHDR's CRC
    return bytes(png)


# --------------------------------------------------------------------------- parsing
def test_deeply_nested_json_is_400_not_500(client) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    body = b'{"image": "x", "boxes": ' + deep + b"}"
    msg = error_of(client.post("/v1/segment", content=body,
                               headers={"content-type": "application/json"}), 400,
                   "malformed_body", "body")
    assert "nested too deeply" in msg
    r = client.post("/v1/segment", files={"image": ("a.png", encode(scene(0)), "image/png")},
                    data={"boxes": deep.decode()})
    assert "nested too deeply" in error_of(r, 422, "malformed_json", "boxes")


def test_a_json_key_sent_twice_is_a_clear_422(client) -> None:
    image = base64.b64encode(encode(scene(1))).decode()
    body = f'{{"image": "{image}", "image": "{image}"}}'
    r = client.post("/v1/segment", content=body, headers={"content-type": "application/json"})
    assert "sent more than once" in error_of(r, 422, "duplicate_field", "image")


def test_boxes_sent_as_a_file_part_is_a_clear_422(client) -> None:
    r = client.post("/v1/segment", files={"image": ("a.png", encode(scene(0)), "image/png"),
                                          "boxes": ("b.json", b"[[1, 2, 30, 40]]",
                                                    "application/json")})
    assert "sent as a file" in error_of(r, 422, "invalid_field", "boxes")


def test_decompression_bomb_message_states_the_real_size(client) -> None:
    r = client.post("/v1/segment", files={"image": ("b.png", png_claiming(100_000, 90_000),
                                                    "image/png")})
    msg = error_of(r, 413, "image_too_large", "image")
    assert "100000x90000 = 9000000000 pixels" in msg and "120000" in msg


def test_max_pixels_above_the_ceiling_is_refused_at_start_up(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        serving_main(["serve", "--model", "m.safetensors", "--max-pixels", "100000000"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--max-pixels 100000000" in err and "64000000" in err
    with pytest.raises(ValueError, match="ceiling of 64000000"):
        ServerSettings(max_pixels=100_000_000)


# --------------------------------------------------------------------------- mask area
def test_mask_pixels_counts_box_areas() -> None:
    boxes = np.array([[0, 0, 10, 20], [0.5, 0.5, 2.5, 1.0], [90, 50, 100, 60]], np.float32)
    assert mask_pixels(boxes, (60, 100)) == 10 * 20 + 3 * 1 + 10 * 10
    assert mask_pixels(boxes, (60, 100), clip_to_box=False) == 3 * 60 * 100
    assert mask_pixels(None, (60, 100)) == 6000


def test_request_over_the_mask_area_limit_is_413_with_the_limit_and_the_fix(client) -> None:
    image = encode(scene(0))  # 160 x 120
    r = client.post("/v1/segment", files={"image": ("a.png", image, "image/png")},
                    data={"boxes": "[[0, 0, 100, 100]]"})
    msg = error_of(r, 413, "masks_too_large", "boxes")
    assert "10000 pixels" in msg and "limit of 5000" in msg and "--max-mask-pixels" in msg
    assert "fewer or smaller boxes" in msg
    ok = client.post("/v1/segment", files={"image": ("a.png", image, "image/png")},
                     data={"boxes": "[[0, 0, 50, 50], [60, 60, 80, 90]]"})
    assert ok.status_code == 200 and len(ok.json()["instances"]) == 2


def test_many_boxes_take_the_large_lane(client) -> None:
    before = client.get("/v1/stats").json()["large_requests"]
    boxes = "[[0, 0, 20, 20], [20, 20, 40, 40], [40, 40, 60, 60]]"  # 3 > large_boxes=2
    r = client.post("/v1/segment", files={"image": ("a.png", encode(scene(1)), "image/png")},
                    data={"boxes": boxes})
    assert r.status_code == 200 and len(r.json()["instances"]) == 3
    assert client.get("/v1/stats").json()["large_requests"] == before + 1


# --------------------------------------------------------------------------- cost-aware batcher
class SlowFake:
    """A segmenter whose batches take 1.5 s when they hold a large image (value 255)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def predict_batch(self, images, boxes=None, labels=None, batch_size=8, score_threshold=None):
        from serving import Prediction

        self.batches.append([int(im[0, 0, 0]) for im in images])
        time.sleep(1.5 if any(im[0, 0, 0] == 255 for im in images) else 0.02)
        return [Prediction(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                           np.zeros(0, np.int64), np.zeros((0, *im.shape[:2]), bool))
                for im in images]


def small_and_large(concurrent: bool) -> tuple[float, float]:
    """Seconds until a small job, submitted while a large one runs, and the large one end."""
    fake = SlowFake()

    async def run():
        batcher = DynamicBatcher(fake, max_batch=8, max_wait_ms=0,  # type: ignore[arg-type]
                                 large_cost=1000, concurrent=concurrent)
        await batcher.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        large = asyncio.ensure_future(batcher.submit(
            SegmentJob(np.full((8, 8, 3), 255, np.uint8), cost=5000)))
        await asyncio.sleep(0.2)  # the large job is running
        await batcher.submit(SegmentJob(np.full((8, 8, 3), 1, np.uint8), cost=10))
        small_done = loop.time() - t0
        await large
        large_done = loop.time() - t0
        await batcher.close()
        return small_done, large_done

    return asyncio.run(run())


def test_a_small_request_after_a_large_one_is_answered_without_waiting_for_it() -> None:
    small_done, large_done = small_and_large(concurrent=True)
    assert small_done < 1.0 < 1.5 <= large_done


def test_without_a_thread_safe_backend_the_lanes_take_turns() -> None:
    small_done, large_done = small_and_large(concurrent=False)
    assert small_done >= 1.5  # the small job waited for the model


def test_batches_are_bounded_by_total_cost() -> None:
    fake = SlowFake()

    async def run():
        batcher = DynamicBatcher(fake, max_batch=8, max_wait_ms=200,  # type: ignore[arg-type]
                                 max_batch_cost=10)
        await batcher.start()
        await asyncio.gather(*(batcher.submit(SegmentJob(np.full((8, 8, 3), i, np.uint8),
                                                         cost=c))
                               for i, c in enumerate([6, 6, 6, 3])))
        await batcher.close()

    asyncio.run(run())
    assert fake.batches == [[0], [1], [2, 3]]


# --------------------------------------------------------------------------- connections
async def hello(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def closed_after(sock: socket.socket, drip: bytes = b"") -> float:
    """Seconds until the server closes ``sock`` (dripping ``drip`` a byte per 0.1 s)."""
    t0 = time.monotonic()
    sock.settimeout(0.1)
    for byte in drip:
        sock.sendall(bytes([byte]))
        try:
            if sock.recv(1024) == b"":
                return time.monotonic() - t0
        except TimeoutError:
            pass
        except OSError:  # reset by the server
            return time.monotonic() - t0
    sock.settimeout(10)
    try:
        while sock.recv(1024):
            pass
    except TimeoutError:
        return float("inf")
    return time.monotonic() - t0


def test_idle_and_dripping_connections_are_closed() -> None:
    with uvicorn_thread(hello, timeout_keep_alive=0.5, lifespan="off") as (_, base):
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as silent:
            assert closed_after(silent) < 3.0  # connected, never sent a byte
        with socket.create_connection(("127.0.0.1", port)) as dripping:
            head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40  # never finished
            assert closed_after(dripping, head) < 3.0
        with socket.create_connection(("127.0.0.1", port)) as kept:  # idle after a response
            kept.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert kept.recv(1024).startswith(b"HTTP/1.1 200")
            assert closed_after(kept) < 3.0
        assert httpx.get(base, timeout=5).text == "ok"  # ordinary requests are served


def test_a_body_that_does_not_arrive_is_408(segmenter) -> None:  # noqa: F811
    app = create_app(segmenter, ServerSettings(body_timeout_s=0.5, warmup=False))
    with uvicorn_thread(app) as (_, base):
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: application/"
                         b"json\r\nContent-Length: 1000\r\n\r\n{\"image\": ")
            answer = b""
            while chunk := sock.recv(4096):  # the server closes after answering
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer


# --------------------------------------------------------------------------- shutdown
def test_readyz_is_503_during_the_shutdown_grace_while_requests_are_served(segmenter) -> None:  # noqa: F811
    app = create_app(segmenter, ServerSettings(warmup=False))
    with uvicorn_thread(app, on_drain=app.state.begin_draining, grace_s=1.5) as (server, base):
        assert httpx.get(f"{base}/readyz").status_code == 200
        t0 = time.monotonic()
        server.handle_exit(signal.SIGTERM, None)  # what the signal handler runs
        ready = httpx.get(f"{base}/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "shutting_down"
        assert httpx.get(f"{base}/healthz").status_code == 200
        r = httpx.post(f"{base}/v1/segment", timeout=60,
                       files={"image": ("a.png", encode(scene(2)), "image/png")})
        assert r.status_code == 200
        while not server.should_exit:
            assert time.monotonic() - t0 < 10
            time.sleep(0.05)
        assert time.monotonic() - t0 >= 1.5  # kept serving for the whole grace period


# --------------------------------------------------------------------------- offline docs
def test_docs_load_only_local_assets(client) -> None:
    for page in ("/docs", "/redoc"):
        r = client.get(page)
        assert r.status_code == 200 and "text/html" in r.headers["content-type"]
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", r.text)
        urls += re.findall(r"""url: ?["']([^"']+)["']""", r.text)
        assert urls and all(u.startswith("/") for u in urls), urls  # no CDN
        for url in urls:
            asset = client.get(url)
            assert asset.status_code == 200 and len(asset.content) > 100, url
    assert client.get("/docs-assets/swagger-ui-bundle.js").content.startswith(b"/*!")


def test_docs_without_the_assets_package_is_a_plain_page(segmenter, monkeypatch) -> None:  # noqa: F811
    monkeypatch.setattr("serving.server.app_docs.assets_dir", lambda: None)
    with serve(segmenter, warmup=False) as plain:
        page = plain.get("/docs")
        assert page.status_code == 200 and "<script" not in page.text
        assert "POST /v1/segment" in page.text and "/openapi.json" in page.text
        assert plain.get("/redoc").status_code == 404


@pytest.mark.browser
@pytest.mark.slow
def test_docs_render_in_a_browser_with_no_network(segmenter) -> None:  # noqa: F811
    """Swagger UI draws the operations with every request outside the server aborted."""
    from pathlib import Path

    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("chromium not installed")
    app = create_app(segmenter, ServerSettings(warmup=False))
    with uvicorn_thread(app) as (_, base), sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium),
                                    args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        outside: list[str] = []

        def route(r):
            if r.request.url.startswith(base):
                return r.continue_()
            outside.append(r.request.url)
            return r.abort()

        page.route("**/*", route)
        page.goto(f"{base}/docs")
        page.wait_for_selector(".opblock", timeout=30_000)
        paths = page.locator(".opblock-summary-path").all_inner_texts()
        assert {"/v1/segment", "/v1/model", "/readyz"} <= {t.strip() for t in paths}, paths
        browser.close()
    assert outside == []
