"""``Segmenter``: the one inference API over every backend (PyTorch, ONNX Runtime, TensorRT).

>>> seg = Segmenter.from_checkpoint("runs/quickstart/model_final.safetensors")
>>> pred = seg.predict("image.jpg")                          # automatic instance segmentation
>>> pred = seg.predict(image, boxes=[[10, 20, 200, 180]])   # one mask per prompt box, in order
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backends import Backend
from .config import InferenceConfig, config_to_dict
from .errors import InputError
from .inference.boxes import BoxesLike, validate_boxes
from .inference.images import ImageLike, load_image
from .inference.postprocess import postprocess_masks
from .inference.transforms import preprocess, scale_boxes
from .prediction import Prediction

LabelsLike = Any  # (M,) ints (class indices, -1 = predict) or class-name strings




class Segmenter:
    """Instance segmentation with optional box prompts, over any backend.

    Use :meth:`from_checkpoint`, :meth:`from_onnx`, :meth:`from_tensorrt` or :meth:`load`.
    """

    def __init__(self, backend: Backend, class_names: Sequence[str], cfg: InferenceConfig,
                 info: dict[str, Any] | None = None) -> None:
        self.backend = backend
        self.class_names = tuple(class_names)
        self.cfg = cfg
        self.info = dict(info or {})

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
        from .model.checkpoint import load_checkpoint

        model, ckpt = load_checkpoint(path)
        cfg = InferenceConfig(**{**config_to_dict(ckpt.inference), **overrides})
        backend = TorchBackend(model, cfg, device=device, dtype=dtype)
        info = {"backbone": ckpt.model.backbone, "path": str(path), "extra": ckpt.extra,
                "precision": backend.precision}
        return cls(backend, ckpt.class_names, cfg, info)

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
             dtype: str | torch.dtype | None = None, **overrides: Any) -> Segmenter:
        """Pick the backend from the file extension (.safetensors, .onnx, .engine/.plan).

        ``dtype`` ("fp32", "bf16", "fp16") applies to checkpoints (see :meth:`from_checkpoint`);
        exported models run at the precision they were exported with.
        """
        suffix = Path(path).suffix.lower()
        if suffix in (".onnx", ".engine", ".plan", ".trt") and dtype not in (None, "fp32",
                                                                             torch.float32):
            raise InputError(
                f"dtype={dtype}: applies to PyTorch checkpoints (.safetensors); {Path(path).name} "
                "runs at its exported precision (python -m export --int8 makes an INT8 one)"
            )
        if suffix == ".onnx":
            return cls.from_onnx(path, device=device, **overrides)
        if suffix in (".engine", ".plan", ".trt"):
            return cls.from_tensorrt(path, **overrides)
        if suffix in (".safetensors", ".pt", ".pth"):
            return cls.from_checkpoint(path, device=device, dtype=dtype, **overrides)
        raise InputError(
            f"model {path}: unknown file type '{suffix}'; pass a .safetensors checkpoint, an "
            ".onnx file or a TensorRT .engine"
        )

    # ----------------------------------------------------------------- info
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
            "score_threshold": self.cfg.score_threshold,
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
                idx = int(value)
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
            labels: optional class per box (index, name, or -1/None to predict it).
            score_threshold: automatic mode only: drop instances scoring below this.
        """
        batch_boxes = None if boxes is None else [boxes]
        batch_labels = None if labels is None else [labels]
        return self.predict_batch([image], boxes=batch_boxes, labels=batch_labels,
                                  batch_size=1, score_threshold=score_threshold)[0]

    def predict_batch(self, images: Sequence[ImageLike],
                      boxes: Sequence[BoxesLike | None] | None = None,
                      labels: Sequence[LabelsLike | None] | None = None, batch_size: int = 8,
                      score_threshold: float | None = None) -> list[Prediction]:
        """Segment many images, ``batch_size`` per forward pass; results in input order.

        ``boxes[i]`` (and ``labels[i]``) prompt image i; ``None`` runs automatic mode for it.
        """
        if batch_size < 1:
            raise InputError(f"batch_size={batch_size} must be at least 1")
        if boxes is not None and len(boxes) != len(images):
            raise InputError(f"boxes: {len(boxes)} lists for {len(images)} images")
        arrays = [load_image(im) for im in images]
        prompts: list[tuple[np.ndarray, np.ndarray] | None] = []
        for i, arr in enumerate(arrays):
            if boxes is None or boxes[i] is None:
                prompts.append(None)
                continue
            valid = validate_boxes(boxes[i], arr.shape[:2], self.cfg.max_prompt_boxes)
            lab = self._labels(None if labels is None else labels[i], len(valid))
            prompts.append((valid, lab))
        results: list[Prediction | None] = [None] * len(arrays)
        auto = [i for i, p in enumerate(prompts) if p is None]
        prompted = [i for i, p in enumerate(prompts) if p is not None and len(p[0])]
        for i, p in enumerate(prompts):
            if p is not None and not len(p[0]):
                results[i] = self._empty(arrays[i].shape[:2])
        for start in range(0, len(auto), batch_size):
            idx = auto[start:start + batch_size]
            for i, pred in zip(idx, self._run_auto([arrays[i] for i in idx], score_threshold)):
                results[i] = pred
        for start in range(0, len(prompted), batch_size):
            idx = prompted[start:start + batch_size]
            chunk = [(arrays[i], *prompts[i]) for i in idx]  # type: ignore[misc]
            for i, pred in zip(idx, self._run_prompted(chunk)):
                results[i] = pred
        return results  # type: ignore[return-value]

    def _empty(self, size: tuple[int, int]) -> Prediction:
        return Prediction(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                          np.zeros(0, np.int64), np.zeros((0, *size), bool), self.class_names)

    def _preprocess(self, arrays: list[np.ndarray]):
        return preprocess(arrays, self.cfg.min_size, self.cfg.max_size)

    def _run_auto(self, arrays: list[np.ndarray],
                  score_threshold: float | None) -> list[Prediction]:
        batch, _, sizes = self._preprocess(arrays)
        dets = self.backend.detect(batch, sizes)
        preds = []
        for arr, size, det in zip(arrays, sizes, dets):
            orig = arr.shape[:2]
            keep = torch.ones_like(det.scores, dtype=torch.bool)
            if score_threshold is not None:
                keep = det.scores >= score_threshold
            boxes = scale_boxes(det.boxes[keep].float().cpu().numpy(), size, orig)
            masks = postprocess_masks(det.mask_probs[keep], size, orig, self.cfg.mask_threshold)
            preds.append(Prediction(boxes, det.scores[keep].float().cpu().numpy(),
                                    det.labels[keep].cpu().numpy().astype(np.int64),
                                    masks.cpu().numpy(), self.class_names))
        return preds

    def _run_prompted(self, chunk: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                      ) -> list[Prediction]:
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
            masks = postprocess_masks(out.mask_probs[b, :n].cpu(), size, arr.shape[:2],
                                      self.cfg.mask_threshold, clip_boxes=clip)
            preds.append(Prediction(bx.copy(), out.scores[b, :n].float().cpu().numpy(),
                                    out.labels[b, :n].cpu().numpy().astype(np.int64),
                                    masks.numpy(), self.class_names))
        return preds
