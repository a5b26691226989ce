"""The HTTP server's memory budget under concurrent large uploads: peak RSS against the bound
``sim serve`` states at start-up, and the answers (only 200 or 503 with Retry-After).

Starts ``python -m serving serve`` on 127.0.0.1 (the benchmark's tiny random model of
:mod:`server_load`, automatic mode: up to ``max_detections`` masks per image, each spanning
much of it, the costliest case per pixel) with ``--memory-budget-mb``, then ``--clients``
threads each POST one ``--side`` x ``--side`` PNG at the same moment. The server's peak
resident memory is its ``VmHWM`` (Linux ``/proc/<pid>/status``) after the last answer; the
stated bound is the "at most about N MB resident" line the server prints at start-up (model
and runtime at start-up + the budget).

    python benchmarks/server_memory.py                        # 20 clients, 8000x8000, 4096 MB
    python benchmarks/server_memory.py --clients 4 --side 2000 --budget-mb 512

Loopback only; one request per client; bounded by ``--timeout`` seconds per request.
Writes ``benchmarks/results/server_memory.json`` / ``.md``. Not a test.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import httpx  # noqa: E402
from common import write_results  # noqa: E402
from server_load import free_port, png, tiny_checkpoint, wait_ready  # noqa: E402

STATED = re.compile(r"at most about (\d+) MB resident")


def large_png(side: int) -> bytes:
    """A ``side`` x ``side`` RGB PNG of a few flat rectangles (small file, many pixels)."""
    img = np.full((side, side, 3), 90, np.uint8)
    for k in range(4):
        a, b = side * k // 5, side * (k + 1) // 5
        img[a:b, a:b] = (60 * k, 200 - 40 * k, 120)
    return png(img)


def proc_status(pid: int, field: str) -> int:
    """``field`` (VmRSS, VmHWM) of process ``pid`` in bytes."""
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def start(model: Path, port: int, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "serving", "serve", "--model", str(model), "--host",
           "127.0.0.1", "--port", str(port), "--device", "cpu", "--log-level", "warning",
           "--memory-budget-mb", str(args.budget_mb), "--admission-wait", str(args.wait)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=open(log, "w"))
    try:
        return wait_ready(proc, port)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}: {log.read_text()[-2000:]}") from None


def burst(base: str, data: bytes, clients: int, timeout: float) -> list[dict[str, Any]]:
    """``clients`` threads POST ``data`` at once (a barrier releases them together)."""
    answers: list[dict[str, Any]] = [{} for _ in range(clients)]
    gate = threading.Barrier(clients)

    def client(i: int) -> None:
        with httpx.Client(base_url=base, timeout=timeout) as http:
            gate.wait()
            t0 = time.perf_counter()
            try:
                r = http.post("/v1/segment", files={"image": ("big.png", data, "image/png")})
                answers[i] = {"status": r.status_code, "retry_after": r.headers.get("retry-after"),
                              "code": r.json().get("error", {}).get("code") if r.status_code
                              != 200 else None}
            except httpx.HTTPError as exc:
                answers[i] = {"status": type(exc).__name__}
            answers[i]["seconds"] = round(time.perf_counter() - t0, 2)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def run(args: argparse.Namespace) -> dict[str, Any]:
    data = large_png(args.side)
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_checkpoint(Path(tmp) / "tiny.safetensors")
        port, log = free_port(), Path(tmp) / "server.log"
        proc = start(model, port, args, log)
        try:
            ready_rss = proc_status(proc.pid, "VmRSS")
            answers = burst(f"http://127.0.0.1:{port}", data, args.clients, args.timeout)
            peak = proc_status(proc.pid, "VmHWM")
            after = proc_status(proc.pid, "VmRSS")
            stats = httpx.get(f"http://127.0.0.1:{port}/v1/stats", timeout=10).json()
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        statement = next((line for line in log.read_text().splitlines()
                          if line.startswith("memory budget")), "")
    match = STATED.search(statement)
    stated = int(match.group(1)) if match else None
    counts = Counter(str(a["status"]) for a in answers)
    mb = 1 << 20
    return {
        "clients": args.clients, "image": f"{args.side}x{args.side} PNG, {len(data)} bytes",
        "budget_mb": args.budget_mb, "admission_wait_s": args.wait, "threads": args.threads,
        "statement": statement, "stated_bound_mb": stated,
        "rss_ready_mb": round(ready_rss / mb), "peak_rss_mb": round(peak / mb),
        "rss_after_mb": round(after / mb),
        "within_bound": stated is not None and peak / mb <= stated,
        "answers": dict(counts), "only_200_or_503": set(counts) <= {"200", "503"},
        "retry_after_on_every_503": all(a.get("retry_after") for a in answers
                                        if a["status"] == 503),
        "budget_peak_mb": round(stats["memory_peak_bytes"] / mb),
        "per_client": answers,
        "command": " ".join(["python", "benchmarks/server_memory.py", *args.argv]),
    }


def markdown(r: dict[str, Any]) -> str:
    answers = ", ".join(f"{v} x {k}" for k, v in sorted(r["answers"].items()))
    return "\n".join([
        "# HTTP server memory under concurrent large uploads", "",
        f"{r['clients']} clients at once, each one {r['image']} (automatic mode, tiny random "
        f"model: up to 20 masks per image); `--memory-budget-mb {r['budget_mb']:g}`, "
        f"`--admission-wait {r['admission_wait_s']:g}`, {r['threads']} torch thread(s), CPU.", "",
        "| stated bound (MB) | RSS when ready (MB) | peak RSS (MB) | RSS after (MB) | "
        "budget peak (MB) | answers | within bound |",
        "| ---: | ---: | ---: | ---: | ---: | --- | --- |",
        f"| {r['stated_bound_mb']} | {r['rss_ready_mb']} | {r['peak_rss_mb']} | "
        f"{r['rss_after_mb']} | {r['budget_peak_mb']} | {answers} | "
        f"{'yes' if r['within_bound'] else 'NO'} |", "",
        f"Start-up statement: `{r['statement']}`", "",
        "Peak RSS is the server's VmHWM; budget peak is the most bytes the admitted requests "
        "held at once by the server's own count. Every 503 carried Retry-After: "
        f"{'yes' if r['retry_after_on_every_503'] else 'NO'}.", "",
        f"Command: `{r['command']}`",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--side", type=int, default=8000, help="image width = height, pixels")
    p.add_argument("--budget-mb", type=float, default=4096)
    p.add_argument("--wait", type=float, default=30.0, help="--admission-wait of the server")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the server")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--name", default="server_memory")
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    result = run(args)
    write_results(args.out, args.name, result, markdown(result))
    return 0 if result["within_bound"] and result["only_200_or_503"] else 1


if __name__ == "__main__":
    sys.exit(main())
