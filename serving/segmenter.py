"""``Segmenter``: the one inference API over every backend (PyTorch, ONNX Runtime, TensorRT).

>>> seg = Segmenter.from_checkpoint("runs/quickstart/model_final.safetensors")
>>> pred = seg.predict("image.jpg")                          # automatic instance segmentation
>>> pred = seg.predict(image, boxes=[[10, 20, 200, 180]])   # one mask per prompt box, in order
"""

from __future__ import annotations

import dataclasses
import itertools
import numbers
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch

from .backends import Backend
from .errors import InputError
from .inference.box_scale import BoxScaleOptions, segment_per_box, trained_sizes
from .inference.boxes import MAX_MASK_PIXELS, BoxesLike, check_mask_pixels, validate_boxes
from .inference.domain import calibration_of
from .inference.images import ImageLike, describe_image, load_image
from .inference.paste import mask_crops
from .inference.transforms import canvas_size, preprocess, resized_shape, scale_boxes
from .model.card import ModelCard
from .model_config import MAX_INPUT_SIDE, InferenceConfig, config_to_dict
from .prediction import Prediction

LabelsLike = Any  # (M,) ints (class indices, -1 = predict) or class-name strings
T = TypeVar("T")
R = TypeVar("R")


def run_isolated(run: Callable[[list[T]], list[R]], items: Sequence[T],
                 on_retry: Callable[[Exception], None] | None = None) -> list[R | Exception]:
    """``run(items)`` as one batch; if it raises, ``run([item])`` for each item alone, so only
    the items that fail get their exception (in place of their result) and the others
    succeed. The failure isolation of the batch CLI and the HTTP server.

    Args:
        run: maps a list of items to one result per item.
        on_retry: called with the batch's exception before the one-by-one retry.
    """
    items = list(items)
    try:
        return list(run(items))
    except Exception as exc:  # noqa: BLE001 - any failure: find the item that causes it
        if len(items) == 1:
            return [exc]
        if on_retry is not None:
            on_retry(exc)
    outcomes: list[R | Exception] = []
    for item in items:
        try:
            outcomes.extend(run([item]))
        except Exception as exc:  # noqa: BLE001 - reported per item
            outcomes.append(exc)
    return outcomes


def _class_index(value: Any, i: int) -> int:
    """A label given as a number: an integral class index (bools, NaN, 1.5, {} refused)."""
    number = value.item() if isinstance(value, np.generic) else value
    if isinstance(number, bool) or not isinstance(number, (int, float)) or \
            not float(number).is_integer():
        raise InputError(f"label {i}: {value!r} is not a class index or name; give an integer "
                         "index, a class name, or -1/None to let the model choose")
    return int(number)


