"""Every endpoint of the HTTP server with good and bad input (in-process, tiny model)."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from server_helpers import assert_same_answer, encode, scene, segmenter, serve  # noqa: F401


@pytest.fixture(scope="module")
def client(segmenter):  # noqa: F811
    with serve(segmenter, max_boxes=4, max_body_mb=0.25, max_pixels=400 * 300) as c:
        yield c


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return scene(0)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def post_form(client, data: bytes, **fields):
    return client.post("/v1/segment", files={"image": ("x.png", data, "image/png")},
                       data={k: v for k, v in fields.items()})


def error_of(response, status: int, code: str, field: str | None = None) -> str:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert err["code"] == code, err
    if field is not None:
        assert err["field"] == field, err
    assert "\n" not in err["message"] and len(err["message"]) > 10
    return err["message"]


# --------------------------------------------------------------------------- GET endpoints
def test_health_model_and_stats(client, segmenter) -> None:  # noqa: F811
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"ready": True, "status": "ready", "detail": None}
    info = client.get("/v1/model").json()
    assert info["classes"] == ["disc", "ring", "triangle"]
    assert (info["backbone"], info["backend"], info["device"]) == ("mobilenet_v2", "torch", "cpu")
    assert info["limits"] == {"max_body_bytes": 262144, "max_pixels": 120000, "max_boxes": 4,
                              "max_mask_pixels": 2 ** 28, "max_batch": 8, "max_wait_ms": 10.0,
                              "max_queue": 64, "keep_alive_s": 5.0, "body_timeout_s": 60.0,
                              "memory_budget_bytes": 4096 << 20, "admission_wait_s": 30.0}
    assert info["input"]["content_types"] == ["multipart/form-data", "application/json"]
    assert (info["input"]["resize_min_size"], info["input"]["resize_max_size"]) == (128, 256)
    stats = client.get("/v1/stats").json()
    assert stats["failed"] == 0 and stats["queued"] == 0 and stats["batches"] >= 0
    assert stats["memory_in_use_bytes"] == 0 and stats["waiting_for_memory"] == 0


def test_unknown_path_and_method_use_the_error_envelope(client) -> None:
    error_of(client.get("/v2/nothing"), 404, "not_found")
    error_of(client.delete("/v1/segment"), 405, "method_not_allowed")
    error_of(client.get("/v1/segment"), 405, "method_not_allowed")


def test_openapi_describes_both_bodies_and_the_limits(client) -> None:
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/v1/segment"]["post"]
    content = op["requestBody"]["content"]
    assert set(content) == {"multipart/form-data", "application/json"}
    form = content["multipart/form-data"]["schema"]
    assert form["required"] == ["image"] and form["properties"]["image"]["format"] == "binary"
    boxes = content["application/json"]["schema"]["properties"]["boxes"]["anyOf"][0]
    assert boxes["maxItems"] == 4 and boxes["items"]["minItems"] == 4
    assert {"200", "400", "413", "415", "422", "500", "503"} <= set(op["responses"])
    assert set(spec["paths"]) == {"/v1/segment", "/v1/model", "/v1/stats", "/healthz",
                                  "/readyz"}


# --------------------------------------------------------------------------- good input
def test_multipart_automatic_equals_segmenter_predict(client, segmenter, image) -> None:  # noqa: F811
    r = post_form(client, encode(image))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "auto" and len(body["instances"]) > 0
    assert_same_answer(body, segmenter.predict(image))
    t = body["timing_ms"]
    assert 0 <= t["queue"] <= t["total"] and 0 < t["inference"] <= t["total"]


def test_json_prompted_equals_segmenter_predict(client, segmenter, image) -> None:  # noqa: F811
    boxes = [[10, 12, 70, 60], [80.5, 40, 150, 110]]
    labels = ["ring", None]
    r = client.post("/v1/segment", json={"image": b64(encode(image)), "boxes": boxes,
                                         "labels": labels})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "prompt"
    assert_same_answer(body, segmenter.predict(image, boxes=boxes, labels=labels))
    assert body["instances"][0]["label_name"] == "ring"


def test_multipart_prompt_with_label_indices_and_data_url(client, segmenter, image) -> None:  # noqa: F811
    boxes = [[5, 5, 60, 50]]
    r = post_form(client, encode(image, "JPEG"), boxes=json.dumps(boxes), labels="[2]")
    assert r.status_code == 200, r.text
    from serving import load_image

    decoded = load_image(encode(image, "JPEG"))
    assert_same_answer(r.json(), segmenter.predict(decoded, boxes=boxes, labels=[2]))
    url = "data:image/png;base64," + b64(encode(image))
    r = client.post("/v1/segment", json={"image": url, "boxes": boxes, "labels": [2]})
    assert_same_answer(r.json(), segmenter.predict(image, boxes=boxes, labels=[2]))


def test_score_threshold_matches_segmenter(client, segmenter, image) -> None:  # noqa: F811
    scores = np.sort(segmenter.predict(image).scores)
    threshold = float(scores[len(scores) // 2])  # keeps the upper half
    ref = segmenter.predict(image, score_threshold=threshold)
    assert 0 < len(ref) < len(scores)  # the threshold really filters
    r = post_form(client, encode(image), score_threshold=repr(threshold))
    assert_same_answer(r.json(), ref)
    r = client.post("/v1/segment", json={"image": b64(encode(image)),
                                         "score_threshold": threshold})
    assert_same_answer(r.json(), ref)


def test_boxes_partly_outside_are_clipped(client, segmenter, image) -> None:  # noqa: F811
    r = post_form(client, encode(image), boxes="[[-20, -5, 90, 70], [100, 60, 400, 300]]")
    assert r.status_code == 200, r.text
    assert [i["box"] for i in r.json()["instances"]] == [[0, 0, 90, 70], [100, 60, 160, 120]]
    ref = segmenter.predict(image, boxes=[[0, 0, 90, 70], [100, 60, 160, 120]])
    assert_same_answer(r.json(), ref)


def test_empty_box_list_is_prompt_mode_with_no_instances(client, image) -> None:
    r = client.post("/v1/segment", json={"image": b64(encode(image)), "boxes": []})
    assert r.status_code == 200
    assert r.json()["instances"] == [] and r.json()["mode"] == "prompt"


# --------------------------------------------------------------------------- bad boxes / labels
@pytest.mark.parametrize("boxes, code, field, words", [
    ("[[10, 10, 50, 50], [60, 60, 20, 20]]", "invalid_boxes", "boxes[1]", "box 1"),
    ("[[NaN, 1, 50, 50]]", "invalid_boxes", "boxes[0]", "NaN"),
    ("[[10, 10, 10, 50]]", "invalid_boxes", "boxes[0]", "zero area"),
    ("[[500, 500, 600, 600]]", "invalid_boxes", "boxes[0]", "outside"),
    ("[[1, 2, 3]]", "invalid_field", "boxes[0]", "boxes[0]"),
    ('[["a", 2, 3, 4]]', "invalid_field", "boxes[0][0]", "number"),
    ('{"x": 1}', "invalid_field", "boxes", "list"),
    ("[[1, 2, 3, 4]", "malformed_json", "boxes", "not valid JSON"),
    ("[[0,0,9,9],[0,0,9,9],[0,0,9,9],[0,0,9,9],[0,0,9,9]]", "too_many_boxes", "boxes",
     "limit is 4"),
])
def test_bad_boxes_are_422_naming_the_box(client, image, boxes, code, field, words) -> None:
    message = error_of(post_form(client, encode(image), boxes=boxes), 422, code, field)
    assert words in message


def test_bad_boxes_in_json_body(client, image) -> None:
    data = b64(encode(image))
    msg = error_of(client.post("/v1/segment", json={"image": data, "boxes": [[9, 9, 5, 30]]}),
                   422, "invalid_boxes", "boxes[0]")
    assert "reversed" in msg
    error_of(client.post("/v1/segment", json={"image": data, "boxes": [[0, 0, 9, 9]] * 5}),
             422, "too_many_boxes", "boxes")
    error_of(client.post("/v1/segment", json={"image": data, "boxes": [["1", 2, 3, 4]]}),
             422, "invalid_field", "boxes[0][0]")


@pytest.mark.parametrize("labels, field, words", [
    ('["zebra"]', "labels[0]", "unknown class 'zebra'"),
    ("[7]", "labels[0]", "out of range"),
    ('["disc", "ring"]', "labels", "2 given for 1 boxes"),
    ("[true]", "labels[0]", "labels[0]"),
])
def test_bad_labels_are_422(client, image, labels, field, words) -> None:
    r = post_form(client, encode(image), boxes="[[10, 10, 50, 50]]", labels=labels)
    assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text
    assert words in r.json()["error"]["message"]


def test_labels_without_boxes_are_422(client, image) -> None:
    error_of(post_form(client, encode(image), labels='["disc"]'), 422, "invalid_labels", "labels")


@pytest.mark.parametrize("value", ["1.5", "-0.1", "abc", "nan", "Calibrated"])
def test_bad_score_threshold(client, image, value) -> None:
    msg = error_of(post_form(client, encode(image), score_threshold=value), 422,
                   "invalid_field", "score_threshold")
    assert "'calibrated' or 'all'" in msg
    error_of(client.post("/v1/segment", json={"image": b64(encode(image)),
                                              "score_threshold": "best"}),
             422, "invalid_field", "score_threshold")


# --------------------------------------------------------------------------- bad images / bodies
def test_bad_images_are_422(client, image) -> None:
    png = encode(image)
    msg = error_of(post_form(client, png[: len(png) // 2]), 422, "invalid_image", "image")
    assert "truncated" in msg
    error_of(post_form(client, b"this is not an image"), 422, "invalid_image", "image")
    error_of(post_form(client, b""), 422, "invalid_image", "image")
    msg = error_of(post_form(client, encode(np.zeros((4, 6, 3), np.uint8))), 422,
                   "invalid_image", "image")
    assert "too small" in msg
    msg = error_of(client.post("/v1/segment", json={"image": "not*base64!"}), 422,
                   "invalid_base64", "image")
    assert "base64" in msg


def test_missing_and_unknown_fields(client, image) -> None:
    error_of(client.post("/v1/segment", data={"boxes": "[]"}, files={"x": ("a", b"1")}), 422,
             "unknown_field", "x")
    error_of(client.post("/v1/segment", files={"boxes": (None, "[]")}), 422, "missing_field",
             "image")
    error_of(client.post("/v1/segment", json={"boxes": []}), 422, "missing_field", "image")
    error_of(client.post("/v1/segment", json={"image": b64(encode(image)), "colour": 1}), 422,
             "invalid_field", "colour")
    error_of(client.post("/v1/segment", json=[1, 2]), 422, "invalid_field", "body")


def test_wrong_content_type_is_415(client, image) -> None:
    msg = error_of(client.post("/v1/segment", content=encode(image),
                               headers={"content-type": "image/png"}), 415,
                   "unsupported_media_type", "Content-Type")
    assert "multipart/form-data" in msg and "application/json" in msg
    error_of(client.post("/v1/segment", content=b"x"), 415, "unsupported_media_type")


def test_malformed_bodies_are_400(client) -> None:
    error_of(client.post("/v1/segment", content=b"{not json",
                         headers={"content-type": "application/json"}), 400, "malformed_body")
    error_of(client.post("/v1/segment", content=b"abc",
                         headers={"content-type": "multipart/form-data"}), 400,
             "malformed_body", "body")  # no boundary
    nameless = b"--zz\r\nContent-Disposition: form-data\r\n\r\nxx\r\n--zz--\r\n"
    error_of(client.post("/v1/segment", content=nameless,
                         headers={"content-type": "multipart/form-data; boundary=zz"}), 400,
             "malformed_body", "body")


def test_oversize_body_is_413_from_header_and_while_reading(client) -> None:
    big = b"\0" * (300 * 1024)  # limit is 256 KiB
    msg = error_of(post_form(client, big), 413, "body_too_large", "body")
    assert "262144 bytes" in msg

    def chunks():  # no Content-Length: the server counts while reading
        for _ in range(40):
            yield b"\0" * 8192

    r = client.post("/v1/segment", content=chunks(),
                    headers={"content-type": "application/json"})
    error_of(r, 413, "body_too_large", "body")


def test_too_many_pixels_is_413_before_decoding(client) -> None:
    flat = np.zeros((400, 301, 3), np.uint8)  # 120400 > 120000 pixels, tiny as PNG
    msg = error_of(post_form(client, encode(flat)), 413, "image_too_large", "image")
    assert "301x400" in msg


def test_server_still_answers_after_bad_requests(client, segmenter, image) -> None:  # noqa: F811
    for _ in range(3):
        post_form(client, b"garbage")
    assert_same_answer(post_form(client, encode(image)).json(), segmenter.predict(image))
