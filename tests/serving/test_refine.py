"""Full-resolution refinement of box-prompted masks (serving/inference/refine.py): the guided
filter against hand-computed cases, the full-resolution probabilities against the paste
pipeline, a mask smaller than a clear-coloured object growing to it inside its box, and the
bounded working size of a huge box."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from serving.inference import refine
from serving.inference.box_scale import Crop
from serving.inference.paste import mask_crops


def _disc(size: int, centre: tuple[float, float], radius: float) -> np.ndarray:
    ys, xs = np.mgrid[:size, :size] + 0.5
    return (ys - centre[0]) ** 2 + (xs - centre[1]) ** 2 < radius ** 2


def test_guided_filter_keeps_a_constant_and_averages_under_a_flat_guide():
    rng = torch.Generator().manual_seed(0)
    guide = torch.rand((3, 20, 30), generator=rng)
    flat = torch.full((20, 30), 0.7)
    torch.testing.assert_close(refine.guided_filter(guide, flat, 3), flat)
    # one colour everywhere: a = 0, b = the window mean of p; output = the mean of b
    probs = torch.rand((20, 30), generator=rng)
    grey = torch.full((3, 20, 30), 0.5)
    padded = F.pad(probs[None, None], (2, 2, 2, 2), mode="replicate")
    window_mean = F.avg_pool2d(padded, 5, stride=1)
    twice = F.avg_pool2d(F.pad(window_mean, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    torch.testing.assert_close(refine.guided_filter(grey, probs, 2), twice[0, 0], atol=1e-5,
                               rtol=0)


def test_guided_filter_follows_a_colour_edge():
    guide = torch.zeros((3, 9, 40))
    guide[0, :, 20:] = 1.0  # red from column 20 on
    probs = torch.zeros((9, 40))
    probs[:, 24:] = 1.0  # the mask's edge 4 px right of the colour edge
    out = refine.guided_filter(guide, probs, 6, eps=1e-4)[4]
    blur = F.avg_pool2d(F.pad(probs[None, None], (6, 6, 6, 6), mode="replicate"), 13, 1)[0, 0, 4]
    assert blur[18] > 0.05 and out[:20].abs().max() < 1e-3  # nothing bleeds across the colour
    jumps = out[1:] - out[:-1]
    assert int(jumps.argmax()) == 19 and jumps[19] > 0.3  # the sharpest step is on it
    assert int(torch.nonzero(out > 0.5)[0]) < 24  # and the outline moved towards it


def _reference_guided_filter(guide: np.ndarray, probs: np.ndarray, r: int,
                             eps: float) -> np.ndarray:
    """He et al.'s colour guided filter written out per window in float64, edges replicated
    (a window's rows and columns clipped to the image, repeats kept): each window's ridge
    fit ``p ~ a . I + b`` by a 3x3 solve, then the mean of the fits over each window."""
    h, w = probs.shape
    colours_of = guide.astype(np.float64).transpose(1, 2, 0)
    values_of = probs.astype(np.float64)

    def window(y: int, x: int) -> tuple[np.ndarray, np.ndarray]:
        return (np.clip(np.arange(y - r, y + r + 1), 0, h - 1),
                np.clip(np.arange(x - r, x + r + 1), 0, w - 1))

    coeffs = np.zeros((h, w, 4))
    for y in range(h):
        for x in range(w):
            ys, xs = window(y, x)
            colours = colours_of[np.ix_(ys, xs)].reshape(-1, 3)
            values = values_of[np.ix_(ys, xs)].reshape(-1)
            cov = np.cov(colours.T, bias=True) + eps * np.eye(3)
            gap = ((colours - colours.mean(0)) * (values - values.mean())[:, None]).mean(0)
            a = np.linalg.solve(cov, gap)
            coeffs[y, x] = (*a, values.mean() - a @ colours.mean(0))
    out = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            mean = coeffs[np.ix_(*window(y, x))].reshape(-1, 4).mean(0)
            out[y, x] = mean[:3] @ colours_of[y, x] + mean[3]
    return out


@pytest.mark.parametrize("shape, radius", [((1, 1), 1), ((3, 80), 5), ((7, 5), 9),
                                           ((40, 33), 4)])
def test_box_mean_matches_a_float64_window_mean(shape, radius):
    """Each pixel's mean over its (2r+1)^2 window, the image's edge pixels repeated beyond it
    (also for windows larger than the map)."""
    x = torch.from_numpy(np.random.default_rng(radius).normal(size=(2, *shape)).astype(np.float32))
    padded = np.pad(x.double().numpy(), ((0, 0), (radius, radius), (radius, radius)), "edge")
    k = 2 * radius + 1
    want = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(1, 2)).mean((-2, -1))
    np.testing.assert_allclose(refine._box_mean(x, radius).numpy(), want, atol=1e-6)


def test_guided_filter_matches_a_per_window_float64_reference():
    rng = np.random.default_rng(0)
    guide = rng.random((3, 14, 17)).astype(np.float32)
    guide[:, :, 9:] += 0.5  # a colour edge, and colours away from zero
    probs = rng.random((14, 17)).astype(np.float32)
    got = refine.guided_filter(torch.from_numpy(guide), torch.from_numpy(probs), 3, eps=0.01)
    want = _reference_guided_filter(guide, probs, 3, 0.01)
    np.testing.assert_allclose(got.numpy(), want, atol=2e-6, rtol=0)


@pytest.mark.parametrize("radius", [3, 16])
def test_the_filter_of_colours_in_0_255_with_eps_scaled_is_the_filter_in_0_1(radius):
    """``box_view`` fits on colours in 0..255 with ``EPS * 255 ** 2``: the same filter as on
    colours in 0..1 with ``EPS`` (the ridge regression is invariant under scaling the guide
    with the regulariser), at its own size and on the area-averaged path."""
    rng = np.random.default_rng(radius)
    colours = torch.from_numpy(rng.integers(0, 256, (3, 70, 90)).astype(np.float32))
    colours[:, :, 40:] //= 3  # an edge
    probs = torch.from_numpy(rng.random((70, 90)).astype(np.float32))
    unit = refine.guided_filter(colours / 255, probs, radius)
    raw = refine.guided_filter(colours, probs, radius, eps=refine.EPS * 255 ** 2)
    np.testing.assert_allclose(raw.numpy(), unit.numpy(), atol=2e-5, rtol=0)


def test_a_large_radius_is_fitted_on_area_averaged_maps_and_still_follows_the_edge():
    """Radius 16 (the fast guided filter, fitted at a quarter of the size): the output stays
    close to the filter at full resolution and its sharpest step is still on the colour
    edge (at the guide's full resolution, not the coarse grid's)."""
    guide = torch.zeros((3, 64, 160))
    guide[1, :, 81:] = 1.0  # green from column 81 on (not on the 4 px grid)
    probs = torch.zeros((64, 160))
    probs[:, 90:] = 1.0
    fast = refine.guided_filter(guide, probs, 16, eps=1e-4)
    exact = refine._coefficients(guide, probs, 16, 1e-4)
    exact = (exact[:3] * guide).sum(0) + exact[3]
    assert refine.SUBSAMPLE_RADIUS * 2 <= 16  # this radius takes the subsampled path
    assert (fast - exact).abs().mean() < 0.02
    row = fast[32]
    assert int((row[1:] - row[:-1]).argmax()) == 80  # the step between columns 80 and 81


def test_colour_codes_quantise_each_channel():
    pixels = torch.tensor([[[0, 0, 0], [255, 255, 255], [31, 32, 224]]], dtype=torch.float32)
    assert refine.colour_codes(pixels).tolist() == [[0, 511, (0 * 8 + 1) * 8 + 7]]
    # uint8 (integer arithmetic, numpy) and float pixels fall in the same bins, every value
    values = np.arange(256, dtype=np.uint8)
    every = np.stack([values, values[::-1], np.roll(values, 77)], -1)[None]  # (1, 256, 3)
    as_float = refine.colour_codes(torch.from_numpy(every).float())
    assert torch.equal(refine.colour_codes(every), as_float)
    assert torch.equal(refine.colour_codes(every.astype(np.float32)), as_float)  # numpy float
    assert torch.equal(refine.colour_codes(torch.from_numpy(every)), refine.colour_codes(every))
    for levels in (2, 5, 16, 32, 64, np.int64(8)):  # shifts (powers of 2 to 32), or floats
        expected = refine.colour_codes(torch.from_numpy(every).float(), levels)
        assert torch.equal(refine.colour_codes(every, levels), expected)
        assert int(expected.max()) < levels ** 3


def test_colour_model_against_a_per_pixel_reference():
    """Two histograms weighted by p (box) and 1 - p (box) or 1 (margin), one pseudo-count
    per colour, the log-ratio weighted by the histograms' total variation distance."""
    rng = np.random.default_rng(3)
    codes = torch.from_numpy(rng.integers(0, 4, (9, 11)))  # 4 of the 512 colours used
    probs = torch.from_numpy(rng.random((9, 11)).astype(np.float32))
    inside = np.zeros((9, 11), bool)
    inside[2:7, 3:9] = True
    p = probs.numpy().astype(np.float64).clip(refine.PROB_EPS, 1 - refine.PROB_EPS)
    bins = refine.COLOUR_LEVELS ** 3
    fore, back = np.zeros(bins), np.zeros(bins)
    for (y, x), c in np.ndenumerate(codes.numpy()):
        fore[c] += p[y, x] if inside[y, x] else 0.0
        back[c] += 1 - p[y, x] if inside[y, x] else 1.0
    d = np.abs(fore / fore.sum() - back / back.sum()).sum() / 2
    ratio = np.log((fore + 1) / (fore.sum() + bins)) - np.log((back + 1) / (back.sum() + bins))
    logit = np.log(p / (1 - p)) + 2.0 * d * ratio[codes.numpy()]
    got = refine.colour_model(probs, codes, inside, weight=2.0)
    assert np.allclose(got.numpy(), 1 / (1 + np.exp(-logit)), atol=1e-5)
    assert 0 < d < 1


def test_colour_model_keeps_the_mask_where_colours_do_not_separate():
    codes = torch.zeros((10, 10), dtype=torch.int64)  # one flat colour: distance 0
    probs = torch.linspace(0.01, 0.99, 100).reshape(10, 10)
    inside = np.ones((10, 10), bool)
    inside[0] = False
    assert torch.allclose(refine.colour_model(probs, codes, inside), probs, atol=1e-6)


def test_colour_model_is_skipped_without_weight_or_object_side():
    probs = torch.rand(5, 6)
    codes = torch.arange(30).reshape(5, 6)
    inside = np.zeros((5, 6), bool)
    assert refine.colour_model(probs, codes, inside) is probs  # no pixel inside the box
    inside[1:4, 1:5] = True
    assert refine.colour_model(probs, codes, inside, weight=0.0) is probs
    assert not torch.equal(refine.colour_model(probs, codes, inside), probs)


def test_a_filled_ring_loses_its_hole_of_background_colour():
    """The network fills a ring (its hole is the background's colour, as around it): the
    colour model takes the hole out, the ring stays."""
    size = 96
    ring = _disc(size, (48, 48), 28) & ~_disc(size, (48, 48), 12)
    image = np.where(ring[..., None], [230, 200, 40], [60, 40, 160]).astype(np.uint8)
    filled = torch.from_numpy(np.where(_disc(size // 4, (12, 12), 7), 0.8, 0.05)
                              .astype(np.float32))
    source = refine.Source(filled, (0, 0, size, size), (size, size))
    box = np.array([20, 20, 76, 76], np.float32)
    raw_view, view = refine.box_view(image, [source], box, refine=False), refine.box_view(
        image, [source], box)
    # the view keeps the network's own probabilities and the colour codes beside the refined
    assert torch.equal(view.network, raw_view.probs) and raw_view.network is raw_view.probs
    assert torch.equal(view.codes, refine.colour_codes(view.pixels))
    raw = refine.region_mask(raw_view, box, (size, size), 0.5).dense()[0]
    got = refine.region_mask(view, box, (size, size), 0.5).dense()[0]
    hole = _disc(size, (48, 48), 10)
    assert raw[hole].all() and not got[hole].any()
    assert got[ring & _disc(size, (48, 48), 26) & ~_disc(size, (48, 48), 14)].mean() > 0.95


def test_full_resolution_probabilities_match_the_paste_pipeline():
    rng = np.random.default_rng(1)
    probs = torch.from_numpy(rng.random((1, 1, 12, 16), np.float32))
    probs = F.avg_pool2d(probs, 3, stride=1, padding=1, count_include_pad=False)[0]  # smooth
    resized, orig = (45, 61), (97, 131)  # the window at the input, the window itself
    want = mask_crops(probs, resized, orig, 0.5).dense()[0]
    source = refine.Source(probs[0], (0, 0, orig[1], orig[0]), resized)
    got = refine.box_probs(source, (0, 0, *orig), orig[1], orig)
    assert ((got > 0.5).numpy() != want).mean() < 1e-3  # float rounding at the threshold only


def test_a_mask_smaller_than_a_clear_object_grows_to_it_and_stays_in_the_box():
    size = 96
    obj = _disc(size, (48, 48), 24)
    image = np.where(obj[..., None], [220, 40, 40], [40, 60, 200]).astype(np.uint8)
    # the network's probabilities: a disc of radius 21 (3 px short of the object), blurred
    small = torch.from_numpy(_disc(size // 4, (12, 12), 21 / 4).astype(np.float32))
    probs = F.avg_pool2d(small[None, None], 3, stride=1, padding=1)[0, 0]
    source = refine.Source(probs, (0, 0, size, size), (size, size))
    box = np.array([26, 26, 70, 70], np.float32)  # a box cutting the object's rim
    raw = refine.box_view(image, [source], box, refine=False)
    refined = refine.box_view(image, [source], box)
    assert raw.mask_probs is not None and refined.mask_probs is not None
    assert raw.region == (19, 19, 77, 77)  # 0.15 x 44 px margin
    before = refine.region_mask(raw, box, (size, size), 0.5).dense()[0]
    after = refine.region_mask(refined, box, (size, size), 0.5).dense()[0]
    in_box = refine.grid_inside((0, 0, size, size), (size, size), box)
    inside = obj & in_box

    def iou(a, b):
        return (a & b).sum() / (a | b).sum()

    assert iou(before, inside) < 0.8 and iou(after, inside) > 0.9
    assert after.sum() > before.sum()
    assert not after[~in_box].any()


def test_a_large_box_is_fitted_on_the_grid_and_cut_at_full_resolution():
    """A 300 px object seen by the network at 16 px per cell (a blocky, blurred outline):
    the colour model and the filter's fit run on a grid of about ``GRID_PIXELS`` cells,
    the mask is cut from the full-resolution output and follows the object's own edge."""
    size = 400
    obj = _disc(size, (200, 200), 150)
    image = np.where(obj[..., None], [200, 60, 50], [40, 90, 170]).astype(np.uint8)
    coarse = torch.from_numpy(_disc(25, (12.5, 12.5), 150 / 16).astype(np.float32))
    probs = F.avg_pool2d(coarse[None, None], 3, stride=1, padding=1,
                         count_include_pad=False)[0, 0]
    source = refine.Source(probs, (0, 0, size, size), (100, 100))  # 4 input px a cell
    box = np.array([50, 50, 350, 350], np.float32)
    raw = refine.box_view(image, [source], box, refine=False)
    view = refine.box_view(image, [source], box)
    y0, x0, y1, x1 = view.region
    assert (y1 - y0) * (x1 - x0) > refine.FULL_PIXELS  # seen on the grid
    assert view.probs.shape == view.inside.shape and view.probs.numel() <= refine.GRID_PIXELS
    assert tuple(view.mask_probs.shape) == (y1 - y0, x1 - x0)
    before = refine.region_mask(raw, box, (size, size), 0.5).dense()[0]
    after = refine.region_mask(view, box, (size, size), 0.5).dense()[0]
    wrong_before, wrong_after = (before != obj).sum(), (after != obj).sum()
    assert wrong_after < 0.3 * wrong_before and wrong_after < 0.002 * obj.sum()


def test_a_thin_box_keeps_cells_across_it_on_the_grid():
    """A 3 px wide, 3000 px long bar: the grid keeps at least ``MIN_BOX_CELLS`` cells across
    the box (here every pixel), so the colour model and the score see the bar."""
    from serving.inference import quality

    image = np.empty((3600, 100, 3), np.uint8)
    image[:] = (40, 90, 170)
    image[300:3300, 50:53] = (200, 60, 50)
    probs = torch.zeros((900, 25))
    probs[75:825, 12:14] = 0.9  # the network's bar, at stride 4
    source = refine.Source(probs, (0, 0, 100, 3600), (3600, 100))
    box = np.array([50, 300, 53, 3300], np.float32)
    view = refine.box_view(image, [source], box)
    y0, x0, y1, x1 = view.region
    assert (y1 - y0) * (x1 - x0) > refine.FULL_PIXELS
    assert view.probs.shape[1] == x1 - x0 and view.probs.shape[0] < y1 - y0
    assert view.inside.any(1).sum() > 0 and view.inside.any(0).sum() == 3
    mask = refine.region_mask(view, box, (3600, 100), 0.5).dense()[0]
    assert mask[300:3300, 50:53].mean() > 0.99 and not mask[:, :50].any()
    result = type("Result", (), {"score": 0.9})()
    crop = Crop(0, 1.0, source.window, source.resized, box)
    assert quality.quality_score([(crop, result)], view, 0.5) > 0.05


def test_a_region_within_the_grid_is_refined_at_its_own_pixels():
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    source = refine.Source(torch.rand((16, 16), generator=torch.Generator().manual_seed(0)),
                           (0, 0, 64, 64), (64, 64))
    view = refine.box_view(image, [source], np.array([10, 10, 50, 54], np.float32))
    assert view.mask_probs is view.probs and view.probs.shape == view.inside.shape
    assert tuple(view.probs.shape) == (view.region[2] - view.region[0],
                                       view.region[3] - view.region[1])


def test_a_huge_box_is_only_scored_on_a_small_grid_and_keeps_the_network_mask(monkeypatch):
    monkeypatch.setattr(refine, "guided_coefficients",
                        lambda *a, **k: pytest.fail("filtered"))
    monkeypatch.setattr(refine, "colour_model", lambda *a, **k: pytest.fail("colour model"))
    image = np.zeros((3000, 2000, 3), np.uint8)
    source = refine.Source(torch.full((75, 50), 0.9), (0, 0, 2000, 3000), (300, 200))
    box = np.array([10, 10, 1990, 2990])
    view = refine.box_view(image, [source], box)
    assert view.probs.shape == view.pixels.shape[:2] == view.inside.shape
    assert view.probs.numel() <= 1.01 * refine.GRID_PIXELS and (view.probs > 0.5).all()
    assert view.mask_probs is None and view.region == (0, 0, 3000, 2000)
    with pytest.raises(ValueError, match="full-resolution"):
        refine.region_mask(view, box, (3000, 2000), 0.5)


@pytest.mark.parametrize("side", [10, 23])
def test_small_boxes_are_not_filtered(monkeypatch, side):
    monkeypatch.setattr(refine, "guided_coefficients",
                        lambda *a, **k: pytest.fail("filtered"))
    image = np.zeros((64, 64, 3), np.uint8)
    source = refine.Source(torch.full((16, 16), 0.9), (0, 0, 64, 64), (64, 64))
    refine.box_view(image, [source], np.array([5, 5, 5 + side, 5 + side], np.float32))


def test_segmenter_refines_by_default_and_can_turn_it_off(tiny_checkpoint, sample_image,
                                                           monkeypatch):
    from serving import Segmenter

    calls = []
    real = refine.guided_coefficients
    monkeypatch.setattr(refine, "guided_coefficients", lambda *a: calls.append(1) or real(*a))
    seg = Segmenter.load(tiny_checkpoint, device="cpu")
    raw = seg.with_box_scale(True, refine=False)
    assert seg.refine and not raw.refine and raw.box_scale
    assert not raw.with_box_scale(True).refine  # kept unless asked
    boxes = np.array([[30, 20, 80, 60], [90, 50, 150, 110]], np.float32)  # both >= 24 px
    raw.predict(sample_image, boxes=boxes)
    assert not calls
    seg.predict(sample_image, boxes=boxes)
    assert len(calls) == 2  # once per box
