"""Load check of the HTTP server: throughput, latency and the gain of dynamic batching.

Starts ``python -m serving serve`` on 127.0.0.1 once per configuration (``--max-batch 1``, then
``--max-batch 8``, same concurrency), drives it with N concurrent clients (threads, one
``httpx.Client`` each, keep-alive) for a bounded time, and reports requests/s, p50/p95/p99
latency, errors (target: zero) and the mean batch the server formed. For context it also
measures the model in-process (``Segmenter.predict`` one image at a time vs ``predict_batch``
of 8): the throughput the server's batching is trying to approach.

    python benchmarks/server_load.py                      # tiny random model, 8 clients, 20 s
    python benchmarks/server_load.py --model runs/x/model_final.safetensors --duration 30

Loopback traffic only; bounded in time (``--duration`` per configuration) and in count
(``--max-requests`` per configuration). Writes ``benchmarks/results/server_load.json``/``.md``.
Not a test: numbers depend on the machine and its load; compare rows of one run only.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

from serving import InferenceConfig, ModelConfig, Segmenter, build_condinst  # noqa: E402
from serving.model.model_file import new_card, save_checkpoint  # noqa: E402


def tiny_checkpoint(path: Path) -> Path:
    """A random-weight MobileNetV2-FPN (the test suite's tiny model): 3 classes, inputs
    resized to 128-256 px, class bias raised so automatic mode returns up to 20 instances."""
    import torch

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="mobilenet_v2", num_classes=3, fpn_channels=32, head_convs=1,
                      mask_branch_channels=16, mask_branch_convs=1)
    model = build_condinst(cfg).eval()
    with torch.no_grad():
        model.head.cls_logits.bias.fill_(1.0)
    save_checkpoint(path, model, new_card(cfg, ["disc", "ring", "triangle"], InferenceConfig(
        min_size=128, max_size=256, max_detections=20)))
    return path


def make_images(count: int, size: tuple[int, int]) -> list[np.ndarray]:
    """``count`` distinct (H, W, 3) uint8 scenes: coloured rectangles on noise."""
    rng = np.random.default_rng(0)
    h, w = size
    images = []
    for _ in range(count):
        img = rng.integers(60, 120, size=(h, w, 3), dtype=np.uint8)
        for _ in range(4):
            y, x = int(rng.integers(0, h - h // 4)), int(rng.integers(0, w - w // 4))
            img[y:y + h // 5, x:x + w // 5] = rng.integers(0, 256, 3)
        images.append(img)
    return images


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def wait_ready(proc: subprocess.Popen, port: int, timeout: float = 300) -> subprocess.Popen:
    """Wait until the server ``proc`` on ``port`` answers ``/readyz`` 200 (else kill it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"server not ready after {timeout:g} s")


def start_server(model: Path, port: int, max_batch: int, max_wait_ms: float, device: str,
                 env: dict[str, str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "serving", "serve", "--model", str(model), "--host",
           "127.0.0.1", "--port", str(port), "--device", device, "--max-batch", str(max_batch),
           "--max-wait-ms", str(max_wait_ms), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env, "PYTHONPATH": str(ROOT)})
    return wait_ready(proc, port)


def drive(base: str, payloads: list[bytes], clients: int, duration: float,
          max_requests: int) -> dict[str, Any]:
    """``clients`` threads POST images back to back until ``duration`` s or ``max_requests``;
    returns the raw latencies (ms) of the 200 answers, the error reasons and the wall time."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + duration
    sent = [0]

    def client(index: int) -> None:
        with httpx.Client(base_url=base, timeout=120) as http:
            k = index
            while time.perf_counter() < stop_at:
                with lock:
                    if sent[0] >= max_requests:
                        return
                    sent[0] += 1
                data = payloads[k % len(payloads)]
                k += clients
                t0 = time.perf_counter()
                try:
                    r = http.post("/v1/segment", files={"image": ("i.png", data, "image/png")})
                    ok, reason = r.status_code == 200, f"HTTP {r.status_code}"
                except httpx.HTTPError as exc:
                    ok, reason = False, type(exc).__name__
                elapsed = time.perf_counter() - t0
                with lock:
                    if ok:
                        latencies.append(elapsed * 1000.0)
                    else:
                        errors.append(reason)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": latencies, "errors": errors, "wall": time.perf_counter() - start}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool the windows of one configuration into requests/s and latency percentiles."""
    lat = [v for r in runs for v in r["latencies"]]
    errors = [e for r in runs for e in r["errors"]]
    wall = sum(r["wall"] for r in runs)
    return {"requests": len(lat), "errors": len(errors), "error_kinds": sorted(set(errors)),
            "seconds": round(wall, 2), "requests_per_s": round(len(lat) / wall, 2),
            "p50_ms": round(percentile(lat, 50), 1), "p95_ms": round(percentile(lat, 95), 1),
            "p99_ms": round(percentile(lat, 99), 1)}


def run_server_configs(model: Path, payloads: list[bytes],
                       args: argparse.Namespace) -> list[dict[str, Any]]:
    """One server per ``--batches`` value, all up at once; the load alternates between them
    in ``--windows`` windows so slow drifts of the machine's load hit every row alike."""
    env = {"OMP_NUM_THREADS": str(args.threads)}
    servers: list[tuple[int, str, subprocess.Popen]] = []
    try:
        for max_batch in args.batches:
            port = free_port()
            servers.append((max_batch, f"http://127.0.0.1:{port}",
                            start_server(model, port, max_batch, args.max_wait_ms, args.device,
                                         env)))
        for _, base, _ in servers:
            drive(base, payloads, args.clients, 3.0, 4 * args.clients)  # warm connections
        before = {b: httpx.get(f"{base}/v1/stats").json() for b, base, _ in servers}
        runs: dict[int, list[dict[str, Any]]] = {b: [] for b, _, _ in servers}
        window = args.duration / args.windows
        for w in range(args.windows):
            for max_batch, base, _ in servers:
                runs[max_batch].append(drive(base, payloads, args.clients, window,
                                             args.max_requests // args.windows))
            print(f"window {w + 1}/{args.windows} done", flush=True)
        after = {b: httpx.get(f"{base}/v1/stats").json() for b, base, _ in servers}
    finally:
        for _, _, proc in servers:
            proc.send_signal(signal.SIGTERM)
        for _, _, proc in servers:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    rows = []
    for max_batch, _, _ in servers:
        jobs = after[max_batch]["requests"] - before[max_batch]["requests"]
        batches = after[max_batch]["batches"] - before[max_batch]["batches"]
        row = summarise(runs[max_batch])
        row.update(max_batch=max_batch, max_wait_ms=args.max_wait_ms, clients=args.clients,
                   mean_batch=round(jobs / batches, 2) if batches else 0.0)
        rows.append(row)
    return rows


def offline_throughput(model: Path, images: list[np.ndarray], device: str, seconds: float,
                       threads: int) -> dict[str, float]:
    """Images/s of the model in-process: one image per call vs ``predict_batch`` of 8."""
    import torch

    torch.set_num_threads(threads)
    seg = Segmenter.load(model, device=device)
    out = {}
    for batch in (1, 8):
        chunk = images[:batch]
        seg.predict_batch(chunk, batch_size=batch)  # warm-up
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            seg.predict_batch(chunk, batch_size=batch)
            done += batch
        out[f"batch_{batch}_images_per_s"] = round(done / (time.perf_counter() - start), 2)
    return out


def write_markdown(path: Path, result: dict[str, Any]) -> None:
    rows = result["server"]
    lines = [
        "| max-batch | clients | requests/s | p50 ms | p95 ms | p99 ms | errors | mean batch |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['max_batch']} | {r['clients']} | {r['requests_per_s']} | "
                     f"{r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {r['errors']} | "
                     f"{r['mean_batch']} |")
    off = result["offline"]
    text = [
        "# HTTP server load check", "",
        f"Model: {result['model']}; images {result['image_size'][1]}x{result['image_size'][0]} "
        f"PNG, multipart; {result['duration_s']} s per row in {result['windows']} alternating "
        f"windows; max-wait {rows[0]['max_wait_ms']} ms; device {result['device']}, "
        f"{result['threads']} torch thread(s); {result['machine']}.", "",
        *lines, "",
        f"Dynamic batching gain (requests/s, max-batch {rows[-1]['max_batch']} over "
        f"max-batch 1, same clients): **{result['batching_gain']}x**.", "",
        f"In-process model throughput for reference: {off['batch_1_images_per_s']} images/s one "
        f"at a time, {off['batch_8_images_per_s']} images/s with predict_batch(8) "
        f"({result['offline_batch_gain']}x).", "",
        "Command: `" + " ".join(["python", "benchmarks/server_load.py", *result["argv"]]) + "`",
        "",
    ]
    path.write_text("\n".join(text))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="default: tiny random checkpoint")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=20.0, help="seconds per configuration")
    p.add_argument("--max-requests", type=int, default=5000, help="cap per configuration")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--image-size", type=int, nargs=2, default=[240, 320], metavar=("H", "W"))
    p.add_argument("--windows", type=int, default=4,
                   help="alternate the load between the servers in this many windows")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (OMP_NUM_THREADS) of the servers and the in-process "
                        "reference; 1 on a shared machine")
    p.add_argument("--offline-seconds", type=float, default=8.0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "server_load")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_checkpoint(Path(tmp) / "tiny.safetensors")
        images = make_images(max(8, args.clients), tuple(args.image_size))
        payloads = [png(im) for im in images]
        rows = run_server_configs(model, payloads, args)
        for row in rows:
            print(json.dumps(row), flush=True)
        offline = offline_throughput(model, images, args.device, args.offline_seconds,
                                     args.threads)
    result = {
        "model": str(args.model) if args.model else "tiny random MobileNetV2-FPN (min_size 128)",
        "device": args.device, "image_size": list(args.image_size),
        "duration_s": args.duration, "windows": args.windows, "threads": args.threads,
        "argv": list(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
                   f"{platform.python_version()}",
        "server": rows, "offline": offline,
        "batching_gain": round(rows[-1]["requests_per_s"] / rows[0]["requests_per_s"], 2),
        "offline_batch_gain": round(offline["batch_8_images_per_s"]
                                    / offline["batch_1_images_per_s"], 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    write_markdown(args.out.with_suffix(".md"), result)
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
