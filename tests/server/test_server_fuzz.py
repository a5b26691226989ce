"""Schema-based fuzzing of the HTTP server with schemathesis (in-process ASGI, bounded).

Every operation of the app's own OpenAPI schema gets up to ``MAX_EXAMPLES`` generated
requests (valid and invalid by the schema, plus the schema's examples); every answer must be
non-5xx, carry a status the schema lists, and match that status's response schema.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("fastapi")

from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from serving import Segmenter  # noqa: E402
from serving.server.app import create_app  # noqa: E402
from serving.server.requests import ServerSettings  # noqa: E402

MAX_EXAMPLES = 30
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, negative_data_rejection]


def _build_app():
    """The app under test, built at import: schemathesis reads its schema at collection
    (its fixture-based lazy loader does not work with pytest 9)."""
    from sim_testing import make_tiny_checkpoint

    path = make_tiny_checkpoint(Path(_TMP.name) / "tiny.safetensors")
    seg = Segmenter.from_checkpoint(path, device="cpu")
    # no warm-up: each test case starts the app's lifespan, and /readyz is 503 until it ends
    return create_app(seg, ServerSettings(max_boxes=8, max_body_mb=1.0, max_wait_ms=2.0,
                                          warmup=False))


_TMP = tempfile.TemporaryDirectory(prefix="server-fuzz-")
APP = _build_app()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_every_operation_conforms_to_its_schema(case) -> None:
    case.call_and_validate(checks=CHECKS)


def test_the_schema_example_request_is_answered() -> None:
    from fastapi.testclient import TestClient

    with TestClient(APP) as client:
        spec = client.get("/openapi.json").json()
        content = spec["paths"]["/v1/segment"]["post"]["requestBody"]["content"]
        for name, example in content["application/json"]["examples"].items():
            r = client.post("/v1/segment", json=example["value"])
            assert r.status_code == 200, (name, r.text)
            assert r.json()["image_size"] == [32, 48]
            assert r.json()["mode"] == ("prompt" if "boxes" in example["value"] else "auto")
