"""Helpers shared by the speed benchmarks: machine description, interleaved timing, tables.

Speed on a shared machine is noisy, so every benchmark here times its variants **side by side in
one process**: round r runs variant A, then B, then C, ... once each, and the reported figure of
each variant is the median over rounds. Load that comes and goes hits every variant alike, so
the ratios between variants stay meaningful even when the absolute times do not.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    """CPU model, cores, its int8 instructions, threads in use, load, Python/torch versions and
    the GPU (if any)."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        from serving.backends.torch_backend import cpu_int8_vnni
        info["cpu_int8"] = "VNNI" if cpu_int8_vnni() else "no VNNI"
    except ImportError:  # an older checkout's serving (benchmarks that time other code)
        pass
    if hasattr(os, "getloadavg"):
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    if torch.cuda.is_available():
        index = device.index if device is not None and device.type == "cuda" and \
            device.index is not None else 0
        props = torch.cuda.get_device_properties(index)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    for name in ("onnxruntime", "tensorrt", "torchvision"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except Exception:  # noqa: BLE001 - optional packages, any import failure means absent
            info[name] = None
    return info


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued GPU work so a wall-clock timer covers it (no-op on the CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(torch.device(device))


def interleaved_times(variants: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1,
                      device: torch.device | str | None = None,
                      on_result: Callable[[str, Any], None] | None = None,
                      ) -> dict[str, list[float]]:
    """Time every variant once per round, in the same order each round (A B C A B C ...).

    Args:
        variants: name -> zero-argument callable doing one unit of work.
        rounds: timed rounds; warmup: untimed rounds first (compilation, caches, allocators).
        device: synchronised before and after each call when it is a CUDA device.
        on_result: called with (name, return value) after every call, warm-up included.

    Returns:
        name -> list of ``rounds`` wall-clock seconds.
    """
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(warmup + rounds):
        for name, fn in variants.items():
            synchronize(device)
            start = time.perf_counter()
            result = fn()
            synchronize(device)
            elapsed = time.perf_counter() - start
            if on_result is not None:
                on_result(name, result)
            if r >= warmup:
                times[name].append(elapsed)
    return times


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    """Median, min and max of a list of durations, in milliseconds."""
    ms = [s * 1000.0 for s in seconds]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms),
            "rounds": len(ms)}


def bootstrap_interval(samples: Sequence[Sequence[float]], statistic: Callable[..., float],
                       level: float = 0.95, resamples: int = 1000,
                       seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap interval of ``statistic(*samples)``: the samples (equal
    lengths, the i-th values of all of them kept together) resampled with replacement
    ``resamples`` times with a fixed seed (``scipy.stats.bootstrap``; scipy comes with the dev
    install). How far the figure could move on another sample like this one."""
    from scipy.stats import bootstrap

    found = bootstrap(tuple(np.asarray(x, np.float64) for x in samples), statistic,
                      paired=True, vectorized=False, n_resamples=resamples,
                      confidence_level=level, method="percentile",
                      rng=np.random.default_rng(seed))
    low, high = found.confidence_interval
    return float(low), float(high)


def interval_text(pair: Sequence[float] | None) -> str | None:
    """A :func:`bootstrap_interval` for a table, ``"low-high"`` with 2 decimals (``None``
    stays ``None``: a dash in :func:`markdown_table`)."""
    return None if pair is None else f"{pair[0]:.2f}-{pair[1]:.2f}"


def identical_predictions(a: Any, b: Any) -> bool:
    """Whether two ``Prediction``s hold the same boxes, scores, labels and masks, bit for bit
    (a different number of instances differs)."""
    return (np.array_equal(a.boxes, b.boxes) and np.array_equal(a.scores, b.scores)
            and np.array_equal(a.labels, b.labels) and np.array_equal(a.masks, b.masks))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; floats get 3 significant digits, ``None`` becomes a dash."""
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_markdown(info: dict[str, Any]) -> str:
    """One paragraph describing the machine (for the top of a results file)."""
    parts = [f"CPU: {info['cpu']} ({info['cpu_cores']} cores visible, "
             f"{info['torch_threads']} torch threads"]
    if "load_average_1m" in info:
        parts[0] += f", load average {info['load_average_1m']} at start"
    if "cpu_int8" in info:
        parts[0] += f", int8 instructions: {info['cpu_int8']}"
    parts[0] += ")"
    parts.append(f"GPU: {info['gpu']} ({info['gpu_memory_gib']} GiB, CUDA {info['cuda']})"
                 if info.get("gpu") else "GPU: none")
    parts.append(f"torch {info['torch']}, torchvision {info.get('torchvision')}, "
                 f"onnxruntime {info.get('onnxruntime')}, tensorrt {info.get('tensorrt')}, "
                 f"Python {info['python']}, {info['platform']}")
    return "\n".join(f"- {p}" for p in parts)


def coco_rle(mask: Any) -> dict[str, Any]:
    """(H, W) bool numpy mask -> COCO compressed RLE with a str ``counts`` (JSON-ready)."""
    from pycocotools import mask as mask_util

    enc = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(enc["size"]), "counts": enc["counts"].decode("ascii")}


def write_results(out: Path, name: str, payload: dict[str, Any], text: str) -> None:
    """Write ``<out>/<name>.json`` (the payload) and ``<out>/<name>.md`` (``text``), and print
    the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    (out / f"{name}.md").write_text(text + "\n", encoding="utf-8")
    print(text)
