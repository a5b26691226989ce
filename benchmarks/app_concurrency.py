"""Concurrency check of the Gradio app (not a timed test): N requests at once, all correct?

Sends ``--requests`` (default 20) box-prompted requests at the same time to a running app's
``/segment_json`` endpoint through ``gradio_client`` (each a different image with two prompt
boxes) and checks every answer: two instances, each box returned as given, each mask
non-empty and inside its box, the instance-id PNG consistent with the masks, and, when the
model file is known, the masks equal to an in-process ``Segmenter.predict`` of the same
request. Writes ``benchmarks/results/app_concurrency.json``.

    python benchmarks/app_concurrency.py --model runs/quickstart/model_final.safetensors
    python benchmarks/app_concurrency.py --url http://127.0.0.1:7860/ [--model SAME_FILE]

With ``--model`` and no ``--url`` the script starts ``python -m app`` itself on a free
loopback port and stops it at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def make_request(i: int, folder: Path) -> tuple[Path, list[list[int]]]:
    """Image i (a deterministic 160..223 x 120..151 picture with two rectangles) and its two
    prompt boxes (XYXY pixels)."""
    rng = np.random.default_rng(i)
    h, w = 120 + int(rng.integers(0, 32)), 160 + int(rng.integers(0, 64))
    img = np.full((h, w, 3), rng.integers(60, 120), dtype=np.uint8)
    boxes = []
    for k, (x0, y0) in enumerate(((10, 10), (w // 2 + 5, h // 2 - 20))):
        bw, bh = int(rng.integers(30, w // 2 - 20)), int(rng.integers(30, h // 2))
        img[y0 + 4:y0 + bh - 4, x0 + 4:x0 + bw - 4] = (200, 60 + 100 * k, 50)
        boxes.append([x0, y0, min(x0 + bw, w), min(y0 + bh, h)])
    path = folder / f"request_{i:02d}.png"
    Image.fromarray(img).save(path)
    return path, boxes


def check_answer(result, boxes: list[list[int]], size: tuple[int, int],
                 reference: np.ndarray | None) -> str | None:
    """None when the answer is right, else what is wrong."""
    from pycocotools import mask as mask_util

    _, coco, png_path = result
    anns = coco["annotations"]
    if len(anns) != len(boxes):
        return f"{len(anns)} instances for {len(boxes)} boxes"
    label_png = np.asarray(Image.open(png_path))
    for i, (ann, (x1, y1, x2, y2)) in enumerate(zip(anns, boxes, strict=True)):
        if ann["bbox"] != [x1, y1, x2 - x1, y2 - y1]:
            return f"box {i}: returned {ann['bbox']}"
        mask = mask_util.decode(ann["segmentation"]).astype(bool)
        if mask.shape != size or not mask.any():
            return f"mask {i}: shape {mask.shape} or empty"
        inside = np.zeros_like(mask)
        inside[y1:y2, x1:x2] = True
        if (mask & ~inside).any():
            return f"mask {i}: pixels outside its box"
        if not np.array_equal(label_png == i + 1, mask):
            return f"mask {i}: instance-id PNG disagrees with the RLE"
        if reference is not None:
            inter = (mask & reference[i]).sum()
            iou = inter / max((mask | reference[i]).sum(), 1)
            if iou < 0.99:
                return f"mask {i}: IoU {iou:.3f} with the in-process prediction"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout:.0f} s") from None
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running app; default: start one for --model")
    p.add_argument("--model", help="the model file (to start the app and/or check masks)")
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--concurrency", type=int, default=2, help="the started app's --concurrency")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/app_concurrency.json"))
    args = p.parse_args(argv)
    if not args.url and not args.model:
        p.error("give --url of a running app, or --model to start one")

    from gradio_client import Client, handle_file

    server = None
    url = args.url
    if url is None:
        url = f"http://127.0.0.1:{free_port()}/"
        port = url.rsplit(":", 1)[1].strip("/")
        server = subprocess.Popen(
            [sys.executable, "-m", "app", "--model", args.model, "--port", port, "--device",
             args.device, "--concurrency", str(args.concurrency)], cwd=REPO,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.perf_counter()
        wait_ready(url, 300)
        startup_s = time.perf_counter() - t0
        client = Client(url, verbose=False)
        info = client.predict(api_name="/model_info")
        with tempfile.TemporaryDirectory() as tmp:
            reqs = [make_request(i, Path(tmp)) for i in range(args.requests)]
            references: list[np.ndarray | None] = [None] * len(reqs)
            if args.model:
                from serving import Segmenter

                seg = Segmenter.load(args.model, device=args.device)
                references = [seg.predict(str(path), boxes=b).masks for path, b in reqs]
            done_at: dict[int, float] = {}

            def finished(i: int):
                return lambda *_: done_at.setdefault(i, time.perf_counter())

            start = time.perf_counter()
            jobs = [client.submit(handle_file(str(path)), json.dumps(b), "boxes", 0.5,
                                  api_name="/segment_json", result_callbacks=[finished(i)])
                    for i, (path, b) in enumerate(reqs)]
            latencies, problems = [], []
            for i, (job, (path, b), ref) in enumerate(zip(jobs, reqs, references, strict=True)):
                try:
                    result = job.result(timeout=600)
                    latencies.append(done_at.get(i, time.perf_counter()) - start)
                    size = Image.open(path).size[::-1]
                    problem = check_answer(result, b, size, ref)
                except Exception as exc:  # noqa: BLE001 - record and go on
                    problem = f"{type(exc).__name__}: {exc}"
                if problem:
                    problems.append({"request": path.name, "problem": problem})
            wall = time.perf_counter() - start
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)

    report = {
        "requests": args.requests,
        "correct": args.requests - len(problems),
        "problems": problems,
        "checked_against_in_process_predict": bool(args.model),
        "wall_s_all_requests": round(wall, 3),
        "completion_s_after_sending_all": {
            "min": round(min(latencies), 3), "median": round(float(np.median(latencies)), 3),
            "max": round(max(latencies), 3)} if latencies else None,
        "server_startup_s": round(startup_s, 1) if server is not None else None,
        "server_concurrency": args.concurrency if server is not None else "unknown (--url)",
        "model": {"file": args.model,
                  **{k: info[k] for k in ("backbone", "backend", "device", "classes")}},
        "command": "python benchmarks/app_concurrency.py " + " ".join(argv or sys.argv[1:]),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "note": "absolute times on a shared CPU; not a speed benchmark"},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("requests", "correct", "wall_s_all_requests",
                                             "completion_s_after_sending_all")}))
    for prob in problems:
        print(f"  {prob['request']}: {prob['problem']}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