class Segmenter:
    """Instance segmentation with optional box prompts, over any backend.

    Use :meth:`from_checkpoint`, :meth:`from_onnx`, :meth:`from_tensorrt` or :meth:`load`.
    ``box_scale`` (default on): each prompt box is segmented at a scale among the model's
    training object sizes (:mod:`serving.inference.box_scale`); off, the whole image runs
    once at ``cfg.min_size``/``cfg.max_size`` for every box. A setting of this object, not of
    the model file: checkpoints and exports are unchanged by it. ``refine`` (default on, with
    ``box_scale``): each box's mask refined at full resolution, guided by the image's colours
    (:mod:`serving.inference.refine`).
    ``max_mask_pixels``: the most pixels one image's prompt boxes may cover together (a byte
    of mask memory each); more is refused before any work.
    """

    max_mask_pixels: int = MAX_MASK_PIXELS

    def __init__(self, backend: Backend, class_names: Sequence[str], cfg: InferenceConfig,
                 info: dict[str, Any] | None = None, box_scale: bool = True,
                 card: ModelCard | None = None, refine: bool = True) -> None:
        self.backend = backend
        self.class_names = tuple(class_names)
        self.cfg = cfg
        self.info = dict(info or {})
        self.box_scale = bool(box_scale)
        #: The loaded file's model card (``None`` for a Segmenter built around a live model).
        self.card = card
        self.refine = bool(refine)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "auto",
                        dtype: str | torch.dtype | None = None, **overrides: Any) -> Segmenter:
        """Load a training checkpoint (``.safetensors``) into the PyTorch backend.

        ``dtype``: "fp32" (default), "bf16" (CUDA, or a CPU with native bf16 instructions) or
        "fp16" (CUDA): the network runs in autocast, post-processing in fp32; an unsupported
        choice raises ``InputError`` with the reason. ``overrides`` replace fields of the
        checkpoint's ``InferenceConfig``.
        """
        from .backends.torch_backend import TorchBackend
        from .model.model_file import load_checkpoint

        model, card = load_checkpoint(path)
        cfg = InferenceConfig(**{**config_to_dict(card.inference), **overrides})
        backend = TorchBackend(model, cfg, device=device, dtype=dtype)
        info = {"backbone": card.model.backbone, "path": str(path),
                "precision": backend.precision}
        return cls(backend, card.class_names, cfg, info, card=card)

    @classmethod
    def from_onnx(cls, path: str | os.PathLike, device: str = "auto",
                  providers: Sequence[str] | None = None, **overrides: Any) -> Segmenter:
        """Load an exported ONNX model (needs ``onnxruntime``)."""
        from .backends.onnxruntime_backend import load_onnx_segmenter

        return load_onnx_segmenter(cls, path, device=device, providers=providers, **overrides)

    @classmethod
    def from_tensorrt(cls, path: str | os.PathLike, **overrides: Any) -> Segmenter:
        """Load a serialised TensorRT engine (needs ``tensorrt`` and a CUDA GPU)."""
        from .backends.tensorrt_backend import load_tensorrt_segmenter

        return load_tensorrt_segmenter(cls, path, **overrides)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto",
             image_size: int | Sequence[int] | None = None,
             dtype: str | torch.dtype | None = None, box_scale: bool = True,
             **overrides: Any) -> Segmenter:
        """Load any model file or folder that training or export writes (a ``.safetensors``
        checkpoint, an ``.onnx`` graph or its sidecar ``.json``, an export folder, a TensorRT
        ``.engine``/``.plan``; see :func:`serving.backends.locate.locate_model`), the backend
        picked by the file.

        ``image_size``: ``short`` or ``(short, long)``, the test-time resize instead of the
        model's own (:meth:`with_image_size`). ``dtype`` ("fp32", "bf16", "fp16") applies to
        checkpoints (see :meth:`from_checkpoint`); exported models run at the precision they
        were exported with. ``box_scale``: see the class docstring (an ``image_size`` turns
        it off). ``overrides`` replace ``InferenceConfig`` fields.
        """
        if not isinstance(box_scale, bool):
            raise InputError(f"box_scale={box_scale!r}: give True (each box at its own scale) "
                             "or False (the whole image once)")
        seg = cls._load_file(path, device, dtype, overrides).with_box_scale(box_scale)
        if image_size is None:
            return seg
        sizes = [int(image_size)] if isinstance(image_size, int) else [int(v) for v in image_size]
        if not 1 <= len(sizes) <= 2:
            raise InputError(f"image_size {list(sizes)}: give SHORT or (SHORT, LONG)")
        return seg.with_image_size(*sizes)

    @classmethod
    def _load_file(cls, path: str | os.PathLike, device: str, dtype: str | torch.dtype | None,
                   overrides: dict[str, Any]) -> Segmenter:
        from .backends.locate import locate_model

        found, kind = locate_model(path)
        if kind != "checkpoint" and dtype not in (None, "fp32", torch.float32):
            raise InputError(
                f"dtype={dtype}: applies to PyTorch checkpoints (.safetensors); {found.name} "
                "runs at its exported precision (sim export --int8 makes an INT8 one)"
            )
        if kind == "onnx":
            return cls.from_onnx(found, device=device, **overrides)
        if kind == "tensorrt":
            return cls.from_tensorrt(found, **overrides)
        return cls.from_checkpoint(found, device=device, dtype=dtype, **overrides)

    def with_image_size(self, short: int, long: int | None = None) -> Segmenter:
        """The same model resizing images to shorter side ``short`` and longer side at most
        ``long`` (default: ``short`` times this model's ``max_size / min_size``), for objects
        much smaller or larger than in training. Shares the loaded model. An explicit size
        is an override: box prompts run the whole image at that size too (``box_scale`` off).

        Raises :class:`InputError` unless ``32 <= short <= long <= MAX_INPUT_SIDE``.
        """
        if long is None:
            long = min(MAX_INPUT_SIDE, int(round(short * self.cfg.max_size / self.cfg.min_size)))
        if not 32 <= short <= long <= MAX_INPUT_SIDE:
            raise InputError(f"image size {short} {long}: need 32 <= SHORT <= LONG <= "
                             f"{MAX_INPUT_SIDE} (SHORT is the shorter side, LONG the cap on the "
                             "longer side)")
        cfg = dataclasses.replace(self.cfg, min_size=int(short), max_size=int(long))
        return type(self)(self.backend, self.class_names, cfg, self.info, box_scale=False,
                          card=self.card, refine=self.refine)

    def with_box_scale(self, on: bool, refine: bool | None = None) -> Segmenter:
        """The same model with the per-box scale of box prompts on or off, and its
        full-resolution refinement on or off (``None``: as now; see the class docstring).
        Shares the loaded model."""
        refine = self.refine if refine is None else refine
        return type(self)(self.backend, self.class_names, self.cfg, self.info, box_scale=on,
                          card=self.card, refine=refine)

    # ----------------------------------------------------------------- info
    @property
    def calibration(self) -> dict[str, Any]:
        """The card's calibration as a dict (empty without one): ``score_threshold`` (best F1
        on validation), ``prompt_scores`` / ``auto_scores`` and ``object_sizes`` quantiles
        (the typed one: ``self.card.calibration``; see :mod:`serving.inference.domain`)."""
        return calibration_of(self).to_dict()

    @property
    def display_threshold(self) -> float:
        """Automatic mode's score threshold for what people look at (pictures, the app, the
        server's default): the calibrated F1-best threshold, else the model's own."""
        found = calibration_of(self).score_threshold
        return float(found) if found is not None else float(self.cfg.score_threshold)

    @property
    def model_info(self) -> dict[str, Any]:
        """Backbone, classes, backend, device and input rules, for UIs and servers."""
        return {
            "backbone": self.info.get("backbone", "unknown"),
            "classes": list(self.class_names),
            "backend": self.backend.name,
            "device": self.backend.device,
            "min_size": self.cfg.min_size,
            "max_size": self.cfg.max_size,
            "max_prompt_boxes": self.cfg.max_prompt_boxes,
            "box_scale": self.box_scale,
            "score_threshold": self.cfg.score_threshold,
            "display_threshold": self.display_threshold,
        }

    def _labels(self, labels: LabelsLike, count: int) -> np.ndarray:
        if labels is None:
            return np.full(count, -1, dtype=np.int64)
        values = list(labels)
        if len(values) != count:
            raise InputError(f"labels: {len(values)} given for {count} boxes; give one per box")
        out = np.empty(count, dtype=np.int64)
        for i, value in enumerate(values):
            if value is None:
                out[i] = -1
            elif isinstance(value, str):
                if value not in self.class_names:
                    raise InputError(
                        f"label {i}: unknown class '{value}'; choose one of "
                        f"{', '.join(self.class_names)}"
                    )
                out[i] = self.class_names.index(value)
            else:
                idx = _class_index(value, i)
                if not -1 <= idx < len(self.class_names):
                    raise InputError(
                        f"label {i}: class index {idx} out of range 0..{len(self.class_names) - 1}"
                    )
                out[i] = idx
        return out

    # ----------------------------------------------------------------- inference
    def predict(self, image: ImageLike, boxes: BoxesLike | None = None,
                labels: LabelsLike | None = None,
                score_threshold: float | None = None) -> Prediction:
        """Segment one image.

        Args:
            image: path, bytes, PIL image or (H, W, 3) uint8 RGB array.
            boxes: optional (M, 4) prompt boxes XYXY in original pixels: one mask per box, in
                order. ``None`` runs automatic instance segmentation.
            labels: optional class per box (index, name, or -1/None to predict it); only with
                ``boxes``.
            score_threshold: automatic mode only: drop instances scoring below this.

        Raises:
            SimError: bad input (``ImageError``, ``BoxError``, ``InputError``), one line each.
        """
        batch_boxes = None if boxes is None else [boxes]
        batch_labels = None if labels is None else [labels]
        return self.predict_batch([image], boxes=batch_boxes, labels=batch_labels,
                                  batch_size=1, score_threshold=score_threshold)[0]

    def predict_batch(self, images: Iterable[ImageLike],
                      boxes: Sequence[BoxesLike | None] | None = None,
                      labels: Sequence[LabelsLike | None] | None = None, batch_size: int = 8,
                      score_threshold: float | Sequence[float | None] | None = None,
                      ) -> list[Prediction]:
        """Segment many images; results in input order. See :meth:`predict_stream`."""
        return list(self.predict_stream(images, boxes=boxes, labels=labels,
                                        batch_size=batch_size, score_threshold=score_threshold))

    def predict_stream(self, images: Iterable[ImageLike],
                       boxes: Sequence[BoxesLike | None] | None = None,
                       labels: Sequence[LabelsLike | None] | None = None, batch_size: int = 8,
                       score_threshold: float | Sequence[float | None] | None = None,
                       ) -> Iterator[Prediction]:
        """Segment many images, yielding one :class:`Prediction` per image in input order.

        Images are read ``batch_size`` at a time (a generator of paths works), so at most one
        batch of decoded images is in memory however many are given. Within a batch, images
        run together only when their padded canvases are equal (the canvas of an image
        depends on its own size alone): a result never depends on the other images of its
        batch.

        Args:
            images: paths, bytes, PIL images or (H, W, 3) uint8 RGB arrays (any iterable).
            boxes: per image ``None`` (automatic mode) or (M, 4) prompt boxes; one entry per
                image.
            labels: per image ``None`` or one class per prompt box of that image; only for
                images that have boxes.
            batch_size: images per forward pass (at most).
            score_threshold: automatic mode: a threshold for every image, or one per image
                (``None`` entries keep everything).

        Raises:
            InputError: list lengths that do not match the images, labels without boxes, a
                bad ``batch_size``; ``BoxError`` for a bad box; ``ImageError`` for an image
                that cannot be read, or whose aspect ratio is beyond about ``max_size / 8``
                (see :func:`serving.inference.transforms.resized_shape`).
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size={batch_size!r} must be an integer of at least 1")
        jobs = _jobs(images, boxes, labels, score_threshold)
        while window := list(itertools.islice(jobs, batch_size)):
            yield from self._run_window([self._load(*job) for job in window])

    def _load(self, source: ImageLike, boxes: BoxesLike | None, labels: LabelsLike | None,
              threshold: float | None) -> _Item:
        """Decode and check one image and its prompts (at load time, before any batch runs)."""
        array = load_image(source)
        height, width = array.shape[:2]
        size = resized_shape(height, width, self.cfg.min_size, self.cfg.max_size,
                             describe_image(source))
        if boxes is None:
            return _Item(array, canvas_size(*size), None, threshold)
        valid = validate_boxes(boxes, (height, width), self.cfg.max_prompt_boxes)
        check_mask_pixels(valid, (height, width), bool(self.cfg.clip_to_box),
                          self.max_mask_pixels)
        return _Item(array, canvas_size(*size), (valid, self._labels(labels, len(valid))), None)

    def _run_window(self, items: list[_Item]) -> list[Prediction]:
        """Predict ``items`` in groups of one mode and one canvas; results in input order."""
        results: list[Prediction | None] = [None] * len(items)
        groups: dict[tuple[bool, tuple[int, int]], list[int]] = {}
        for i, item in enumerate(items):
            if item.prompt is not None and not len(item.prompt[0]):
                results[i] = self._empty(item.array.shape[:2])
            else:
                groups.setdefault((item.prompt is None, item.canvas), []).append(i)
        for (automatic, _), members in groups.items():
            run = self._run_auto if automatic else self._run_prompted
            for i, pred in zip(members, run([items[i] for i in members]), strict=True):
                results[i] = pred
        return results  # type: ignore[return-value]

    def _empty(self, size: tuple[int, int]) -> Prediction:
        return Prediction(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                          np.zeros(0, np.int64), np.zeros((0, *size), bool), self.class_names)

    def _preprocess(self, arrays: list[np.ndarray]):
        return preprocess(arrays, self.cfg.min_size, self.cfg.max_size, valid=False)

    def _run_auto(self, items: list[_Item]) -> list[Prediction]:
        batch, _, sizes = self._preprocess([item.array for item in items])
        dets = self.backend.detect(batch, sizes)
        preds = []
        for item, size, det in zip(items, sizes, dets):
            orig = item.array.shape[:2]
            det = det.above(item.threshold)
            boxes = scale_boxes(det.boxes.float().cpu().numpy(), size, orig)
            masks = mask_crops(det.mask_probs, size, orig, self.cfg.mask_threshold)
            preds.append(Prediction(boxes, det.scores.float().cpu().numpy(),
                                    det.labels.cpu().numpy().astype(np.int64),
                                    masks, self.class_names))
        return preds

    def _run_prompted(self, items: list[_Item]) -> list[Prediction]:
        if self.box_scale:
            return [self._run_per_box(item) for item in items]
        chunk = [(item.array, *item.prompt) for item in items]  # type: ignore[misc]
        batch, _, sizes = self._preprocess([c[0] for c in chunk])
        m = max(len(c[1]) for c in chunk)
        boxes_in = np.zeros((len(chunk), m, 4), np.float32)
        labels_in = np.full((len(chunk), m), -1, np.int64)
        for b, ((arr, bx, lb), size) in enumerate(zip(chunk, sizes)):
            scaled = scale_boxes(bx, arr.shape[:2], size)
            boxes_in[b, : len(bx)] = scaled
            boxes_in[b, len(bx):] = scaled[0]  # padding rows repeat a real box; dropped below
            labels_in[b, : len(bx)] = lb
        out = self.backend.segment_boxes(batch, sizes, torch.from_numpy(boxes_in),
                                         torch.from_numpy(labels_in))
        preds = []
        for b, ((arr, bx, _), size) in enumerate(zip(chunk, sizes)):
            n = len(bx)
            clip = torch.from_numpy(bx) if self.cfg.clip_to_box else None
            masks = mask_crops(out.mask_probs[b, :n].cpu(), size, arr.shape[:2],
                               self.cfg.mask_threshold, clip_boxes=clip)
            preds.append(Prediction(bx.copy(), out.scores[b, :n].float().cpu().numpy(),
                                    out.labels[b, :n].cpu().numpy().astype(np.int64),
                                    masks, self.class_names))
        return preds

    def _run_per_box(self, item: _Item) -> Prediction:
        """One image's prompts, each box at its own scale (:mod:`.inference.box_scale`)."""
        boxes, labels = item.prompt  # type: ignore[misc]
        out = segment_per_box(self.backend, item.array, boxes, labels, self.cfg,
                              trained_sizes(calibration_of(self)),
                              BoxScaleOptions(refine=self.refine))
        return Prediction(boxes.copy(), out.scores, out.labels, out.masks, self.class_names)


