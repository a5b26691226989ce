"""Known-answer tests of the prototype memory (training/sim/prototypes.py, SIM_SPEC 7.2-7.7)."""

from __future__ import annotations

import io
import math

import torch
from sim_testing import run_two_processes

from training.sim.prototypes import PrototypeMemory, l2_normalize_vectors


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def test_l2_normalize_vectors_per_vector_not_along_l() -> None:
    x = torch.tensor([[[3.0, 4.0], [0.0, 2.0]]])  # (C=1, L=2, D=2)
    y = l2_normalize_vectors(x)
    torch.testing.assert_close(y, torch.tensor([[[0.6, 0.8], [0.0, 1.0]]]))
    torch.testing.assert_close(y.norm(dim=-1), torch.ones(1, 2))


def test_init_deterministic_unit_norm_and_checkpointed() -> None:
    a, b, c = PrototypeMemory(4, seed=3), PrototypeMemory(4, seed=3), PrototypeMemory(4, seed=4)
    assert a.prototypes.shape == (4, 10, 16)
    torch.testing.assert_close(a.prototypes.norm(dim=-1), torch.ones(4, 10))
    assert torch.equal(a.prototypes, b.prototypes)
    assert not torch.equal(a.prototypes, c.prototypes)
    assert "prototypes" in a.state_dict() and len(list(a.parameters())) == 0
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    c.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(c.prototypes, a.prototypes)


def test_single_prototype_update_by_hand() -> None:
    mem = PrototypeMemory(num_classes=2, num_prototypes=1, dim=4, momentum=0.9, seed=0)
    before = mem.prototypes.clone()
    g = torch.Generator().manual_seed(1)
    feats = _normalize(torch.randn(7, 4, generator=g))
    labels = torch.ones(7, dtype=torch.long)
    assigned = mem.update(feats, labels)
    assert assigned.tolist() == [0] * 7
    expected = _normalize(0.9 * before[1, 0] + 0.1 * _normalize(feats.mean(dim=0)))
    torch.testing.assert_close(mem.prototypes[1, 0], expected)
    assert torch.equal(mem.prototypes[0], before[0])  # class without pixels: untouched


def test_clustered_update_moves_each_prototype_to_its_cluster() -> None:
    mem = PrototypeMemory(num_classes=3, num_prototypes=3, dim=8, momentum=0.99, seed=2)
    before = mem.prototypes.clone()
    g = torch.Generator().manual_seed(3)
    # 3 equal clusters around the 3 prototypes of class 2, 10 pixels each.
    feats = _normalize(before[2].repeat_interleave(10, dim=0)
                       + 0.05 * torch.randn(30, 8, generator=g))
    labels = torch.full((30,), 2, dtype=torch.long)
    assigned = mem.update(feats, labels)
    assert assigned.tolist() == [0] * 10 + [1] * 10 + [2] * 10
    for l in range(3):
        centroid = _normalize(feats[10 * l:10 * (l + 1)].sum(dim=0))
        expected = _normalize(0.99 * before[2, l] + 0.01 * centroid)
        torch.testing.assert_close(mem.prototypes[2, l], expected)
    assert torch.equal(mem.prototypes[:2], before[:2])
    torch.testing.assert_close(mem.prototypes.norm(dim=-1), torch.ones(3, 3))


