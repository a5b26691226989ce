"""Dynamic batching: concurrent requests share forward passes and each gets its own answer."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from server_helpers import assert_same_answer, encode, scene, serve

from serving import Prediction, Segmenter
from serving.server.batching import (
    BatcherBusy,
    BatcherClosed,
    DynamicBatcher,
    SegmentJob,
)

N_CLIENTS = 8


@pytest.fixture()
def counted(tiny_checkpoint):
    """A fresh Segmenter whose ``predict_batch`` calls are recorded as their image counts."""
    seg = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu")
    calls: list[int] = []
    original = seg.predict_batch

    def predict_batch(images, *args, **kwargs):
        calls.append(len(images))
        return original(images, *args, **kwargs)

    seg.predict_batch = predict_batch  # type: ignore[method-assign]
    return seg, original, calls


def burst(client, payloads: list[dict]) -> list:
    """POST every payload at once from its own thread; responses in payload order."""
    barrier = threading.Barrier(len(payloads))

    def send(payload: dict):
        barrier.wait()
        return client.post("/v1/segment", **payload)

    with ThreadPoolExecutor(len(payloads)) as pool:
        return list(pool.map(send, payloads))


def form(data: bytes, **fields) -> dict:
    return {"files": {"image": ("x.png", data, "image/png")}, "data": fields}


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(counted) -> None:
    seg, original, calls = counted
    images = [scene(100 + i) for i in range(N_CLIENTS)]
    prompts = [None if i % 2 == 0 else [[10 + i, 10, 90, 80 + i]] for i in range(N_CLIENTS)]
    payloads = [form(encode(im)) if p is None else form(encode(im), boxes=str(p))
                for im, p in zip(images, prompts, strict=True)]
    with serve(seg, max_batch=N_CLIENTS, max_wait_ms=1000) as client:
        calls.clear()  # forget the warm-up
        responses = burst(client, payloads)
        stats = client.get("/v1/stats").json()
    assert [r.status_code for r in responses] == [200] * N_CLIENTS
    assert max(calls) > 1 and sum(calls) == N_CLIENTS  # shared forward passes
    assert stats["max_batch_size"] == max(calls) and stats["requests"] == N_CLIENTS
    # Same-size images batched together give exactly the batched reference, image by image.
    reference = original(images, boxes=prompts, batch_size=N_CLIENTS)
    for r, ref, p in zip(responses, reference, prompts, strict=True):
        assert r.json()["mode"] == ("auto" if p is None else "prompt")
        assert_same_answer(r.json(), ref)
    # ... and agree with one-image predict (same instances, float noise only).
    for r, im, p in zip(responses, images, prompts, strict=True):
        single = seg.predict(im, boxes=p)
        got = r.json()["instances"]
        assert len(got) == len(single)
        np.testing.assert_allclose([i["score"] for i in got], single.scores, atol=1e-4)
    own = [tuple(i["score"] for i in r.json()["instances"][:3]) for r in responses[::2]]
    assert len(set(own)) == len(own)  # distinct images really got distinct answers


def test_bad_request_in_a_burst_gets_its_4xx_and_the_others_200(counted) -> None:
    seg, _, calls = counted
    images = [scene(200 + i) for i in range(N_CLIENTS)]
    payloads = [form(encode(im)) for im in images]
    payloads[3] = form(encode(images[3])[:200])  # truncated PNG
    payloads[5] = form(encode(images[5]), boxes="[[50, 50, 10, 10]]")  # reversed box
    with serve(seg, max_batch=N_CLIENTS, max_wait_ms=1000) as client:
        calls.clear()
        responses = burst(client, payloads)
    codes = [r.status_code for r in responses]
    assert codes == [200, 200, 200, 422, 200, 422, 200, 200]
    assert responses[3].json()["error"]["field"] == "image"
    assert responses[5].json()["error"]["field"] == "boxes[0]"
    assert sum(calls) == N_CLIENTS - 2 and max(calls) > 1  # bad ones never reached the batch
    for i in (0, 1, 2, 4, 6, 7):
        assert responses[i].json()["image_size"] == [120, 160]


def test_a_failing_batch_is_retried_one_by_one(counted) -> None:
    seg, original, calls = counted
    poison = scene(300)
    poison[0, 0] = (1, 2, 3)  # this image makes the backend fail, whatever the batch

    def fragile(images, *args, **kwargs):
        calls.append(len(images))
        if any(tuple(im[0, 0]) == (1, 2, 3) for im in images):
            raise RuntimeError("backend exploded")
        return original(images, *args, **kwargs)

    seg.predict_batch = fragile  # type: ignore[method-assign]
    images = [scene(310 + i) for i in range(5)] + [poison]
    with serve(seg, max_batch=8, max_wait_ms=1000) as client:
        calls.clear()
        responses = burst(client, [form(encode(im)) for im in images])
        assert client.get("/healthz").status_code == 200  # still serving
        again = client.post("/v1/segment", **form(encode(images[0])))
    assert [r.status_code for r in responses] == [200] * 5 + [500]
    assert responses[5].json()["error"]["code"] == "inference_failed"
    assert calls[:1] == [6] and calls[1:7] == [1] * 6  # whole batch, then each alone
    for r, im in zip(responses[:5], images[:5], strict=True):
        assert_same_answer(r.json(), original([im], batch_size=1)[0])
    assert again.status_code == 200


def test_full_queue_answers_503_busy_and_recovers(counted) -> None:
    seg, original, calls = counted
    gate = threading.Event()

    def gated(images, *args, **kwargs):
        calls.append(len(images))
        gate.wait(30)
        return original(images, *args, **kwargs)

    with serve(seg, max_batch=1, max_wait_ms=0, max_queue=1) as client:
        seg.predict_batch = gated  # type: ignore[method-assign]
        calls.clear()
        payload = form(encode(scene(400)))
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.post, "/v1/segment", **payload)
            while not calls:  # the first request is in inference, blocked on the gate
                threading.Event().wait(0.01)
            second = pool.submit(client.post, "/v1/segment", **payload)
            while client.get("/v1/stats").json()["queued"] < 1:  # the second is queued
                threading.Event().wait(0.01)
            third = client.post("/v1/segment", **payload)
            gate.set()
            codes = [first.result().status_code, second.result().status_code]
        assert third.status_code == 503 and third.json()["error"]["code"] == "busy", third.text
        assert codes == [200, 200]
        assert client.post("/v1/segment", **payload).status_code == 200


def test_readyz_is_503_until_warm_up_finishes(tiny_checkpoint) -> None:
    from fastapi.testclient import TestClient

    from serving.server.app import create_app

    seg = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu")
    release = threading.Event()
    real_predict = seg.predict

    def slow_predict(*args, **kwargs):
        release.wait(30)
        return real_predict(*args, **kwargs)

    seg.predict = slow_predict  # type: ignore[method-assign]
    with TestClient(create_app(seg)) as client:
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "warming_up"
        assert client.get("/healthz").status_code == 200  # alive while warming up
        release.set()
        from server_helpers import wait_ready

        wait_ready(client)
        assert client.get("/readyz").json()["ready"] is True


def test_failed_warm_up_is_reported_by_readyz(tiny_checkpoint) -> None:
    from fastapi.testclient import TestClient

    from serving.server.app import create_app

    seg = Segmenter.from_checkpoint(tiny_checkpoint, device="cpu")

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory")

    seg.predict = broken  # type: ignore[method-assign]
    with TestClient(create_app(seg)) as client:
        for _ in range(200):
            body = client.get("/readyz").json()
            if body["status"] != "warming_up":
                break
            threading.Event().wait(0.02)
        assert body["status"] == "failed" and "out of memory" in body["detail"]
        assert client.get("/healthz").status_code == 200


# --------------------------------------------------------------------------- the batcher alone
class FakeSegmenter:
    """Records batches; answers image i with one instance whose score is its mean / 255."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[int] = []
        self.delay = delay

    def predict_batch(self, images, boxes=None, labels=None, batch_size=8,
                      score_threshold=None):
        self.batches.append(len(images))
        threading.Event().wait(self.delay)
        thresholds = score_threshold or [None] * len(images)
        out = []
        for im, t in zip(images, thresholds, strict=True):
            s = np.array([im.mean() / 255.0, 0.01], np.float32)
            keep = s >= (t if t is not None else 0)  # what Segmenter.predict_batch does
            out.append(Prediction(np.zeros((2, 4), np.float32)[keep], s[keep],
                                  np.zeros(2, np.int64)[keep],
                                  np.zeros((2, *im.shape[:2]), bool)[keep], ("a",)))
        return out


