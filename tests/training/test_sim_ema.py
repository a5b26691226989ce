"""Known-answer tests of the EMA teacher (training/sim/ema.py, SIM_SPEC 7.1)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from training.sim.ema import EMATeacher, unwrap_model


def _student() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 1, 1))


def test_teacher_equals_student_at_start_and_has_no_grad() -> None:
    s = _student()
    t = EMATeacher(s)
    for (ks, vs), (kt, vt) in zip(s.state_dict().items(), t.state_dict().items(), strict=True):
        assert ks == kt and torch.equal(vs, vt)
    assert all(not p.requires_grad for p in t.module.parameters())
    assert all(p.requires_grad for p in s.parameters())
    assert not t.module.training
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    y = t(x)
    assert not y.requires_grad
    s.eval()
    torch.testing.assert_close(y, s(x).detach())


def test_update_formula_and_buffer_copy() -> None:
    s = _student()
    t = EMATeacher(s, momentum=0.9)
    t0 = {k: v.clone() for k, v in t.module.named_parameters()}
    with torch.no_grad():
        for p in s.parameters():
            p.add_(torch.randn_like(p))
    s.train()
    s(torch.randn(4, 3, 8, 8))  # changes the BN running statistics
    t.update(s)
    for k, p in s.named_parameters():
        torch.testing.assert_close(dict(t.module.named_parameters())[k], 0.9 * t0[k] + 0.1 * p)
    for k, b in s.named_buffers():
        assert torch.equal(dict(t.module.named_buffers())[k], b)
    t.update(s, momentum=0.0)  # per-call momentum: 0 copies the student
    for k, p in s.named_parameters():
        assert torch.equal(dict(t.module.named_parameters())[k], p)
    assert all(not p.requires_grad for p in t.module.parameters())


def test_state_dict_round_trip_and_train_mode() -> None:
    s = _student()
    t = EMATeacher(s, momentum=0.5)
    with torch.no_grad():
        for p in s.parameters():
            p.mul_(2.0)
    t.update(s)
    other = EMATeacher(_student(), train_mode=True)
    other.load_state_dict(t.state_dict())
    for k, v in t.state_dict().items():
        assert torch.equal(other.state_dict()[k], v)
    other(torch.randn(2, 3, 8, 8))
    assert other.module.training


def test_wrapped_students_are_unwrapped(tmp_path) -> None:
    s = _student()
    dp = nn.DataParallel(s)
    assert unwrap_model(dp) is s
    t = EMATeacher(dp, momentum=0.0)
    assert list(t.state_dict()) == list(s.state_dict())
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(s)
        assert unwrap_model(ddp) is s
        with torch.no_grad():
            for p in s.parameters():
                p.add_(1.0)
        t.update(ddp)
        for k, p in s.named_parameters():
            assert torch.equal(dict(t.module.named_parameters())[k], p)
    finally:
        dist.destroy_process_group()
