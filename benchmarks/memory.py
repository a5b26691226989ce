"""Peak memory and latency of one large request: 1 / 32 / 256 prompt boxes on 8000x6000.

Each case runs in a fresh Python process, so its peak RSS (``os.wait4``'s ``ru_maxrss``) is
its own. A case does what the HTTP server does with one request: decode the PNG, predict the
prompted masks, build the JSON answer (COCO RLE per mask, areas). ``before`` runs the code
of another checkout (``--before /work/main``, put first on ``PYTHONPATH``), ``after`` this
one. A watchdog kills a case whose resident memory passes ``--cap-gb`` (the machine is
shared; the row then says "killed"), and the last row sends 256 whole-image boxes through
the server app (``--max-mask-pixels`` default): refused with 413, or killed before.

    python benchmarks/memory.py --before /work/main       # both checkouts, all cases
    python benchmarks/memory.py --quick                   # this checkout, 1 and 32 boxes

Model: a random-weight MobileNetV2-FPN CondInst (the test suite's tiny heads) with the
default test-time size (shorter side 800, longer at most 1333): the masks come from the
stride-4 map of a 1000x1333 input, as with a trained model. Boxes: seeded, sides 200 to 1200
px. Writes ``benchmarks/results/memory.json`` and ``.md``. Not a test.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIZE = (6000, 8000)  # (H, W)


# --------------------------------------------------------------------------- the child
def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_case(ckpt: str, image_path: str, boxes_path: str, mode: str) -> dict[str, Any]:
    """One request in this process (``mode``: ``library`` or ``server``)."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from serving import Segmenter, load_image

    seg = Segmenter.from_checkpoint(ckpt, device="cpu")
    data = Path(image_path).read_bytes()
    boxes = json.loads(Path(boxes_path).read_text())
    seg.predict(np.full((600, 800, 3), 127, np.uint8), boxes=[[100, 100, 300, 300]])  # warm
    base = _rss_mb()
    t0 = time.perf_counter()
    if mode == "server":
        from fastapi.testclient import TestClient

        from serving.server.app import create_app
        from serving.server.requests import ServerSettings

        with TestClient(create_app(seg, ServerSettings(max_body_mb=50, warmup=False))) as c:
            r = c.post("/v1/segment", files={"image": ("a.png", data, "image/png")},
                       data={"boxes": json.dumps(boxes)})
        out = {"status": r.status_code, "instances": len(r.json().get("instances", [])),
               "message": r.json().get("error", {}).get("message")}
    else:
        pred = seg.predict(load_image(data), boxes=boxes)
        results = pred.to_coco(0)
        areas = pred.areas
        text = json.dumps([{**r, "area": int(a)} for r, a in zip(results, areas)])
        out = {"status": 200, "instances": len(pred), "json_bytes": len(text),
               "mask_pixels": int(areas.sum())}
    import serving

    out.update(seconds=round(time.perf_counter() - t0, 2), rss_before_mb=round(base),
               serving=str(Path(serving.__file__).parent.parent))
    return out


# --------------------------------------------------------------------------- the parent
def tiny_checkpoint(path: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    import torch

    from serving import InferenceConfig, ModelConfig, build_condinst
    from serving.model.model_file import new_card, save_checkpoint

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="mobilenet_v2", num_classes=3, fpn_channels=32, head_convs=1,
                      mask_branch_channels=16, mask_branch_convs=1)
    save_checkpoint(path, build_condinst(cfg).eval(),
                    new_card(cfg, ["disc", "ring", "triangle"], InferenceConfig()))
    return path


def make_inputs(work: Path, counts: list[int]) -> tuple[Path, dict[str, Path]]:
    """An 8000x6000 PNG (flat colours, small file) and the box lists of every case."""
    from PIL import Image

    rng = np.random.default_rng(0)
    h, w = SIZE
    img = np.full((h, w, 3), 90, np.uint8)
    for _ in range(60):
        y, x = int(rng.integers(0, h - 800)), int(rng.integers(0, w - 800))
        img[y:y + int(rng.integers(100, 800)), x:x + int(rng.integers(100, 800))] = \
            rng.integers(0, 256, 3)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    image = work / "image.png"
    image.write_bytes(buf.getvalue())
    boxes = {}
    for n in counts:
        sides = rng.uniform(200, 1200, (n, 2))
        x1, y1 = rng.uniform(0, w - sides[:, 0]), rng.uniform(0, h - sides[:, 1])
        b = np.stack([x1, y1, x1 + sides[:, 0], y1 + sides[:, 1]], 1).round(1)
        boxes[str(n)] = work / f"boxes_{n}.json"
        boxes[str(n)].write_text(json.dumps(b.tolist()))
    boxes["whole"] = work / "boxes_whole.json"
    boxes["whole"].write_text(json.dumps([[0, 0, w, h]] * 256))
    return image, boxes


