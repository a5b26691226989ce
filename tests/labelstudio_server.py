"""A real Label Studio for the tests: its own venv, a migrated database template, start/stop.

Label Studio (the PyPI package) pins numpy and other packages below the project's versions,
so ``.ci/install-dev.sh`` installs it into ``.venv-labelstudio`` next to ``.venv`` and runs
``python tests/labelstudio_server.py prepare`` once: its first start migrates a fresh SQLite
database (minutes), which is kept as a template. Each test session copies the template and
starts in ~10 s: SQLite, 127.0.0.1, a free port, sign-up off, a fixed user and legacy token,
and loopback ML backends allowed (``ML_BLOCK_LOCAL_IP=false``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("SIM_LABEL_STUDIO_VENV", ROOT / ".venv-labelstudio"))
TEMPLATE = VENV / "sim-template"
USER, PASSWORD = "sim@example.com", "sim-test-password"
TOKEN = "5a1b2c3d4e5f60718293a4b5c6d7e8f901234567"


def python() -> Path:
    return VENV / "bin" / "python"


def available() -> bool:
    return (VENV / "bin" / "label-studio").is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_",
                                                                       "PYTHON"))}
    env.update(LABEL_STUDIO_BASE_DATA_DIR=str(data_dir),
               LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK="true",
               LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true", ML_BLOCK_LOCAL_IP="false",
               SSRF_PROTECTION_ENABLED="false",
               COLLECT_ANALYTICS="false", SENTRY_DSN="", FRONTEND_SENTRY_DSN="")
    return env


def launch(data_dir: Path, port: int) -> subprocess.Popen:
    """Start Label Studio on 127.0.0.1:``port`` with its data in ``data_dir`` (copied from the
    template when there is one); :func:`wait_up` waits for it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if (TEMPLATE / "label_studio.sqlite3").is_file() and data_dir != TEMPLATE:
        shutil.copy2(TEMPLATE / "label_studio.sqlite3", data_dir / "label_studio.sqlite3")
    log = (data_dir / "label_studio.log").open("wb")
    return subprocess.Popen(
        [str(VENV / "bin" / "label-studio"), "start", "--no-browser", "--internal-host",
         "127.0.0.1", "-p", str(port), "--data-dir", str(data_dir), "--username", USER,
         "--password", PASSWORD, "--user-token", TOKEN, "--enable-legacy-api-token"],
        env=_env(data_dir), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_up(proc: subprocess.Popen, url: str, timeout: float = 600.0) -> None:
    """Wait until ``url`` answers (the process must stay alive); stop it on a timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.25)
    stop(proc)
    raise RuntimeError(f"{url} not up after {timeout:g} s")


def start(data_dir: Path, port: int, timeout: float = 600.0) -> subprocess.Popen:
    """:func:`launch` and :func:`wait_up` for ``/health``."""
    proc = launch(data_dir, port)
    wait_up(proc, f"http://127.0.0.1:{port}/health", timeout)
    return proc


def stop(proc: subprocess.Popen) -> None:
    """Stop a process started by :func:`start` (its own process group, by id)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def launch_backend(model: Path, label_studio: str, log_dir: Path,
                   ) -> tuple[subprocess.Popen, str]:
    """Start ``sim serve --label-studio`` for ``label_studio`` on a free port (the project's
    own Python); returns the process and the server's URL (the backend is at
    ``/labelstudio``; ``/readyz`` says when it is up)."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log = (log_dir / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving", "serve", "--model", str(model), "--device", "cpu",
         "--port", str(port), "--label-studio", "--label-studio-url", label_studio,
         "--label-studio-token", TOKEN], stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return proc, f"http://127.0.0.1:{port}"


def start_backend(model: Path, label_studio: str, log_dir: Path,
                  timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    """:func:`launch_backend` and wait until it is ready; returns the backend URL."""
    proc, url = launch_backend(model, label_studio, log_dir)
    wait_up(proc, url + "/readyz", timeout)
    return proc, url + "/labelstudio"


def run_steps(step: str, args: dict, work: Path) -> dict:
    """Run one step of ``tests/labelstudio_steps.py`` in the Label Studio venv; its JSON."""
    args = dict(args, out=str(work / f"{step}.out.json"))
    (work / f"{step}.json").write_text(json.dumps(args))
    done = subprocess.run([str(python()), str(Path(__file__).parent / "labelstudio_steps.py"),
                           step, str(work / f"{step}.json")], capture_output=True, text=True,
                          timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"labelstudio_steps.py {step} failed: {done.stderr[-3000:]}")
    return json.loads(Path(args["out"]).read_text())


def screenshot(url: str, project: int, task: int, out: Path) -> None:
    """A task in Label Studio's editor as headless Chromium shows it, saved as ``out``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(f"{url}/user/login/")
        page.fill("input[name=email]", USER)
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_load_state("networkidle")
        page.goto(f"{url}/projects/{project}/data?task={task}")
        page.wait_for_load_state("networkidle")
        page.wait_for_timeout(5000)
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out))
        browser.close()


def prepare() -> float:
    """Migrate the template database once (the slow first start); returns its seconds."""
    if (TEMPLATE / "label_studio.sqlite3").is_file():
        return 0.0
    begin = time.monotonic()
    stop(start(TEMPLATE, free_port(), timeout=1800.0))
    return time.monotonic() - begin


if __name__ == "__main__":
    if sys.argv[1:] != ["prepare"]:
        sys.exit("usage: python tests/labelstudio_server.py prepare")
    print(f"label-studio template ready ({prepare():.0f} s)")