def test_prototype_without_pixels_is_unchanged() -> None:
    # 2 pixels, 4 prototypes: at most 2 prototypes receive a pixel, the others stay identical.
    mem = PrototypeMemory(num_classes=1, num_prototypes=4, dim=4, seed=5)
    before = mem.prototypes.clone()
    feats = _normalize(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    assigned = mem.update(feats, torch.zeros(2, dtype=torch.long))
    hit = set(assigned.tolist())
    for l in range(4):
        same = torch.equal(mem.prototypes[0, l], before[0, l])
        assert same == (l not in hit)


def test_empty_update_is_noop() -> None:
    mem = PrototypeMemory(num_classes=2, seed=0)
    before = mem.prototypes.clone()
    out = mem.update(torch.zeros(0, 16), torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,) and torch.equal(mem.prototypes, before)




def _clustered_pixels(seed: int) -> tuple[torch.Tensor, torch.Tensor, PrototypeMemory]:
    mem = PrototypeMemory(num_classes=3, num_prototypes=3, dim=8, momentum=0.9, seed=seed)
    g = torch.Generator().manual_seed(seed + 10)
    labels = torch.tensor([0] * 12 + [1] * 18 + [2] * 9)
    which = torch.randint(3, (39,), generator=g)
    feats = _normalize(mem.prototypes[labels, which] + 0.1 * torch.randn(39, 8, generator=g))
    return feats, labels, mem


def test_distributed_update_equals_single_process() -> None:
    feats, labels, ref = _clustered_pixels(seed=7)
    init = ref.prototypes.clone()
    ref.update(feats, labels)
    # Process 0 sees classes 0 and 1 only, process 1 sees classes 1 and 2.
    splits = [torch.arange(0, 20), torch.arange(20, 39)]

    def step(rank: int, all_reduce_sum) -> torch.Tensor:
        mem = PrototypeMemory(num_classes=3, num_prototypes=3, dim=8, momentum=0.9)
        mem.prototypes.copy_(init)
        idx = splits[rank]
        mem.update(feats[idx], labels[idx], all_reduce_sum=all_reduce_sum)
        return mem.prototypes

    p0, p1 = run_two_processes(step)
    assert torch.equal(p0, p1)
    torch.testing.assert_close(p0, ref.prototypes)
    assert not torch.equal(p0, init)


def test_distributed_update_with_an_empty_process() -> None:
    feats, labels, ref = _clustered_pixels(seed=8)
    init = ref.prototypes.clone()
    ref.update(feats, labels)

    def step(rank: int, all_reduce_sum) -> torch.Tensor:
        mem = PrototypeMemory(num_classes=3, num_prototypes=3, dim=8, momentum=0.9)
        mem.prototypes.copy_(init)
        f, lab = (feats, labels) if rank == 0 else (feats[:0], labels[:0])
        mem.update(f, lab, all_reduce_sum=all_reduce_sum)
        return mem.prototypes

    p0, p1 = run_two_processes(step)
    assert torch.equal(p0, p1)
    torch.testing.assert_close(p0, ref.prototypes)


def test_assign_features_drive_the_assignment_only() -> None:
    # Student pixels 0-4 lie near prototype 0 and 5-9 near prototype 1, but the assignment
    # features are swapped, so prototype 0 receives the centroid of student pixels 5-9.
    mem = PrototypeMemory(num_classes=1, num_prototypes=2, dim=8, momentum=0.5, seed=0)
    before = mem.prototypes.clone()
    g = torch.Generator().manual_seed(4)
    noise = 0.05 * torch.randn(10, 8, generator=g)
    feats = _normalize(before[0].repeat_interleave(5, dim=0) + noise)
    swapped = torch.cat([feats[5:], feats[:5]])
    assigned = mem.update(feats, torch.zeros(10, dtype=torch.long), assign_features=swapped)
    assert assigned.tolist() == [1] * 5 + [0] * 5
    torch.testing.assert_close(
        mem.prototypes[0, 0], _normalize(0.5 * before[0, 0] + 0.5 * _normalize(feats[5:].sum(0))))
    torch.testing.assert_close(
        mem.prototypes[0, 1], _normalize(0.5 * before[0, 1] + 0.5 * _normalize(feats[:5].sum(0))))


def test_semantic_map_known_values() -> None:
    mem = PrototypeMemory(num_classes=2, num_prototypes=3, dim=4, tau=0.1, seed=0)
    feats = _normalize(torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1)))
    feats = feats.permute(0, 2, 1).reshape(2, 4, 3, 1).clone()  # (B=2, D=4, H=3, W=1)
    feats[1, :, 2, 0] = mem.prototypes[1, 2]  # image 1, pixel (2, 0) equals prototype (1, 2)
    labels = torch.tensor([1, 0, 1])
    image_index = torch.tensor([1, 0, 0])
    ms = mem.semantic_map(feats, labels, image_index)
    assert ms.shape == (3, 3, 1) and ms.dtype == torch.float32
    assert math.isclose(float(ms[0, 2, 0]), 1.0 / (1.0 + math.exp(-10.0)), rel_tol=1e-6)
    for i, (c, b) in enumerate(zip(labels.tolist(), image_index.tolist(), strict=True)):
        for y in range(3):
            cos = max(float(feats[b, :, y, 0] @ mem.prototypes[c, l]) for l in range(3))
            assert math.isclose(float(ms[i, y, 0]), 1 / (1 + math.exp(-cos / 0.1)), rel_tol=1e-5)
    assert mem.semantic_map(feats, labels[:0], image_index[:0]).shape == (0, 3, 1)
