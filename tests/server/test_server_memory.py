"""The server's memory budget: requests admitted by the bytes they may hold (bodies, decoding,
inference, masks), waiting or 503 with Retry-After over it, 413 only for a request larger
than the whole budget; a concurrent load test on loopback."""

from __future__ import annotations

import asyncio
import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from server_helpers import encode, scene, segmenter, serve, uvicorn_thread  # noqa: F401

import serving.server.requests as requests_module
from serving.server.admission import (
    IMAGE_BYTES_PER_PIXEL,
    MASK_BYTES_PER_PIXEL,
    BudgetBusy,
    MemoryBudget,
    OverBudget,
    budget_statement,
    request_bytes,
)
from serving.server.app import create_app
from serving.server.limits import ServerSettings, read_header

httpx = pytest.importorskip("httpx")
MB = 1 << 20


# --------------------------------------------------------------------------- the budget
def test_the_budget_admits_in_order_and_waits_for_room() -> None:
    async def run() -> list[str]:
        budget, order = MemoryBudget(100, max_waiting=4, wait_s=5), []
        await budget.take(70)

        async def want(name: str, n: int) -> None:
            await budget.take(n)
            order.append(name)

        a = asyncio.ensure_future(want("a", 50))  # waits: 70 + 50 > 100
        b = asyncio.ensure_future(want("b", 10))  # fits, but waits behind a (first come)
        await asyncio.sleep(0.05)
        assert order == [] and budget.waiting == 2
        budget.give(70)
        await asyncio.gather(a, b)
        assert budget.in_use == 60 and budget.peak == 70
        return order

    assert asyncio.run(run()) == ["a", "b"]


def test_no_room_within_the_wait_is_busy_with_a_retry_time() -> None:
    async def run() -> None:
        budget = MemoryBudget(100, max_waiting=1, wait_s=0.1)
        await budget.take(90)
        with pytest.raises(OverBudget, match="more than this server's whole memory budget"):
            await budget.take(101)
        waiter = asyncio.ensure_future(budget.take(20))
        await asyncio.sleep(0.01)
        with pytest.raises(BudgetBusy, match="1 requests are waiting") as busy:
            await budget.take(20)  # the line (max_waiting=1) is full
        assert busy.value.retry_after_s >= 1
        with pytest.raises(BudgetBusy, match="within 0.1 s"):
            await waiter
        with pytest.raises(BudgetBusy, match="request body"):
            budget.try_take(11)
        assert (budget.in_use, budget.waiting, budget.refused) == (90, 0, 3)

    asyncio.run(run())


def test_a_cancelled_waiter_gives_back_nothing_it_did_not_get() -> None:
    async def run() -> None:
        budget = MemoryBudget(100, wait_s=5)
        await budget.take(80)
        waiter = asyncio.ensure_future(budget.take(50))
        await asyncio.sleep(0.01)
        waiter.cancel()
        await asyncio.sleep(0.01)
        budget.give(80)
        assert (budget.in_use, budget.waiting) == (0, 0)

    asyncio.run(run())


def test_request_bytes_and_the_header_need_no_decoding(monkeypatch) -> None:
    from PIL import Image, ImageFile
    from test_server_hardening import png_claiming  # a header only: decoding would fail

    png = encode(np.zeros((30, 40, 3), np.uint8))
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded"))
    header = read_header(png)
    assert header is not None and (header.width, header.height, header.mode) == (40, 30, "RGB")
    assert read_header(png_claiming(5000, 4000)) == type(header)(5000, 4000, "RGB")
    rotated = Image.fromarray(np.zeros((30, 40, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees: 30 wide, 40 high
    buf = io.BytesIO()
    rotated.save(buf, format="JPEG", exif=exif.tobytes())
    assert read_header(buf.getvalue()) == type(header)(30, 40, "RGB")
    assert request_bytes(1200, 0) == 1200 * IMAGE_BYTES_PER_PIXEL
    assert request_bytes(1200, 2400, "RGBA") > request_bytes(1200, 2400)
    assert request_bytes(1200, 2400) == 1200 * IMAGE_BYTES_PER_PIXEL + 2400 * MASK_BYTES_PER_PIXEL
    text = budget_statement(64 * MB, 300 * MB, 20)
    assert "at most 64 MB" in text and "300 MB" in text and "about 620 MB" in text


# --------------------------------------------------------------------------- through HTTP
def test_an_image_larger_than_the_whole_budget_is_413_before_decoding(segmenter) -> None:  # noqa: F811
    from test_server_hardening import png_claiming  # a header only: decoding would fail

    with serve(segmenter, memory_budget_mb=16) as client:
        r = client.post("/v1/segment", files={"image": ("a.png", png_claiming(1000, 1000),
                                                        "image/png")})
        assert r.status_code == 413, r.text
        err = r.json()["error"]
        assert err["code"] == "over_memory_budget" and "--memory-budget-mb" in err["message"]
        assert "1000x1000 in automatic mode needs" in err["message"]
        assert client.get("/v1/stats").json()["memory_in_use_bytes"] == 0


def test_concurrent_uploads_are_answered_200_or_503_within_the_budget(segmenter,  # noqa: F811
                                                                     monkeypatch) -> None:
    """10 clients at once, a budget with room for one request: decoding never overlaps, the
    bytes held never pass the budget, every answer is 200 or 503 busy with Retry-After."""
    image = scene(3, (240, 320))
    one = request_bytes(240 * 320, 240 * 320 * segmenter.cfg.max_detections)
    decoding, most = [0], [0]
    lock = threading.Lock()
    real_load = requests_module.load_image

    def counting_load(data):
        with lock:
            decoding[0] += 1
            most[0] = max(most[0], decoding[0])
        try:
            return real_load(data)
        finally:
            with lock:
                decoding[0] -= 1

    monkeypatch.setattr(requests_module, "load_image", counting_load)
    settings = ServerSettings(memory_budget_mb=1.5 * one / MB, admission_wait_s=0.3,
                              max_queue=4)
    app = create_app(segmenter, settings)
    with uvicorn_thread(app) as (_, base):
        def post(_: int) -> httpx.Response:
            with httpx.Client(base_url=base, timeout=60) as http:
                return http.post("/v1/segment",
                                 files={"image": ("a.png", encode(image), "image/png")})

        with ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(post, range(10)))
        with httpx.Client(base_url=base, timeout=60) as http:
            stats = http.get("/v1/stats").json()
    codes = sorted(r.status_code for r in answers)
    assert set(codes) <= {200, 503} and 200 in codes, codes
    for r in answers:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "busy" and int(r.headers["Retry-After"]) >= 1
    assert most[0] == 1  # one request's room: decoding counts against the budget
    assert 0 < stats["memory_peak_bytes"] <= settings.memory_budget_bytes
    assert stats["memory_in_use_bytes"] == 0 and stats["waiting_for_memory"] == 0
    assert stats["refused_busy"] == codes.count(503)
