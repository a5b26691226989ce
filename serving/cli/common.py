"""Building blocks shared by ``sim predict`` and ``sim label``.

Exit codes and shared options, checking that outputs are writable before any work, finding
images, prefetching image decoding in threads and running a batch with per-image failure
isolation. The pipeline built from them is :mod:`serving.cli.jobs`; resuming and
multi-process runs are :mod:`serving.sharding`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from ..backends.locate import locate_model
from ..errors import InputError, SimError
from ..inference.images import IMAGE_EXTENSIONS
from ..isolation import run_isolated
from ..model_config import MAX_INPUT_SIDE
from ..prediction import Prediction
from ..prompts import ALL, Prompt, ScoreThreshold
from ..segmenter import Segmenter

#: Exit codes of the batch commands: done, error before work, some inputs failed, Ctrl-C.
EXIT_OK, EXIT_ERROR, EXIT_PARTIAL, EXIT_INTERRUPTED = 0, 1, 3, 130
T = TypeVar("T")


def run_exit_code(interrupted: bool, *problems: object) -> int:
    """Exit code of a batch run: Ctrl-C wins, then any failed or rejected input (truthy
    ``problems``: lists or counts) makes it partial, else OK."""
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_PARTIAL if any(problems) else EXIT_OK


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options ``predict`` and ``label`` share: batching, device, decoding, resuming."""
    parser.add_argument("--batch-size", type=int, default=4, metavar="N")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="PyTorch checkpoints: bf16 (CPUs with AVX512_BF16/AMX, GPUs) or "
                             "fp16 (GPUs) autocast for the network (default fp32)")
    parser.add_argument("--workers", type=int, default=2, metavar="N",
                        help="image-decoding threads (0: decode in the main thread)")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo every image instead of resuming")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_image_size_option(parser)
    add_box_scale_option(parser)
    parser.add_argument("--processes", type=int, default=1, metavar="N",
                        help="split the images between N processes (accelerate launch; one "
                             "per GPU, or several on a CPU); same outputs as one process")


def add_image_size_option(parser: argparse.ArgumentParser) -> None:
    """``--image-size SHORT [LONG]``: the inference resize, instead of the model's own."""
    parser.add_argument(
        "--image-size", type=int, nargs="+", default=None, metavar=("SHORT", "LONG"),
        help="resize the shorter side to SHORT (longer side at most LONG, default SHORT x the "
             "model's ratio) instead of the model's size; for objects smaller or larger than "
             f"in training (see 'sim info'); 32 <= SHORT <= LONG <= {MAX_INPUT_SIDE}")


def add_box_scale_option(parser: argparse.ArgumentParser) -> None:
    """``--box-scale on|off``: each prompt box at its own scale (default), or the whole image
    once at the model's size (or ``--image-size``) for every box."""
    parser.add_argument(
        "--box-scale", choices=["on", "off"], default="on",
        help="box prompts: segment each box in its own crop at the scale the model handles "
             "best (on, default), or the whole image once for all boxes (off; what "
             "--image-size also does)")


def load_model(path: str | os.PathLike, device: str, image_size: Sequence[int] | None = None,
               dtype: str = "fp32", box_scale: bool = True) -> Segmenter:
    """``Segmenter.load`` with the batch commands' ``--device``, ``--image-size``,
    ``--dtype`` and ``--box-scale``."""
    seg = Segmenter.load(path, device=device, image_size=image_size or None, dtype=dtype)
    return seg if box_scale else seg.with_box_scale(False)


def one_line(exc: BaseException) -> str:
    """A one-line reason for ``exc`` (our errors already are; others get their type name)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, SimError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def report(line: str) -> None:
    """Print ``line`` to stderr without breaking a tqdm progress bar."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)


# ----------------------------------------------------------------------------- paths
def check_model_path(path: str | os.PathLike) -> Path:
    """The model file ``path`` names (a folder: its model), before any work
    (:func:`serving.backends.locate.locate_model`)."""
    return locate_model(path).path


@dataclass(frozen=True)
class ImageFile:
    """One input image: ``path`` on disk, ``rel`` (its path below the input folder or glob
    base, POSIX style, used to match COCO ``file_name``) and ``name`` (``rel`` without the
    extension, made unique; names the output pictures)."""

    path: Path
    rel: str
    name: str


def _glob_base(pattern: str) -> Path:
    parts = Path(pattern).parts
    keep = [p for p in parts[: next((i for i, p in enumerate(parts)
                                     if any(c in p for c in "*?[")), len(parts))]]
    return Path(*keep) if keep else Path(".")