class _Item(NamedTuple):
    """One decoded image: (H, W, 3) uint8 ``array``, its padded ``canvas`` (H, W), its
    ``prompt`` (boxes (M, 4) float32, labels (M,) int64) or ``None``, and its score
    ``threshold`` (automatic mode)."""

    array: np.ndarray
    canvas: tuple[int, int]
    prompt: tuple[np.ndarray, np.ndarray] | None
    threshold: float | None


def _per_image(name: str, values: Any, count: int | None) -> Sequence[Any] | None:
    """``values`` as a per-image list (``None`` stays ``None``), its length checked."""
    if values is None:
        return None
    if isinstance(values, (str, bytes, Mapping)) or not (
            hasattr(values, "__len__") and hasattr(values, "__getitem__")):
        raise InputError(f"{name}: expected a list with one entry per image, got "
                         f"{type(values).__name__}")
    if count is not None and len(values) != count:
        raise InputError(f"{name}: {len(values)} entries for {count} images; give one per image")
    return values


def _entry(name: str, values: Sequence[Any] | None, index: int) -> Any:
    """``values[index]`` (``None`` when there is no list); a list too short is an error."""
    if values is None:
        return None
    if index >= len(values):
        raise InputError(f"{name}: {len(values)} entries for more images; give one per image")
    return values[index]


