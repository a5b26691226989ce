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
    from serving.model.model_file import save_checkpoint

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
    save_checkpoint(path, model, cfg, list(TINY_CLASSES), infer)
    return path


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