def job(value: int, threshold: float | None = None) -> SegmentJob:
    return SegmentJob(np.full((8, 8, 3), value, np.uint8), score_threshold=threshold)


def test_batcher_respects_max_batch_and_answers_in_order() -> None:
    fake = FakeSegmenter()

    async def run():
        batcher = DynamicBatcher(fake, max_batch=4, max_wait_ms=200)  # type: ignore[arg-type]
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit(job(10 * i)) for i in range(10)))
        await batcher.close()
        return results

    results = asyncio.run(run())
    assert fake.batches == [4, 4, 2]
    assert [round(float(r.prediction.scores[0]) * 255) for r in results] == list(range(0, 100, 10))
    assert [r.batch_size for r in results] == [4] * 8 + [2] * 2


def test_batcher_waits_at_most_max_wait_for_a_lone_request() -> None:
    fake = FakeSegmenter()

    async def run():
        batcher = DynamicBatcher(fake, max_batch=8, max_wait_ms=150)  # type: ignore[arg-type]
        await batcher.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        result = await batcher.submit(job(1))
        elapsed = loop.time() - t0
        await batcher.close()
        return result, elapsed

    result, elapsed = asyncio.run(run())
    assert fake.batches == [1]
    assert 0.14 <= elapsed < 2.0 and result.queue_ms >= 140