def _jobs(images: Iterable[ImageLike], boxes: Any, labels: Any, thresholds: Any,
          ) -> Iterator[tuple[ImageLike, Any, Any, float | None]]:
    """(image, boxes, labels, threshold) per image, every list length checked (up front when
    ``images`` has a length, else as the images arrive and at the end)."""
    count = len(images) if isinstance(images, Sized) else None
    if labels is not None and boxes is None:
        raise InputError("labels: given without boxes; labels name the class of each prompt "
                         "box, pass boxes too (or drop labels)")
    scalar = thresholds is None or isinstance(thresholds, numbers.Real)
    columns = {"boxes": _per_image("boxes", boxes, count),
               "labels": _per_image("labels", labels, count),
               "score_threshold": None if scalar else _per_image("score_threshold", thresholds,
                                                                   count)}
    index = -1
    for index, image in enumerate(images):
        box, label, threshold = (_entry(name, values, index) for name, values in columns.items())
        if label is not None and box is None:
            raise InputError(f"labels[{index}]: given for image {index}, which has no boxes; "
                             "pass its boxes or None as its labels")
        yield image, box, label, thresholds if scalar else threshold
    for name, values in columns.items():
        if values is not None and len(values) != index + 1:
            raise InputError(f"{name}: {len(values)} entries for {index + 1} images; give one "
                             "per image")
