"""Building blocks shared by ``python -m serving predict`` and ``python -m serving label``.

Finding images, checking that outputs are writable before any work, reading COCO box files,
prefetching image decoding in threads, running a batch with per-image failure isolation, and
the append-only progress log that lets an interrupted run resume.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .checkpoint import atomic_write
from .errors import BoxError, DatasetError, ImageError, InputError, SimError
from .images import IMAGE_EXTENSIONS
from .prediction import Prediction
from .segmenter import Segmenter, validate_boxes

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
    parser.add_argument("--workers", type=int, default=2, metavar="N",
                        help="image-decoding threads (0: decode in the main thread)")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo every image instead of resuming")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")

#: A prompt for one image: (boxes (M, 4) float32 XYXY original pixels, labels (M,) int64).
Prompt = tuple[np.ndarray, np.ndarray]


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
def check_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and prove a file can be written in it (before any work)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out}: exists and is not a folder; choose a folder path")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(
            f"output {out}: not writable ({exc.strerror or exc}); choose a folder you can write to"
        ) from None
    return out


def check_writable_file(path: str | os.PathLike) -> Path:
    """Check that ``path`` can be (re)written: not a folder, and its folder is writable."""
    out = Path(path)
    if out.is_dir():
        raise InputError(f"output {out}: is a folder; give a file name such as labels.json")
    try:
        check_writable_dir(out.parent)
    except InputError:
        raise InputError(
            f"output {out}: its folder is not writable; choose a path you can write to"
        ) from None
    return out


def check_model_path(path: str | os.PathLike) -> Path:
    model = Path(path)
    if not model.is_file():
        raise InputError(f"model {model}: file not found; pass a .safetensors, .onnx or .engine")
    return model


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


def find_images(inputs: Sequence[str], exclude: Path | None = None) -> list[ImageFile]:
    """Resolve folders (recursive), glob patterns and files into a sorted list of images.

    Folders and globs keep files whose extension is in ``IMAGE_EXTENSIONS`` (any case); a file
    named explicitly is kept whatever its extension. Files under ``exclude`` (the output
    folder) are skipped. Raises :class:`InputError` for a missing path or when nothing matches.
    """
    import glob

    found: dict[Path, str] = {}
    skip = exclude.resolve() if exclude is not None else None
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            pairs = [(f, f.relative_to(path).as_posix()) for f in path.rglob("*")]
        elif path.is_file():
            found.setdefault(path.resolve(), path.name)
            continue
        elif any(c in spec for c in "*?["):
            base = _glob_base(spec)
            pairs = []
            for match in glob.glob(spec, recursive=True):
                f = Path(match)
                try:
                    rel = f.relative_to(base).as_posix()
                except ValueError:
                    rel = f.name
                pairs.append((f, rel))
        else:
            raise InputError(f"input {spec}: no such file or folder; check the path")
        for f, rel in pairs:
            if not f.is_file() or f.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            resolved = f.resolve()
            if skip is not None and resolved.is_relative_to(skip):
                continue
            found.setdefault(resolved, rel)
    if not found:
        raise InputError(
            f"input {' '.join(inputs)}: no images found (looked for "
            f"{', '.join(IMAGE_EXTENSIONS)}); check the folder or pattern"
        )
    ordered = sorted(found.items(), key=lambda item: str(item[0]))
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


# ----------------------------------------------------------------------------- COCO boxes
def read_coco_json(path: str | os.PathLike, what: str = "annotations") -> dict[str, Any]:
    """Read a COCO detection JSON and check its structure (not its boxes).

    Needs ``images`` (each with ``id`` and ``file_name``), and optionally ``annotations``
    (each with ``id`` and ``image_id``) and ``categories`` (each with ``id`` and ``name``).
    Raises :class:`DatasetError` with a one-line message naming the problem.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{what} {p}: file not found; check the path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{what} {p}: not valid JSON ({exc}); fix or re-export it") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{what} {p}: not a COCO JSON (needs an 'images' list)")
    data.setdefault("annotations", [])
    data.setdefault("categories", [])
    for key, fields in (("images", ("id", "file_name")), ("annotations", ("id", "image_id")),
                        ("categories", ("id", "name"))):
        if not isinstance(data[key], list):
            raise DatasetError(f"{what} {p}: '{key}' must be a list")
        for i, entry in enumerate(data[key]):
            missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            if missing:
                raise DatasetError(
                    f"{what} {p}: {key}[{i}] lacks '{missing[0]}'; every entry needs "
                    f"{' and '.join(fields)}"
                )
    ids = [img["id"] for img in data["images"]]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise DatasetError(f"{what} {p}: image ids must be integers (COCO convention)")
    ann_ids = [ann["id"] for ann in data["annotations"]]
    if len(set(ann_ids)) != len(ann_ids):
        raise DatasetError(f"{what} {p}: duplicate annotation ids; give each a unique id")
    if len(set(ids)) != len(ids):
        raise DatasetError(f"{what} {p}: duplicate image ids; give each image a unique id")
    return data