def run_child(code_root: str, args: list[str], cap_gb: float) -> dict[str, Any]:
    """Run this file's child mode with ``code_root`` first on the path; peak RSS, kills."""
    env = {**os.environ, "PYTHONPATH": code_root, "OMP_NUM_THREADS": os.environ.get(
        "OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen([sys.executable, __file__, "--child", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = threading.Event()

    def watch() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                rss = next(int(line.split()[1]) for line in status.read_text().splitlines()
                           if line.startswith("VmRSS:"))
            except (OSError, StopIteration):
                return
            if rss > cap_gb * 2**20:
                killed.set()
                proc.kill()
                return
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()
    t0 = time.perf_counter()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = proc.communicate()
    row: dict[str, Any] = {"peak_rss_mb": round(usage.ru_maxrss / 1024),
                           "wall_s": round(time.perf_counter() - t0, 1)}
    if killed.is_set():
        row["outcome"] = f"killed above {cap_gb:g} GB"
    elif proc.returncode != 0:
        row["outcome"] = "failed: " + (err.strip().splitlines() or ["?"])[-1][:200]
    else:
        row.update(json.loads(out.strip().splitlines()[-1]))
        row["outcome"] = "ok" if row["status"] == 200 else f"refused {row['status']}"
    return row


def report(result: dict[str, Any]) -> str:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import machine_markdown, markdown_table

    rows = [[r["code"], r["path"], r["boxes"], r["outcome"], r["peak_rss_mb"],
             r.get("rss_before_mb"), r.get("seconds"), r.get("mask_pixels")]
            for r in result["rows"]]
    return "\n".join([
        "# Peak memory of one request: prompt boxes on an 8000x6000 image", "",
        f"Command: `{result['command']}`", "", machine_markdown(result["machine"]), "",
        "One fresh process per row. `peak RSS` is the whole process (Python, torch and the "
        "model are most of `RSS before`, measured after a warm-up request); `s` is the "
        "request alone (decode, predict, JSON). `mask px` is the pixels of all masks. The "
        "machine was shared with other jobs: times are indicative, memory is not affected.",
        "", markdown_table(["code", "path", "boxes", "outcome", "peak RSS MB",
                            "RSS before MB", "s", "mask px"], rows), "",
        "`killed` rows passed the watchdog's cap (the code at `main` builds a boxes x H x W "
        "boolean array, 12.3 GB for 256 boxes, plus float and uint8 copies of it). After the "
        "change the peak no longer depends on the boxes: it is set by decoding the 8000x6000 "
        "PNG (about 730 MB of transient copies in `load_image`) and the fixed 1.1 GB of the "
        "process; the masks themselves take a byte per mask pixel (100 MB for 256 boxes). The "
        "last row goes through the server app with its default `--max-mask-pixels`.", ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", help="checkout to compare with (e.g. /work/main)")
    p.add_argument("--quick", action="store_true", help="1 and 32 boxes only")
    p.add_argument("--cap-gb", type=float, default=7.0, help="kill a case above this RSS")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_case(*args.child)))
        return 0
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import machine_info, write_results

    counts = [1, 32] if args.quick else [1, 32, 256]
    work = Path(tempfile.mkdtemp(prefix="memory_bench_"))
    ckpt = tiny_checkpoint(work / "tiny.safetensors")
    image, boxes = make_inputs(work, counts)
    codes = [("before", args.before)] if args.before else []
    codes.append(("after", str(ROOT)))
    rows = []
    cases = [("library", str(n)) for n in counts] + ([] if args.quick else [("server", "whole")])
    for path, key in cases:
        for code, root in codes:
            row = run_child(root, [str(ckpt), str(image), str(boxes[key]), path], args.cap_gb)
            row.update(code=code, path=path, boxes="256 whole-image" if key == "whole" else key)
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
    result = {"command": "python benchmarks/memory.py " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              "machine": machine_info(), "image": f"{SIZE[1]}x{SIZE[0]} PNG, "
              f"{image.stat().st_size} bytes", "model": "random-weight MobileNetV2-FPN, "
              "min_size 800, max_size 1333", "rows": rows}
    write_results(Path(args.out), "memory_quick" if args.quick else "memory", result,
                  report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