def _candidates(spec: str) -> list[tuple[Path, str]] | None:
    """(file, path below the folder or glob base) for a folder or glob ``spec``; ``None``
    for a single file; :class:`InputError` when it matches nothing that exists."""
    import glob

    path = Path(spec)
    if path.is_dir():
        return [(f, f.relative_to(path).as_posix()) for f in path.rglob("*")]
    if path.is_file():
        return None
    if not any(c in spec for c in "*?["):
        raise InputError(f"input {spec}: no such file or folder; check the path")
    base = _glob_base(spec)
    pairs = []
    for match in glob.glob(spec, recursive=True):
        f = Path(match)
        try:
            rel = f.relative_to(base).as_posix()
        except ValueError:
            rel = f.name
        pairs.append((f, rel))
    return pairs


def _output_names(ordered: list[tuple[Path, str]]) -> list[ImageFile]:
    """Unique picture names: ``rel`` without its extension, the extension appended where two
    files share a stem (``a.jpg`` / ``a.png``), a counter where even that collides."""
    stems = [Path(rel).with_suffix("").as_posix() for _, rel in ordered]
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem] = counts.get(stem, 0) + 1
    files, used = [], set()
    for (path, rel), stem in zip(ordered, stems, strict=True):
        name = stem if counts[stem] == 1 else stem + "_" + Path(rel).suffix.lstrip(".")
        base, k = name, 1
        while name in used:  # a.JPG next to a.jpg
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        files.append(ImageFile(path, rel, name))
    return files


def find_images(inputs: Sequence[str], exclude: Path | None = None) -> list[ImageFile]:
    """Resolve folders (recursive), glob patterns and files into a sorted list of images.

    Folders and globs keep files whose extension is in ``IMAGE_EXTENSIONS`` (any case); a file
    named explicitly is kept whatever its extension. Files under ``exclude`` (the output
    folder) are skipped. Raises :class:`InputError` for a missing path or when nothing matches.
    """
    found: dict[Path, str] = {}
    skip = exclude.resolve() if exclude is not None else None
    for spec in inputs:
        pairs = _candidates(spec)
        if pairs is None:
            found.setdefault(Path(spec).resolve(), Path(spec).name)
            continue
        for f, rel in pairs:
            if not f.is_file() or f.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            resolved = f.resolve()
            if skip is None or not resolved.is_relative_to(skip):
                found.setdefault(resolved, rel)
    if not found:
        raise InputError(
            f"input {' '.join(inputs)}: no images found (looked for "
            f"{', '.join(IMAGE_EXTENSIONS)}); check the folder or pattern"
        )
    return _output_names(sorted(found.items(), key=lambda item: str(item[0])))


# ----------------------------------------------------------------------------- running
def prefetch(items: Iterable[T], load: Callable[[T], np.ndarray], workers: int, depth: int,
             ) -> Iterator[tuple[T, np.ndarray | None, BaseException | None]]:
    """Decode images ahead in a thread pool, yielding ``(item, image, None)`` or
    ``(item, None, error)`` in input order. At most ``depth`` decodes are in flight or
    waiting (a bounded queue); ``workers=0`` decodes in the calling thread."""
    if workers <= 0:
        for item in items:
            try:
                yield item, load(item), None
            except Exception as exc:  # noqa: BLE001 - reported per image by the caller
                yield item, None, exc
        return
    source = iter(items)
    done = object()
    pending: deque[tuple[T, Future[np.ndarray]]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        try:
            while True:
                while len(pending) < max(depth, 1):
                    nxt = next(source, done)
                    if nxt is done:
                        break
                    pending.append((nxt, pool.submit(load, nxt)))  # type: ignore[arg-type]
                if not pending:
                    return
                item, future = pending.popleft()
                try:
                    image, error = future.result(), None
                except Exception as exc:  # noqa: BLE001
                    image, error = None, exc
                yield item, image, error
        finally:
            for _, future in pending:
                future.cancel()


def run_batch(seg: Segmenter, images: Sequence[np.ndarray], prompts: Sequence[Prompt | None],
              batch_size: int, score_threshold: ScoreThreshold = ALL,
              ) -> list[Prediction | Exception]:
    """Predict a batch; an image that makes the batch fail is isolated and returned as its
    exception while the others succeed (:func:`serving.isolation.run_isolated`).

    Args:
        images: (H, W, 3) uint8 RGB arrays.
        prompts: per image ``None`` (automatic mode) or its :class:`Prompt` from
            ``seg.check_prompt`` (any number of boxes: the Segmenter runs them in passes).
        score_threshold: automatic mode (see ``Segmenter.predict``).
    """
    def run(pairs: list[tuple[np.ndarray, Prompt | None]]) -> list[Prediction]:
        prompted = any(p is not None for _, p in pairs)
        return seg.predict_batch([image for image, _ in pairs],
                                 boxes=[p for _, p in pairs] if prompted else None,
                                 batch_size=batch_size, score_threshold=score_threshold)

    return run_isolated(run, list(zip(images, prompts, strict=True)))