def coco_box(ann: dict[str, Any], image_size: tuple[int, int]) -> np.ndarray:
    """The annotation's COCO ``bbox`` [x, y, w, h] as a checked, clipped XYXY box.

    Returns (4,) float32 XYXY in original pixels. Raises :class:`BoxError` naming the
    annotation id for a missing/non-numeric bbox, NaN, reversed or zero-area, or outside.
    """
    bbox = ann.get("bbox")
    try:
        x, y, w, h = (float(v) for v in bbox)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise BoxError(
            f"annotation {ann.get('id')}: bbox {bbox!r} is not [x, y, width, height]"
        ) from None
    where = f"annotation {ann.get('id')}: bbox [{x:g}, {y:g}, {w:g}, {h:g}]"
    if not np.isfinite([x, y, w, h]).all():
        raise BoxError(f"{where} contains NaN or inf; give finite pixel values")
    if w <= 0 or h <= 0:
        raise BoxError(f"{where} has zero or negative width/height (reversed or empty box); "
                       "COCO boxes are [x, y, width, height] with width and height > 0")
    try:
        return validate_boxes([[x, y, x + w, y + h]], image_size, 1)[0]
    except BoxError as exc:  # outside the image (the checks above catch everything else)
        reason = str(exc).removeprefix("box 0: ")
        raise BoxError(f"{where} {reason}") from None


def check_image_size(entry: dict[str, Any], image: np.ndarray, name: str) -> None:
    """Raise :class:`ImageError` when a COCO image entry's ``height``/``width`` disagree with
    the decoded (EXIF-rotated) image, whose frame the boxes must be in."""
    h, w = entry.get("height"), entry.get("width")
    if h is not None and w is not None and tuple(image.shape[:2]) != (h, w):
        raise ImageError(
            f"image {name}: decoded size {image.shape[1]}x{image.shape[0]} differs from the "
            f"JSON's {w}x{h}; fix the JSON's width/height (EXIF rotation is applied when "
            "decoding)")


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


def _merge(parts: list[Prediction]) -> Prediction:
    if len(parts) == 1:
        return parts[0]
    return Prediction(np.concatenate([p.boxes for p in parts]),
                      np.concatenate([p.scores for p in parts]),
                      np.concatenate([p.labels for p in parts]),
                      np.concatenate([p.masks for p in parts]), parts[0].class_names)


