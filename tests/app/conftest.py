"""Fixtures for the app tests: a tiny model's ``Handlers`` and a running app server."""

from __future__ import annotations

import time
import urllib.request

import pytest
from app_helpers import SERVER_MAX_BOXES, SERVER_MAX_SIDE, SERVER_MAX_UPLOAD_MB, free_port


@pytest.fixture(scope="session")
def tiny_segmenter(tiny_checkpoint):
    from serving import Segmenter

    return Segmenter.load(tiny_checkpoint, device="cpu")


@pytest.fixture()
def handlers(tiny_segmenter, tmp_path):
    from app.handlers import Handlers

    return Handlers(tiny_segmenter, max_side=SERVER_MAX_SIDE, output_dir=tmp_path / "out")


@pytest.fixture(scope="session")
def app_server(tiny_checkpoint, tmp_path_factory):
    """URL of the app serving the tiny checkpoint on a free loopback port (in this process,
    through ``app.launch``'s own ``create_app`` and ``launch``); closed at the end."""
    from app.launch import create_app, launch, parse_args

    port = free_port()
    out = tmp_path_factory.mktemp("app_out")
    args = parse_args(["--model", str(tiny_checkpoint), "--host", "127.0.0.1", "--port",
                       str(port), "--device", "cpu", "--max-side", str(SERVER_MAX_SIDE),
                       "--max-boxes", str(SERVER_MAX_BOXES), "--max-upload-mb",
                       str(SERVER_MAX_UPLOAD_MB), "--concurrency", "2", "--output-dir",
                       str(out)])
    demo = create_app(args)
    launch(demo, args, block=False)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            if time.monotonic() > deadline:
                demo.close()
                raise
            time.sleep(0.2)
    yield url
    demo.close()
