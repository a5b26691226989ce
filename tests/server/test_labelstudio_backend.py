"""The Label Studio ML backend routes in process (tiny model): the protocol's shapes, one
mask per rectangle equal to the Segmenter's own, interactive context, image sources (data
URIs, a fake Label Studio that checks its token, local files under a root) and per-task
errors that never fail the batch."""

from __future__ import annotations

import base64
import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from fastapi.testclient import TestClient  # noqa: E402
from server_helpers import encode, scene, segmenter, wait_ready  # noqa: F401

from serving.formats.labelstudio import ls_rle_to_mask
from serving.server.app import create_app
from serving.server.labelstudio_images import LabelStudioSettings
from serving.server.requests import ServerSettings

BRUSH_CONFIG = ('<View><Image name="img" value="$image"/><RectangleLabels name="box" '
                'toName="img"><Label value="disc"/></RectangleLabels><BrushLabels name="tag" '
                'toName="img"><Label value="disc"/></BrushLabels></View>')
POLY_CONFIG = BRUSH_CONFIG.replace("BrushLabels", "PolygonLabels")
TOKEN = "abc123"
JWT = "header.payload.signature"  # a personal access token (refresh token)


class _FakeLabelStudio(BaseHTTPRequestHandler):
    """Serves ``/data/upload/1/scene.png`` to requests bearing ``Token abc123`` or the access
    token that ``/api/token/refresh`` gives for :data:`JWT`."""

    image = b""

    def do_POST(self):  # noqa: N802 - a personal access token's refresh
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length))
        ok = self.path == "/api/token/refresh" and body.get("refresh") == JWT
        self.send_response(200 if ok else 401)
        self.end_headers()
        if ok:
            self.wfile.write(json.dumps({"access": "short-lived"}).encode())

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.headers.get("Authorization") not in (f"Token {TOKEN}", "Bearer short-lived"):
            self.send_response(401)
            self.end_headers()
            return
        self.send_response(200 if self.path == "/data/upload/1/scene.png" else 404)
        self.end_headers()
        if self.path == "/data/upload/1/scene.png":
            self.wfile.write(self.image)

    def log_message(self, *args):
        pass


@contextmanager
def fake_label_studio(image: bytes):
    _FakeLabelStudio.image = image
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeLabelStudio)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@contextmanager
def backend(segmenter, ls: LabelStudioSettings, **settings):  # noqa: F811
    app = create_app(segmenter, ServerSettings(**settings), label_studio=ls)
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client)
        yield client