def run_batch(seg: Segmenter, images: Sequence[np.ndarray], prompts: Sequence[Prompt | None],
              batch_size: int, score_threshold: float | None = None,
              ) -> list[Prediction | Exception]:
    """Predict a batch; an image that makes the batch fail is isolated and returned as its
    exception while the others succeed.

    Args:
        images: (H, W, 3) uint8 RGB arrays.
        prompts: per image ``None`` (automatic mode) or ``(boxes, labels)`` already checked
            with :func:`coco_box` / ``validate_boxes``. More boxes than the model's
            ``max_prompt_boxes`` are run in several passes and merged, in order.
    """
    limit = max(int(seg.cfg.max_prompt_boxes), 1)
    arrays, boxes, labels, owner = [], [], [], []
    for i, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        if prompt is None:
            arrays.append(image)
            boxes.append(None)
            labels.append(None)
            owner.append(i)
            continue
        starts = range(0, len(prompt[0]), limit) if len(prompt[0]) else [0]
        for s in starts:
            arrays.append(image)
            boxes.append(prompt[0][s:s + limit])
            labels.append(prompt[1][s:s + limit])
            owner.append(i)
    try:
        any_prompt = any(b is not None for b in boxes)
        preds = seg.predict_batch(arrays, boxes=boxes if any_prompt else None,
                                  labels=labels if any_prompt else None,
                                  batch_size=batch_size, score_threshold=score_threshold)
    except Exception as exc:  # noqa: BLE001 - isolate the image that failed
        if len(images) == 1:
            return [exc]
        return [run_batch(seg, [im], [p], batch_size, score_threshold)[0]
                for im, p in zip(images, prompts, strict=True)]
    grouped: list[list[Prediction]] = [[] for _ in images]
    for i, pred in zip(owner, preds, strict=True):
        grouped[i].append(pred)
    return [_merge(parts) for parts in grouped]


# ----------------------------------------------------------------------------- state
class ProgressLog:
    """Append-only JSON-lines record of finished work, so a rerun skips it.

    The first line holds ``{"signature": ...}`` (what produced the records: model, inputs,
    settings); each further line is one finished item ``{"key": ..., ...}``, appended with
    flush + fsync. A line cut short by a crash is dropped when the log is read back.
    """

    def __init__(self, path: str | os.PathLike, signature: dict[str, Any]) -> None:
        self.path = Path(path)
        self.signature = json.loads(json.dumps(signature))  # as it will read back

    def load(self) -> dict[str, dict[str, Any]]:
        """Records by key (later lines win). Raises :class:`InputError` if the log was written
        by a run with another signature. Creates the log (header only) if it is missing."""
        records: dict[str, dict[str, Any]] = {}
        if not self.path.exists():
            self._rewrite(records)
            return records
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        header = None
        clean = self.path.read_bytes().endswith(b"\n")
        for line in lines:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                clean = False
                continue
            if header is None and isinstance(entry, dict) and "signature" in entry:
                header = entry["signature"]
            elif isinstance(entry, dict) and "key" in entry:
                records[str(entry["key"])] = entry
        if header != self.signature:
            changed = sorted(k for k in set(self.signature) | set(header or {})
                             if (header or {}).get(k) != self.signature.get(k))
            raise InputError(
                f"output {self.path.parent}: holds work from a different run (differs in "
                f"{', '.join(changed) or 'format'}); pass --overwrite or choose another output"
            )
        if not clean:  # drop a torn last line so later appends start on a fresh line
            self._rewrite(records)
        return records

    def _rewrite(self, records: dict[str, dict[str, Any]]) -> None:
        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(json.dumps({"signature": self.signature}) + "\n")
                for record in records.values():
                    fh.write(json.dumps(record) + "\n")
            os.chmod(tmp, 0o666 & ~_umask())

        atomic_write(self.path, write)

    def append(self, record: dict[str, Any]) -> None:
        """Durably add one finished item (``record["key"]`` identifies it)."""
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_any(self) -> list[dict[str, Any]]:
        """Records of whatever run wrote the log (for ``--overwrite`` clean-up)."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and "key" in entry:
                out.append(entry)
        return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (temp file + rename), with the permissions a plain
    ``open()`` would give (the temp file alone would be private, mode 0600)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh)
        os.chmod(tmp, 0o666 & ~_umask())

    atomic_write(path, write)