def test_batcher_close_drains_queued_jobs_then_refuses() -> None:
    fake = FakeSegmenter(delay=0.05)

    async def run():
        batcher = DynamicBatcher(fake, max_batch=2, max_wait_ms=0)  # type: ignore[arg-type]
        await batcher.start()
        tasks = [asyncio.ensure_future(batcher.submit(job(i))) for i in range(5)]
        await asyncio.sleep(0)  # all five are queued
        await batcher.close()  # returns only when every queued job is answered
        assert all(t.done() for t in tasks)
        with pytest.raises(BatcherClosed):
            await batcher.submit(job(9))
        return [t.result() for t in tasks]

    results = asyncio.run(run())
    assert len(results) == 5 and sum(fake.batches) == 5 and max(fake.batches) == 2


def test_batcher_refuses_jobs_beyond_max_queue() -> None:
    fake = FakeSegmenter()

    async def run():
        batcher = DynamicBatcher(fake, max_batch=8, max_wait_ms=100,  # type: ignore[arg-type]
                                 max_queue=3)
        await batcher.start()
        waiting = [asyncio.ensure_future(batcher.submit(job(i))) for i in range(3)]
        await asyncio.sleep(0)  # three queued, none dispatched yet (100 ms window)
        with pytest.raises(BatcherBusy):
            await batcher.submit(job(9))
        results = await asyncio.gather(*waiting)
        await batcher.close()
        return results

    assert len(asyncio.run(run())) == 3 and fake.batches == [3]


def test_each_job_gets_its_own_score_threshold() -> None:
    """Jobs sharing a batch pass their own thresholds to predict_batch (scores .2 and .01)."""
    fake = FakeSegmenter()

    async def run():
        batcher = DynamicBatcher(fake, max_batch=4, max_wait_ms=200)  # type: ignore[arg-type]
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit(job(51, t))
                                         for t in (None, 0.2, 0.5)))
        await batcher.close()
        return results

    results = asyncio.run(run())
    assert fake.batches == [3]
    assert [len(r.prediction) for r in results] == [2, 1, 0]