def _data_uri(image: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(encode(image)).decode("ascii")


def _rect(x, y, w, h, label="disc", rid="r1"):
    return {"id": rid, "type": "rectanglelabels", "from_name": "box", "to_name": "img",
            "original_width": 160, "original_height": 120,
            "value": {"x": x, "y": y, "width": w, "height": h, "rotation": 0,
                      "rectanglelabels": [label]}}


def _task(tid, image_ref, rects):
    return {"id": tid, "data": {"image": image_ref}, "annotations": [{"result": rects}],
            "predictions": []}


def test_health_setup_and_batch_predictions_match_the_segmenter(segmenter, tmp_path):  # noqa: F811
    image = scene(3)
    rects = [_rect(10, 10, 30, 40), _rect(50, 30, 25, 50, label="not-a-class", rid="r2")]
    with backend(segmenter, LabelStudioSettings()) as client:
        health = client.get("/labelstudio/health").json()
        assert health["status"] == "UP" and health["model_version"].startswith("sim-")
        setup = client.post("/labelstudio/setup", json={"project": "1.0", "schema": BRUSH_CONFIG})
        assert setup.json() == {"model_version": health["model_version"]}
        body = {"tasks": [_task(1, _data_uri(image), rects), _task(2, "", []),
                          {"id": 3, "data": {"text": "no picture"}}],
                "project": "1.0", "label_config": BRUSH_CONFIG, "params": {"context": None}}
        answer = client.post("/labelstudio/predict", json=body)
    assert answer.status_code == 200
    results = answer.json()["results"]
    assert len(results) == 3
    first = results[0]["result"]
    assert [r["type"] for r in first] == ["brushlabels"] * 2
    assert [(r["from_name"], r["to_name"]) for r in first] == [("tag", "img")] * 2
    assert [r["value"]["brushlabels"] for r in first] == [["disc"], ["not-a-class"]]
    boxes = [[16, 12, 64, 60], [80, 36, 120, 96]]  # percent of 160 x 120, in pixels
    want = segmenter.predict(image, boxes=boxes, labels=["disc", None])
    for i, r in enumerate(first):
        assert np.array_equal(ls_rle_to_mask(r["value"]["rle"], 120, 160), want.mask(i))
        assert r["score"] == pytest.approx(float(want.scores[i]), abs=1e-4)
    assert results[1]["result"] == [] and "error" in results[1]  # empty image reference
    assert results[2]["result"] == [] and "task 3: no image" in results[2]["error"]


def test_interactive_context_rectangle_gets_one_polygon(segmenter):  # noqa: F811
    image = scene(4)
    drawn = _rect(20, 20, 40, 40, rid="new")
    task = _task(5, _data_uri(image), [_rect(0, 0, 10, 10), _rect(60, 60, 20, 20)])
    with backend(segmenter, LabelStudioSettings()) as client:
        client.post("/labelstudio/setup", json={"project": "1.0", "schema": POLY_CONFIG})
        answer = client.post("/labelstudio/predict", json={
            "tasks": [task], "params": {"context": {"result": [drawn]}}}).json()
    (result,) = answer["results"][0]["result"]  # the drawn box only, with the setup's config
    assert result["type"] == "polygonlabels" and result["from_name"] == "tag"
    xs = [p[0] for p in result["value"]["points"]]
    ys = [p[1] for p in result["value"]["points"]]
    assert min(xs) >= 20 - 0.7 and max(xs) <= 60 + 0.7  # clipped to the drawn box (percent)
    assert min(ys) >= 20 - 0.9 and max(ys) <= 60 + 0.9


def test_images_from_label_studio_with_its_token_only(segmenter, tmp_path):  # noqa: F811
    image = scene(5)
    (tmp_path / "local.png").write_bytes(encode(image))
    rects = [_rect(10, 10, 30, 30)]
    with fake_label_studio(encode(image)) as url:
        good = LabelStudioSettings(url=url, token=TOKEN, local_root=tmp_path)
        with backend(segmenter, good) as client:
            results = client.post("/labelstudio/predict", json={"tasks": [
                _task(1, "/data/upload/1/scene.png", rects),
                _task(2, f"{url}/data/upload/1/scene.png", rects),
                _task(3, "http://example.invalid/data/upload/1/scene.png", rects),
                _task(4, "local.png", rects),
                _task(5, "../outside.png", rects),
                _task(6, "/data/upload/1/missing.png", rects),
            ]}).json()["results"]
        with backend(segmenter, LabelStudioSettings(url=url, token="wrong")) as client:
            refused = client.post("/labelstudio/predict", json={"tasks": [
                _task(7, "/data/upload/1/scene.png", rects)]}).json()["results"]
        with backend(segmenter, LabelStudioSettings(url=url, token=JWT)) as client:
            personal = client.post("/labelstudio/predict", json={"tasks": [
                _task(8, "/data/upload/1/scene.png", rects)]}).json()["results"]
        with backend(segmenter, LabelStudioSettings(url=url)) as client:
            client.post("/labelstudio/setup", json={"project": "1.0", "access_token": TOKEN,
                                                    "hostname": "http://elsewhere.invalid"})
            assert client.app.state.label_studio.source.setup_token is None  # not our host
            client.post("/labelstudio/setup", json={"project": "1.0", "hostname": url,
                                                    "access_token": TOKEN})
            from_setup = client.post("/labelstudio/predict", json={"tasks": [
                _task(9, "/data/upload/1/scene.png", rects)]}).json()["results"]
    assert [len(r["result"]) for r in results] == [1, 1, 0, 1, 0, 0]
    masks = [ls_rle_to_mask(results[i]["result"][0]["value"]["rle"], 120, 160)
             for i in (0, 1, 3)]
    assert np.array_equal(masks[0], masks[1]) and np.array_equal(masks[0], masks[2])
    assert "not on the configured Label Studio" in results[2]["error"]
    assert "outside --label-studio-root" in results[4]["error"]
    assert "answered 404" in results[5]["error"]
    assert "answered 401" in refused[0]["error"]
    for answer in (personal, from_setup):  # a personal access token; /setup's token
        assert "error" not in answer[0]
        assert np.array_equal(ls_rle_to_mask(answer[0]["result"][0]["value"]["rle"], 120, 160),
                              masks[0])


def test_limits_and_bad_requests(segmenter):  # noqa: F811
    big = np.zeros((200, 300, 3), np.uint8)
    rects = [_rect(10, 10, 30, 30)]
    with backend(segmenter, LabelStudioSettings(), max_pixels=100 * 100) as client:
        results = client.post("/labelstudio/predict", json={"tasks": [
            _task(1, _data_uri(big), rects), _task(2, _data_uri(scene(1)[:80, :90]), rects),
            _task(3, "local.png", rects)]}).json()["results"]
        malformed = client.post("/labelstudio/predict", content=b"{nope",
                                headers={"Content-Type": "application/json"})
        no_tasks = client.post("/labelstudio/predict", json={"tasks": "all"})
    assert "exceeds the limit of 10000 pixels" in results[0]["error"]
    assert len(results[1]["result"]) == 1 and "error" not in results[1]
    assert "reads none" in results[2]["error"]
    assert malformed.status_code == 400 and no_tasks.status_code == 422


def test_worker_processes_get_the_backend_routes(tiny_checkpoint, monkeypatch, tmp_path):
    """``--workers N``: each worker builds its app from the environment, routes included."""
    import json

    from serving.server.app import SETTINGS_ENV, app_from_env

    flags = {"url": "http://127.0.0.1:8080", "token": "k", "local_root": str(tmp_path)}
    monkeypatch.setenv(SETTINGS_ENV, json.dumps({
        "model": str(tiny_checkpoint), "device": "cpu", "dtype": "fp32",
        "label_studio": flags, "settings": {"max_batch": 2}}))
    app = app_from_env()
    paths = {route.path for route in app.routes}
    assert {"/labelstudio/health", "/labelstudio/setup", "/labelstudio/predict"} <= paths
    ls = app.state.label_studio.ls
    assert (ls.url, ls.token, ls.local_root) == (flags["url"], "k", tmp_path)
    monkeypatch.setenv(SETTINGS_ENV, json.dumps({
        "model": str(tiny_checkpoint), "device": "cpu", "settings": {}}))
    assert "/labelstudio/health" not in {route.path for route in app_from_env().routes}


def test_tasks_hold_the_servers_memory_budget(segmenter):  # noqa: F811
    """A Label Studio task is admitted by the same budget as /v1/segment: one too large for
    the whole budget gets its error, the others are answered, nothing stays held."""
    from test_server_hardening import png_claiming  # a header only: it is never decoded

    ref = "data:image/png;base64," + base64.b64encode(png_claiming(3000, 3000)).decode()
    rects = [_rect(10, 10, 30, 30)]
    with backend(segmenter, LabelStudioSettings(), memory_budget_mb=16) as client:
        results = client.post("/labelstudio/predict", json={"tasks": [
            _task(1, ref, rects), _task(2, _data_uri(scene(1)), rects)]}).json()["results"]
        stats = client.get("/v1/stats").json()
    assert "more than this server's whole memory budget of 16 MB" in results[0]["error"]
    assert len(results[1]["result"]) == 1 and "error" not in results[1]
    assert stats["memory_in_use_bytes"] == 0 and stats["memory_peak_bytes"] > 0


def test_task_boxes_go_through_the_segmenters_prompt_check(segmenter):  # noqa: F811
    """A task's rectangles are checked by ``Segmenter.check_prompt`` with the server's limits:
    over ``--max-boxes`` and over ``--max-mask-pixels`` are error results naming the flag;
    a label the model lacks lets the model predict the class."""
    image = _data_uri(scene(2))
    small = [_rect(5, 5, 10, 10, rid=f"r{i}", label="zebra") for i in range(2)]  # 16x12 px
    with backend(segmenter, LabelStudioSettings(), max_boxes=2, max_mask_pixels=500) as client:
        results = client.post("/labelstudio/predict", json={"tasks": [
            _task(1, image, [*small, _rect(50, 50, 10, 10, rid="r3")]),
            _task(2, image, [_rect(10, 10, 30, 30)]), _task(3, image, small)]}).json()["results"]
    assert "3 given, the limit is 2 per request" in results[0]["error"]
    assert "the 1 boxes cover" in results[1]["error"]
    assert "limit of 500 pixels per request (--max-mask-pixels)" in results[1]["error"]
    assert "error" not in results[2] and len(results[2]["result"]) == 2
