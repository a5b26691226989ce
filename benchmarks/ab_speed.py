"""A/B inference speed: the ``serving`` package of a git ref against the working tree, side by side.

The ``serving/`` folder of ``--ref`` is extracted with ``git archive`` into a temporary folder and
imported under another name (``serving_ref``; the package uses relative imports only), so both
versions run in one process on the same checkpoint, images and threads. Each round calls every
(version, case) once, the order reversed every other round (A B B A ...: whatever favours the
first or the second call of a round cancels out); the figure is the median over rounds and the
ratio is ``working tree / ref`` (below 1: faster now).

Cases (torch eager, fp32, ``Segmenter.predict_batch`` on in-memory arrays, as ``speed.py``):

- ``auto``: automatic mode on ``speed.py``'s image at the model's default size, ``batch``
  copies in one call (``speed.py``'s ``torch/fp32/auto`` rows);
- ``mixed``: automatic mode on ``batch`` images alternating landscape and portrait (the image
  and its transpose): the working tree runs each orientation on its own canvas, older code
  padded all of them to one square canvas.

    python benchmarks/ab_speed.py --ref main --models mobilenet_v2_fpn --batches 1 8
    python benchmarks/ab_speed.py --ref main --models r50_fpn --batches 1 --rounds 3

Writes ``benchmarks/results/<--name>.json`` and ``.md`` (default ``ab_speed``).
"""

from __future__ import annotations

import argparse
import importlib
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    machine_info,
    machine_markdown,
    markdown_table,
    summarize,
    write_results,
)
from benchmarks.speed import MODELS, bench_image, build_checkpoint  # noqa: E402

REF_PACKAGE = "serving_ref"


def _extract(ref: str, paths: list[str], dest: Path) -> Path:
    """``paths`` of git ``ref`` written under ``dest`` (``git archive``)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, *paths],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def import_ref(ref: str, work: Path) -> Any:
    """``serving`` of git ``ref`` as the module ``serving_ref`` (and its commit hash)."""
    _extract(ref, ["serving"], work)
    (work / "serving").rename(work / REF_PACKAGE)
    sys.path.insert(0, str(work))
    return importlib.import_module(REF_PACKAGE)


def export_with(code: Path, ckpt: Path, out: Path, calibration: Path, count: int) -> Path:
    """Export ``ckpt`` to ONNX fp32 + INT8 with the ``export`` package under ``code``; returns
    the output folder (``<stem>.json`` and ``<stem>.int8.json`` inside)."""
    subprocess.run([sys.executable, "-m", "export", "--model", str(ckpt.resolve()), "--output",
                    str(out.resolve()), "--int8", "--calibration", str(calibration.resolve()),
                    "--calibration-count", str(count)], cwd=code, check=True, capture_output=True)
    return out


def revision_code(ref: str, work: Path) -> Path:
    """``serving`` and ``export`` of git ``ref`` under ``work/code``: run ``python -m export``
    there (:func:`export_with`) for the revision's graphs."""
    return _extract(ref, ["serving", "export"], work / "code")


def commit_of(ref: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", ref], check=True,
                          capture_output=True, text=True).stdout.strip()


