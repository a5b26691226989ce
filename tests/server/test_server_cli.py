"""``python -m serving serve`` as a real process on loopback: start, serve, graceful stop."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from server_helpers import encode, free_port, scene  # noqa: E402

from serving.__main__ import main as serving_main  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def test_bad_model_path_is_a_one_line_error(tmp_path, capsys) -> None:
    assert serving_main(["serve", "--model", str(tmp_path / "missing.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: model") and "not found" in err and err.count("\n") == 1


def test_bad_flags_are_usage_errors(capsys) -> None:
    for flags, message in ((["--max-batch", "0"], "--max-batch must be at least 1"),
                           (["--max-wait-ms", "-1"], "--max-wait-ms must be >= 0"),
                           (["--max-boxes", "0"], "--max-boxes must be at least 1"),
                           (["--body-timeout", "nan"], "--body-timeout must be finite"),
                           (["--timeout-keep-alive", "inf"], "must be finite numbers > 0"),
                           (["--max-wait-ms", "nan"], "must be finite numbers"),
                           (["--port", "70000"], "--port 70000: must be 1-65535"),
                           (["--memory-budget-mb", "nan"], "--memory-budget-mb nan: must be"),
                           (["--admission-wait", "-1"], "--admission-wait -1: must be")):
        with pytest.raises(SystemExit) as exc:
            serving_main(["serve", "--model", "m.safetensors", *flags])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert message in err, (flags, err)


@pytest.mark.slow
def test_sigterm_finishes_the_in_flight_request(tiny_checkpoint) -> None:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving", "serve", "--model", str(tiny_checkpoint), "--port",
         str(port), "--device", "cpu", "--max-wait-ms", "2500", "--log-level", "info",
         "--shutdown-grace", "0"],  # stop accepting at once: the drain itself is tested
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
        else:
            raise AssertionError("server did not become ready")
        assert httpx.get(f"{base}/v1/model").json()["classes"] == ["disc", "ring", "triangle"]

        result: dict = {}

        def request() -> None:  # waits ~2.5 s in the batch queue: in flight at SIGTERM
            result["r"] = httpx.post(f"{base}/v1/segment", timeout=60,
                                     files={"image": ("a.png", encode(scene(1)), "image/png")})

        thread = threading.Thread(target=request)
        thread.start()
        time.sleep(0.8)
        proc.send_signal(signal.SIGTERM)
        thread.join(60)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stdout.read() if proc.stdout else ""
    assert result["r"].status_code == 200, log
    assert result["r"].json()["image_size"] == [120, 160]
    assert code in (0, -signal.SIGTERM), log
    assert "Finished server process" in log
    statement = next(line for line in log.splitlines() if line.startswith("memory budget:"))
    assert "at most 4096 MB together (--memory-budget-mb)" in statement  # stated at start-up
    assert re.search(r"at most about \d+ MB resident", statement), statement
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base}/healthz", timeout=2)


@pytest.mark.slow
def test_sigterm_turns_readiness_off_and_keeps_serving_for_the_grace_period(
        tiny_checkpoint) -> None:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving", "serve", "--model", str(tiny_checkpoint), "--port",
         str(port), "--device", "cpu", "--shutdown-grace", "3", "--log-level", "warning"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        ready = httpx.get(f"{base}/readyz", timeout=5)
        served = httpx.post(f"{base}/v1/segment", timeout=30,
                            files={"image": ("a.png", encode(scene(1)), "image/png")})
        health = httpx.get(f"{base}/healthz", timeout=5)
        in_grace = time.monotonic() - t0
        code = proc.wait(60)
        stopped = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stdout.read() if proc.stdout else ""
    assert in_grace < 3, "the checks above ran after the grace period; rerun on a quieter machine"
    assert ready.status_code == 503 and ready.json()["status"] == "shutting_down", log
    assert served.status_code == 200 and health.status_code == 200, log
    assert stopped >= 3 and code in (0, -signal.SIGTERM), log
