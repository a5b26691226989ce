"""``Segmenter``: the one inference API over every backend (PyTorch, ONNX Runtime, TensorRT).

>>> seg = Segmenter.from_checkpoint("runs/quickstart/model_final.safetensors")
>>> pred = seg.predict("image.jpg")                          # automatic instance segmentation
>>> pred = seg.predict(image, boxes=[[10, 20, 200, 180]])   # one mask per prompt box, in order
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from .backends import Backend
from .errors import InputError
from .inference.box_scale import BoxScaleOptions, segment_per_box, trained_sizes
from .inference.boxes import MAX_MASK_PIXELS, BoxesLike
from .inference.domain import calibration_of
from .inference.images import ImageLike, describe_image, load_image
from .inference.paste import mask_crops
from .inference.quality import SCORE_VERSION
from .inference.transforms import canvas_size, preprocess, resized_shape, scale_boxes
from .masks import InstanceMasks
from .model.card import ModelCard
from .model_config import MAX_INPUT_SIDE, InferenceConfig, config_to_dict
from .prediction import Prediction
from .prompts import (
    ALL,
    LabelsLike,
    Prompt,
    ScoreThreshold,
    check_prompt,
    passes,
    per_image_requests,
    threshold_value,
)


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
    def prompt_score(self) -> str | None:
        """Which definition the box-prompted ``score`` follows: the mask-quality estimate
        :data:`serving.inference.quality.SCORE_VERSION` with the per-box scale, ``None`` (the
        model's own box score) on the whole-image path (``box_scale`` off, or an
        ``image_size`` override)."""
        return SCORE_VERSION if self.box_scale else None

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

    # ----------------------------------------------------------------- request rules
    def check_prompt(self, boxes: BoxesLike, labels: LabelsLike | None,
                     image_size: tuple[int, int], *, max_boxes: int | None = None,
                     max_mask_pixels: int | None = None) -> Prompt:
        """Check one image's prompt once, for every entry point (:mod:`serving.prompts`).

        Args:
            boxes: (M, 4) XYXY in original pixels (a single ``[x1, y1, x2, y2]`` is one box).
            labels: ``None``, or one class per box: an index, a class name, or -1/``None``
                to let the model predict it.
            image_size: (H, W) of the image.
            max_boxes: the caller's cap on boxes per request (``None``: none; more boxes
                than ``cfg.max_prompt_boxes`` run in several passes with the same results).
            max_mask_pixels: the most pixels the masks may cover together (default
                :attr:`max_mask_pixels`).

        Returns:
            A :class:`Prompt`: boxes (M, 4) float32 clipped to the image, labels (M,) int64
            (-1 = predict); :meth:`predict` takes it in place of ``boxes``.

        Raises:
            BoxError: a bad box (``box i: ...``, i counted from 0); ``PromptLimitError`` (a
                ``BoxError``) over ``max_boxes`` or ``max_mask_pixels``. InputError: a bad
                label (``label i: ...``) or a wrong number of labels.
        """
        limit = self.max_mask_pixels if max_mask_pixels is None else int(max_mask_pixels)
        return check_prompt(boxes, labels, image_size, self.class_names,
                            bool(self.cfg.clip_to_box), max_boxes, limit)

    def score_cut(self, score_threshold: ScoreThreshold) -> float | None:
        """The number a threshold choice means for this model (``None``: keep everything).

        ``score_threshold``: ``"calibrated"`` (:attr:`display_threshold`, the default of
        everything shown to a person), ``"all"`` / ``None`` / 0 (every instance), or a number
        in [0, 1]; anything else raises :class:`InputError`.
        """
        calibrated = self.display_threshold if isinstance(score_threshold, str) else 0.0
        return threshold_value(score_threshold, calibrated)

    # ----------------------------------------------------------------- inference
    def predict(self, image: ImageLike, boxes: BoxesLike | Prompt | None = None,
                labels: LabelsLike | None = None,
                score_threshold: ScoreThreshold = ALL) -> Prediction:
        """Segment one image.

        Args:
            image: path, bytes, PIL image or (H, W, 3) uint8 RGB array.
            boxes: optional (M, 4) prompt boxes XYXY in original pixels, or a
                :class:`Prompt` from :meth:`check_prompt`: one mask per box, in order (any
                number of boxes; more than ``cfg.max_prompt_boxes`` run in several passes).
                ``None`` runs automatic instance segmentation.
            labels: optional class per box (index, name, or -1/None to predict it); only with
                raw ``boxes``.
            score_threshold: automatic mode only: ``"all"`` (default, every instance the
                model returns), ``"calibrated"`` (the model's F1-best threshold, what the
                app, the server and pictures show by default) or a number in [0, 1] (keep
                instances scoring at least it). See :meth:`score_cut`.

        Raises:
            SimError: bad input (``ImageError``, ``BoxError``, ``InputError``), one line each.
        """
        batch_boxes = None if boxes is None else [boxes]
        batch_labels = None if labels is None else [labels]
        return self.predict_batch([image], boxes=batch_boxes, labels=batch_labels,
                                  batch_size=1, score_threshold=score_threshold)[0]

    def predict_batch(self, images: Iterable[ImageLike],
                      boxes: Sequence[BoxesLike | Prompt | None] | None = None,
                      labels: Sequence[LabelsLike | None] | None = None, batch_size: int = 8,
                      score_threshold: ScoreThreshold | Sequence[ScoreThreshold] = ALL,
                      ) -> list[Prediction]:
        """Segment many images; results in input order. See :meth:`predict_stream`."""
        return list(self.predict_stream(images, boxes=boxes, labels=labels,
                                        batch_size=batch_size, score_threshold=score_threshold))

    def predict_stream(self, images: Iterable[ImageLike],
                       boxes: Sequence[BoxesLike | Prompt | None] | None = None,
                       labels: Sequence[LabelsLike | None] | None = None, batch_size: int = 8,
                       score_threshold: ScoreThreshold | Sequence[ScoreThreshold] = ALL,
                       ) -> Iterator[Prediction]:
        """Segment many images, yielding one :class:`Prediction` per image in input order.

        Images are read ``batch_size`` at a time (a generator of paths works), so at most one
        batch of decoded images is in memory however many are given. Within a batch, images
        run together only when their padded canvases are equal (the canvas of an image
        depends on its own size alone): a result never depends on the other images of its
        batch, nor on how many passes its boxes take.

        Args:
            images: paths, bytes, PIL images or (H, W, 3) uint8 RGB arrays (any iterable).
            boxes: per image ``None`` (automatic mode), (M, 4) prompt boxes or a
                :class:`Prompt`; one entry per image.
            labels: per image ``None`` or one class per prompt box of that image; only for
                images that have raw boxes.
            batch_size: images per forward pass (at most).
            score_threshold: automatic mode: one choice for every image, or one per image
                (see :meth:`predict`).

        Raises:
            InputError: list lengths that do not match the images, labels without boxes, a
                bad ``batch_size`` or threshold; ``BoxError`` for a bad box; ``ImageError``
                for an image that cannot be read, or whose aspect ratio is beyond about
                ``max_size / 8`` (see :func:`serving.inference.transforms.resized_shape`).
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size={batch_size!r} must be an integer of at least 1")
        jobs = per_image_requests(images, boxes, labels, score_threshold)
        while window := list(itertools.islice(jobs, batch_size)):
            yield from self._run_window([self._load(*job) for job in window])

    def _load(self, source: ImageLike, boxes: BoxesLike | Prompt | None,
              labels: LabelsLike | None, threshold: ScoreThreshold) -> _Item:
        """Decode and check one image and its prompt (at load time, before any batch runs)."""
        array = load_image(source)
        height, width = array.shape[:2]
        size = resized_shape(height, width, self.cfg.min_size, self.cfg.max_size,
                             describe_image(source))
        if boxes is None:
            return _Item(array, canvas_size(*size), None, self.score_cut(threshold))
        if not isinstance(boxes, Prompt):
            return _Item(array, canvas_size(*size),
                         self.check_prompt(boxes, labels, (height, width)), None)
        if labels is not None:
            raise InputError("labels: given with a checked Prompt, which holds its labels; "
                             "drop labels or pass the raw boxes")
        if boxes.image_size != (height, width):
            raise InputError(f"boxes: a Prompt checked for a {boxes.image_size[1]}x"
                             f"{boxes.image_size[0]} image, given with a {width}x{height} one; "
                             "check the prompt against this image")
        return _Item(array, canvas_size(*size), boxes, None)

    def _run_window(self, items: list[_Item]) -> list[Prediction]:
        """Predict ``items`` in groups of one mode and one canvas; results in input order."""
        results: list[Prediction | None] = [None] * len(items)
        groups: dict[tuple[bool, tuple[int, int]], list[int]] = {}
        for i, item in enumerate(items):
            if item.prompt is not None and not len(item.prompt):
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
        """Box prompts of images sharing one canvas: per box at its own scale, or the whole
        batch once per pass of at most ``cfg.max_prompt_boxes`` boxes. Each pass runs the
        same batch (an image with no boxes left repeats a box, dropped), so a box's result
        does not depend on how many passes there are."""
        if self.box_scale:
            return [self._run_per_box(item) for item in items]
        prompts: list[Prompt] = [item.prompt for item in items]  # type: ignore[misc]
        batch, _, sizes = self._preprocess([item.array for item in items])
        per_pass = max(int(self.cfg.max_prompt_boxes), 1)
        count = max(len(passes(len(p), per_pass)) for p in prompts)
        parts: list[list[tuple[np.ndarray, np.ndarray, InstanceMasks]]] = [[] for _ in items]
        for k in range(count):
            cuts = [slice(min(k * per_pass, len(p)), min((k + 1) * per_pass, len(p)))
                    for p in prompts]
            outs = self._prompted_pass(batch, sizes, prompts, cuts)
            for b, out in enumerate(outs):
                parts[b].append(out)
        return [Prediction(p.boxes.copy(), np.concatenate([s for s, _, _ in part]),
                           np.concatenate([lb for _, lb, _ in part]),
                           InstanceMasks.concatenate([m for _, _, m in part]), self.class_names)
                for p, part in zip(prompts, parts, strict=True)]

    def _prompted_pass(self, batch: torch.Tensor, sizes: list[tuple[int, int]],
                       prompts: list[Prompt], cuts: list[slice],
                       ) -> list[tuple[np.ndarray, np.ndarray, InstanceMasks]]:
        """One forward pass over ``batch`` (B, 3, H, W) for the boxes ``cuts[b]`` of each
        image's prompt (at least one row per image: an empty cut repeats the first box, its
        result dropped). Per image: scores (m,) float32, labels (m,) int64 and m masks."""
        m = max(max(c.stop - c.start for c in cuts), 1)
        boxes_in = np.zeros((len(prompts), m, 4), np.float32)
        labels_in = np.full((len(prompts), m), -1, np.int64)
        for b, (prompt, cut, size) in enumerate(zip(prompts, cuts, sizes)):
            scaled = scale_boxes(prompt.boxes, prompt.image_size, size)
            n = cut.stop - cut.start
            boxes_in[b, :n] = scaled[cut]
            boxes_in[b, n:] = scaled[cut.start if n else 0]  # padding repeats a real box
            labels_in[b, :n] = prompt.labels[cut]
        out = self.backend.segment_boxes(batch, sizes, torch.from_numpy(boxes_in),
                                         torch.from_numpy(labels_in))
        results = []
        for b, (prompt, cut, size) in enumerate(zip(prompts, cuts, sizes)):
            n = cut.stop - cut.start
            clip = torch.from_numpy(prompt.boxes[cut]) if self.cfg.clip_to_box else None
            masks = mask_crops(out.mask_probs[b, :n].cpu(), size, prompt.image_size,
                               self.cfg.mask_threshold, clip_boxes=clip)
            results.append((out.scores[b, :n].float().cpu().numpy(),
                            out.labels[b, :n].cpu().numpy().astype(np.int64), masks))
        return results

    def _run_per_box(self, item: _Item) -> Prediction:
        """One image's prompt, each box at its own scale (:mod:`.inference.box_scale`)."""
        prompt: Prompt = item.prompt  # type: ignore[assignment]
        out = segment_per_box(self.backend, item.array, prompt.boxes, prompt.labels, self.cfg,
                              trained_sizes(calibration_of(self)),
                              BoxScaleOptions(refine=self.refine))
        return Prediction(prompt.boxes.copy(), out.scores, out.labels, out.masks,
                          self.class_names)


class _Item(NamedTuple):
    """One decoded image: (H, W, 3) uint8 ``array``, its padded ``canvas`` (H, W), its
    checked ``prompt`` or ``None``, and its score ``threshold`` (automatic mode; ``None``
    keeps everything)."""

    array: np.ndarray
    canvas: tuple[int, int]
    prompt: Prompt | None
    threshold: float | None
