"""The server's defaults come from the model: its calibrated score threshold when a request
gives none, and ``--image-size`` reaching the network."""

from __future__ import annotations

import base64
import shutil

import numpy as np
from server_helpers import encode, scene, serve

from serving import Segmenter
from serving.model.card import Calibration
from serving.model.model_file import recalibrate_checkpoint


def test_no_threshold_means_the_calibrated_one(tiny_checkpoint, tmp_path) -> None:
    model = tmp_path / "m.safetensors"
    shutil.copy(tiny_checkpoint, model)
    image = scene(3)
    raw = Segmenter.load(model, device="cpu").predict(image)
    assert len(raw) > 2
    cut = float(np.sort(raw.scores)[len(raw) // 2])  # keeps the upper half
    recalibrate_checkpoint(model, Calibration(score_threshold=cut))
    seg = Segmenter.load(model, device="cpu")
    assert seg.display_threshold == cut
    with serve(seg, max_wait_ms=0) as client:
        assert client.get("/v1/model").json()["score_threshold"] == cut
        body = client.post("/v1/segment", files={"image": ("a.png", encode(image))}).json()
        assert len(body["instances"]) == int((raw.scores >= cut).sum())
        everything = client.post("/v1/segment", files={"image": ("a.png", encode(image))},
                                 data={"score_threshold": "0"}).json()
        assert len(everything["instances"]) == len(raw)
        for word, count in (("all", len(raw)), ("calibrated", len(body["instances"]))):
            form = client.post("/v1/segment", files={"image": ("a.png", encode(image))},
                               data={"score_threshold": word}).json()
            data = base64.b64encode(encode(image)).decode()
            sent = client.post("/v1/segment", json={"image": data, "score_threshold": word})
            assert len(form["instances"]) == len(sent.json()["instances"]) == count, word


def test_image_size_reaches_the_network(tiny_checkpoint) -> None:
    seg = Segmenter.load(tiny_checkpoint, device="cpu", image_size=[64, 96])
    with serve(seg, max_wait_ms=0) as client:
        rules = client.get("/v1/model").json()["input"]
        assert (rules["resize_min_size"], rules["resize_max_size"]) == (64, 96)


def test_serve_accepts_image_size(monkeypatch, tiny_checkpoint) -> None:
    """``sim serve --image-size`` loads the model at that size (the server is not started)."""
    import serving.server.app as server_app

    loaded: list = []

    def stop(*args, **kwargs):
        loaded.append(kwargs.get("image_size"))
        raise SystemExit(0)

    monkeypatch.setattr(server_app.Segmenter, "load", stop)
    try:
        server_app.main(["--model", str(tiny_checkpoint), "--image-size", "64", "96"])
    except SystemExit:
        pass
    assert loaded == [[64, 96]]
