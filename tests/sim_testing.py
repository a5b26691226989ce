"""Tiny-model helpers shared by every test folder (import as ``from sim_testing import ...``).

``tests/`` is on ``sys.path`` under pytest (its conftest.py lives there); a uniquely named module
is used because ``from conftest import ...`` resolves to whichever conftest pytest loaded last.
"""

from __future__ import annotations

import torch

TINY_CLASSES = ("disc", "ring", "triangle")


def tiny_model_config(num_classes: int = len(TINY_CLASSES)):
    """A MobileNetV2-FPN small enough for CPU tests (random init, no downloads)."""
    from serving import ModelConfig

    return ModelConfig(backbone="mobilenet_v2", num_classes=num_classes, fpn_channels=32,
                       head_convs=1, mask_branch_channels=16, mask_branch_convs=1)


def make_tiny_checkpoint(path, seed: int = 0, detections: bool = True,
                         min_size: int = 128, max_size: int = 256, sharp: bool = False):
    """Write a random-weight checkpoint. With ``detections`` the class bias is raised so the
    automatic mode returns instances (an untrained model otherwise scores below 0.05).

    ``sharp`` makes the predictions less degenerate instead: class weights scaled by 30 (scores
    spread over (0, 1)) and a box regression bias of 2 (boxes of about four strides), so that
    matching detections by IoU between two runtimes is meaningful (INT8 verification)."""
    from serving import InferenceConfig, build_condinst
    from serving.model.model_file import new_card, save_checkpoint

    torch.manual_seed(seed)
    cfg = tiny_model_config()
    model = build_condinst(cfg).eval()
    with torch.no_grad():
        if sharp:
            model.head.cls_logits.weight.mul_(30.0)
            model.head.cls_logits.bias.fill_(-1.0)
            model.head.bbox_pred.bias.fill_(2.0)
        elif detections:
            model.head.cls_logits.bias.fill_(1.0)
    infer = InferenceConfig(min_size=min_size, max_size=max_size, max_detections=20)
    save_checkpoint(path, model, new_card(cfg, TINY_CLASSES, infer))
    return path


def release_files(root):
    """Extract the model files of release f16b7e0 (``tests/fixtures/release_f16b7e0.tar.xz``,
    made by ``tests/fixtures/make_release_fixtures.py``) under ``root``; returns their folder."""
    import tarfile
    from pathlib import Path

    with tarfile.open(Path(__file__).parent / "fixtures" / "release_f16b7e0.tar.xz") as tar:
        tar.extractall(root, filter="data")
    return Path(root) / "release_f16b7e0"


def run_two_processes(fn):
    """Run ``fn(rank, all_reduce_sum)`` for ranks 0 and 1 in two threads whose barrier-based
    ``all_reduce_sum`` sums a tensor over both, like ``torch.distributed.all_reduce`` over two
    processes. Returns ``[result of rank 0, result of rank 1]``."""
    import threading

    slots: list = [None, None]
    results: list = [None, None]
    barrier = threading.Barrier(2)

    def worker(rank: int) -> None:
        def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
            slots[rank] = t.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total

        results[rank] = fn(rank, all_reduce_sum)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def reference_postprocess_masks(mask_probs, resized_size, orig_size, threshold=0.5,
                                clip_boxes=None):
    """The mask pipeline as specified, one mask at a time (independent reference): aligned x4
    upsampling, crop to the resized image, bilinear resize to the original, threshold, clip
    to the box by pixel centres. (K, H0, W0) bool."""
    import torch.nn.functional as F

    from serving.model.ops import aligned_bilinear

    h0, w0 = orig_size
    out = torch.zeros((mask_probs.shape[0], h0, w0), dtype=torch.bool)
    ys = torch.arange(h0, dtype=torch.float32) + 0.5
    xs = torch.arange(w0, dtype=torch.float32) + 0.5
    for i in range(mask_probs.shape[0]):
        up = aligned_bilinear(mask_probs[i][None, None].float().cpu(), 4)
        up = up[:, :, : resized_size[0], : resized_size[1]]
        up = F.interpolate(up, size=(h0, w0), mode="bilinear", align_corners=False)[0, 0]
        mask = up > threshold
        if clip_boxes is not None:
            x1, y1, x2, y2 = torch.as_tensor(clip_boxes)[i].tolist()
            mask &= ((ys >= y1) & (ys <= y2))[:, None] & ((xs >= x1) & (xs <= x2))[None, :]
        out[i] = mask
    return out


def reference_preprocess(images, min_size, max_size, device="cpu", valid=True):
    """``preprocess`` as specified: each image resized (or converted) on its own, then padded
    (``pad_batch``)."""
    import numpy as np

    from serving.inference.transforms import pad_batch, resize_image, resized_shape

    sizes = [resized_shape(im.shape[0], im.shape[1], min_size, max_size) for im in images]
    tensors = [resize_image(torch.from_numpy(np.array(im)).permute(2, 0, 1), size)
               for im, size in zip(images, sizes)]
    batch, mask = pad_batch(tensors)
    return batch.to(device), mask if valid else None, sizes


def use_reference_pipeline(monkeypatch) -> None:
    """Make ``Segmenter`` run the straightforward pre- and post-processing (whole-image masks
    cut to crops afterwards): what the fast paths must reproduce bit for bit."""
    from serving.masks import InstanceMasks

    def whole_image(mask_probs, resized, orig, threshold=0.5, clip_boxes=None):
        dense = reference_postprocess_masks(mask_probs, resized, orig, threshold, clip_boxes)
        return InstanceMasks.from_dense(dense.numpy())

    monkeypatch.setattr("serving.segmenter.mask_crops", whole_image)
    monkeypatch.setattr("serving.segmenter.preprocess", reference_preprocess)


def assert_same_predictions(new, old) -> None:
    """Same instances, boxes, scores, labels and masks (bit for bit), and the same COCO RLE."""
    import numpy as np

    assert len(new) == len(old)
    assert np.array_equal(new.boxes, old.boxes) and np.array_equal(new.scores, old.scores)
    assert np.array_equal(new.labels, old.labels)
    assert np.array_equal(new.masks, old.masks)
    assert [r["segmentation"] for r in new.to_coco(1)] == [
        r["segmentation"] for r in old.to_coco(1)]


def record_box_widths(seg) -> list[int]:
    """Wrap ``seg.backend.segment_boxes`` so that each call appends its number of box slots
    (the boxes tensor's second dimension) to the returned list."""
    widths: list[int] = []
    inner = seg.backend.segment_boxes

    def counting(images, sizes, boxes, labels):
        widths.append(int(boxes.shape[1]))
        return inner(images, sizes, boxes, labels)

    seg.backend.segment_boxes = counting
    return widths