def alternating_times(calls: dict[str, Callable[[], Any]], rounds: int, warmup: int,
                      on_result: Callable[[str, Any], None]) -> dict[str, list[float]]:
    """Wall-clock seconds of each call per round, the order reversed every other round."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(warmup + rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            result = calls[name]()
            elapsed = time.perf_counter() - start
            on_result(name, result)
            if r >= warmup:
                times[name].append(elapsed)
    return times


def cases(image: np.ndarray, mixed: np.ndarray, batch: int) -> dict[str, list[np.ndarray]]:
    """Image lists per case: ``auto`` (copies of ``image``) and ``mixed`` (``mixed`` and its
    transpose alternating; only for a non-square ``mixed`` and a batch above 1)."""
    out = {"auto": [image] * batch}
    if mixed.shape[0] != mixed.shape[1] and batch > 1:
        turned = np.ascontiguousarray(mixed.transpose(1, 0, 2))
        out["mixed"] = [mixed if i % 2 == 0 else turned for i in range(batch)]
    return out


def bench(name: str, args: argparse.Namespace, ref_module: Any, work: Path) -> list[dict]:
    import serving

    _, size, _, _ = MODELS[name]
    checkpoint, _ = build_checkpoint(name, work, args.seed)
    image = bench_image(size, args.seed)
    mixed = bench_image(tuple(args.mixed_size), args.seed) if args.mixed_size else image
    versions = {"ref": ref_module.Segmenter.from_checkpoint(checkpoint, device="cpu"),
                "now": serving.Segmenter.from_checkpoint(checkpoint, device="cpu")}
    rows = []
    for batch in args.batches:
        calls = {}
        for case, images in cases(image, mixed, batch).items():
            for version, seg in versions.items():
                calls[f"{case}/{version}"] = (lambda s=seg, im=images, b=batch:
                                              s.predict_batch(im, batch_size=b))
        calls_input = {"auto": image.shape[1::-1], "mixed": mixed.shape[1::-1]}
        counts: dict[str, int] = {}

        def record(key: str, preds: list, store: dict[str, int] = counts) -> None:
            store[key] = sum(len(p) for p in preds)

        print(f"{name} batch {batch}: {list(calls)} x {args.rounds} rounds", file=sys.stderr)
        times = alternating_times(calls, args.rounds, args.warmup, record)
        for case in dict.fromkeys(k.split("/")[0] for k in calls):
            ref_t, now_t = times[f"{case}/ref"], times[f"{case}/now"]
            rows.append({
                "model": name, "input": "x".join(map(str, calls_input[case])), "batch": batch,
                "case": case, "ref": summarize(ref_t), "now": summarize(now_t),
                "ratio_of_medians": statistics.median(now_t) / statistics.median(ref_t),
                "median_of_round_ratios": statistics.median(n / r for n, r in zip(now_t, ref_t)),
                "instances_ref": counts[f"{case}/ref"], "instances_now": counts[f"{case}/now"],
            })
    return rows


def report(result: dict[str, Any]) -> str:
    rows = [[r["model"], r["input"], r["batch"], r["case"], r["ref"]["median_ms"],
             r["now"]["median_ms"], r["ratio_of_medians"], r["median_of_round_ratios"],
             f"{r['instances_ref']} / {r['instances_now']}"] for r in result["rows"]]
    return "\n".join([
        f"# A/B inference speed: working tree vs `{result['ref']}` ({result['ref_commit'][:10]})",
        "", f"Command: `{result['command']}`", "", machine_markdown(result["machine"]), "",
        "torch eager fp32 on the CPU, `Segmenter.predict_batch` end to end on in-memory "
        f"arrays; both versions interleaved in one process (the order reversed every other "
        f"round), {result['rounds']} rounds after {result['warmup']} warm-up round(s), "
        "medians. The machine was shared with other "
        "jobs: absolute times are noisy, the ratios (now / ref; below 1 = faster now) are the "
        "result. `auto`: the same image `batch` times; `mixed`: landscape and portrait "
        "alternating (the working tree runs each orientation on its own canvas).", "",
        markdown_table(["model", "input", "batch", "case", "ref ms", "now ms", "now/ref",
                        "median of per-round ratios", "instances ref / now"], rows), ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", default="main", help="git ref of the old version (default main)")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=["mobilenet_v2_fpn"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--mixed-size", nargs=2, type=int, metavar=("H", "W"), default=None,
                   help="image of the 'mixed' case (default: the model's; must be non-square)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="ab_speed", help="results file stem")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="ab_speed_"))
    ref_module = import_ref(args.ref, work / "ref")
    rows = []
    for name in args.models:
        rows += bench(name, args, ref_module, work)
    result = {"command": "python benchmarks/ab_speed.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), "ref": args.ref,
        "ref_commit": commit_of(args.ref), "machine": machine_info(torch.device("cpu")),
        "threads": args.threads, "rounds": args.rounds, "warmup": args.warmup, "rows": rows}
    write_results(ROOT / "benchmarks" / "results", args.name, result, report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
