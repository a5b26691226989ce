"""``mask_crops``: masks computed per instance inside their region equal the whole-image
pipeline bit for bit (every kernel variant and the fallback), and hold only their extent."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sim_testing import assert_same_predictions, reference_postprocess_masks, use_reference_pipeline

import serving.inference.bilinear as bilinear
import serving.inference.paste as paste
import serving.inference.paste_groups as paste_groups
import serving.inference.workers as workers
from serving import Segmenter
from serving.inference.bilinear import aligned_axis, cpu_fused, fma32, grid, resize_axis, sample
from serving.inference.paste import mask_crops
from serving.inference.transforms import resized_shape
from serving.model.ops import aligned_bilinear


def blob_probs(count: int, stride4: tuple[int, int], seed: int) -> torch.Tensor:
    """(count, h4, w4) probabilities: a Gaussian blob of random place and size on low noise,
    like a real mask (every third one plain uniform noise, every fifth with rows of 0.5)."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    h4, w4 = stride4
    yy, xx = torch.meshgrid(torch.arange(h4), torch.arange(w4), indexing="ij")
    probs = torch.rand((count, h4, w4), generator=gen)
    for k in range(count):
        if (seed + k) % 3:
            cy, cx, r = rng.random() * h4, rng.random() * w4, 0.5 + rng.random() * h4 / 3
            blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
            probs[k] = 0.9 * blob + 0.1 * probs[k]
    if seed % 5 == 0:
        probs[:, ::2] = 0.5  # exactly at the threshold: background
    return probs


def random_boxes(count: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1)
    h0, w0 = size
    boxes = torch.rand((count, 4), generator=gen) * torch.tensor([w0, h0, w0, h0]) * 0.6
    boxes[:, 2:] += boxes[:, :2] * 0.5 + 1.0
    return boxes


CASES = [  # (stride-4 map, resized, original)
    ((8, 8), (30, 31), (30, 31)),          # same size, small map (PyTorch's small kernel)
    ((40, 52), (157, 205), (157, 205)),    # same size, large map: windows of the map
    ((25, 34), (100, 133), (600, 800)),    # x6 upscale, like 8000x6000 at 1333
    ((40, 52), (157, 205), (61, 45)),      # downscale
    ((8, 8), (30, 31), (40, 70)),          # original h + w <= 128: whole-image path
    ((1, 1), (1, 1), (1, 1)),
    ((36, 9), (141, 33), (900, 200)),      # tall and thin
    ((16, 16), (64, 64), (96, 128)),       # mild upscale: groups that span two cells
    ((32, 48), (128, 190), (101, 149)),    # mild downscale
]


def assert_equal_to_reference(probs, resized, orig, boxes) -> None:
    expected = reference_postprocess_masks(probs, resized, orig, 0.5, boxes).numpy()
    got = mask_crops(probs, resized, orig, 0.5, boxes)
    assert got.image_size == orig and len(got) == len(probs)
    assert np.array_equal(got.dense(), expected)
    for i, crop in enumerate(got.crops):  # tight: every border row and column has a pixel
        if crop.size:
            assert crop[0].any() and crop[-1].any() and crop[:, 0].any() and crop[:, -1].any()
        else:
            assert not expected[i].any()


@pytest.fixture(params=["dense views", "crops"])
def expansion(request, monkeypatch) -> str:
    """Both ways of writing the masks: all at once (crops are views) or crop by crop."""
    if request.param == "crops":
        monkeypatch.setattr(paste, "DENSE_VIEW_BYTES", 0)
        monkeypatch.setattr(paste, "DENSE_VIEW_RATIO", 0)
    return request.param


@pytest.mark.parametrize("stride4, resized, orig", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_crops_equal_the_whole_image_pipeline(stride4, resized, orig, seed,
                                                   expansion) -> None:
    probs = blob_probs(4, stride4, seed)
    for boxes in (None, random_boxes(4, orig, seed)):
        assert_equal_to_reference(probs, resized, orig, boxes)


@pytest.mark.parametrize("variant", [True, False, None])
def test_every_kernel_variant_and_the_fallback_give_the_same_masks(monkeypatch, variant):
    """Forcing the other operation order makes only a few pixels' floats differ (the exact
    recomputation runs); ``None`` forces the whole-image fallback. Only the variant this
    process really has must match the reference: the masks agree for all three here because
    a variant's order changes values by ~1e-7, far from the threshold on these maps."""
    monkeypatch.setitem(bilinear._VARIANT, "cpu", variant)
    probs = blob_probs(3, (25, 34), 3)
    assert_equal_to_reference(probs, (100, 133), (300, 400), random_boxes(3, (300, 400), 3))


def test_this_cpu_has_a_reproduced_kernel_variant() -> None:
    """Otherwise every mask would take the slower whole-image fallback."""
    assert cpu_fused() is not None


def test_exact_resize_reproduces_f_interpolate() -> None:
    fused = cpu_fused()
    gen = torch.Generator().manual_seed(5)
    # outputs with h + w > 128 (smaller ones take PyTorch's other kernel; mask_crops too)
    for size, out in (((37, 51), (311, 97)), ((100, 133), (601, 799)), ((90, 70), (61, 97))):
        x = torch.rand(size, generator=gen)
        ref = F.interpolate(x[None, None], size=out, mode="bilinear", align_corners=False)[0, 0]
        ys, xs = grid(resize_axis(size[0], out[0], fused), resize_axis(size[1], out[1], fused))
        got = sample(x.numpy()[None], 0, ys, xs, fused)
        assert np.array_equal(got.reshape(out), ref.numpy())


def test_exact_aligned_upsampling_reproduces_aligned_bilinear() -> None:
    """Every map of a batch, cropped to a resized size (as the pipeline crops it)."""
    fused = cpu_fused()
    x = torch.rand((3, 1, 21, 34), generator=torch.Generator().manual_seed(6))
    ref = aligned_bilinear(x, 4)[:, 0, :81, :133].numpy()
    ys, xs = grid(aligned_axis(21, 81), aligned_axis(34, 133))
    for k in range(3):
        got = sample(x[:, 0].numpy(), k, ys, xs, fused).reshape(81, 133)
        assert np.array_equal(got, ref[k])


def test_fma32_rounds_once() -> None:
    a = np.float32(1 + 2.0 ** -12)
    # a*a = 1 + 2^-11 + 2^-24: two roundings lose the 2^-24 term, one keeps it
    assert fma32(np.array([a]), np.array([a]), np.array([-(1 + 2.0 ** -11)], np.float32))[
        0] == np.float32(2.0 ** -24)
    # a*a is a float32 midpoint; + 2^-80 must round up (float64 alone would tie to even)
    got = fma32(np.array([a]), np.array([a]), np.array([2.0 ** -80], np.float32))[0]
    assert got == np.float32(1 + 2.0 ** -11 + 2.0 ** -23)


def test_prompted_crops_stay_inside_their_boxes_and_memory_follows_the_boxes(expansion) -> None:
    probs = torch.full((3, 25, 34), 0.9)  # every pixel above the threshold
    boxes = torch.tensor([[10.0, 20.0, 110.0, 70.0], [0.0, 0.0, 800.0, 600.0],
                          [700.2, 500.7, 799.5, 599.5]])
    crops = mask_crops(probs, (100, 133), (600, 800), 0.5, boxes)
    assert [c.shape for c in crops.crops] == [(50, 100), (600, 800), (99, 100)]
    assert crops.offsets.tolist() == [[20, 10], [0, 0], [501, 700]]
    assert crops.nbytes == 50 * 100 + 600 * 800 + 99 * 100


def test_empty_masks_cost_nothing() -> None:
    crops = mask_crops(torch.zeros((5, 25, 34)), (100, 133), (6000, 8000), 0.5)
    assert len(crops) == 5 and crops.nbytes == 0 and crops.areas().tolist() == [0] * 5


@pytest.fixture(scope="module")
def segmenter(tiny_checkpoint) -> Segmenter:
    # prompted masks unrefined: the full-resolution refinement replaces this pipeline for
    # the boxes it refines (tests/serving/test_refine.py)
    return Segmenter.from_checkpoint(tiny_checkpoint, device="cpu").with_box_scale(
        True, refine=False)


def test_segmenter_masks_equal_the_whole_image_pipeline(segmenter, monkeypatch) -> None:
    """``predict`` through the fast pre- and post-processing == ``predict`` with the
    straightforward ones (full-size masks): resized (the 150x230 image is resized to the tiny
    model's input size) and not resized, automatic and prompted, one image and a batch."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (150, 230, 3), dtype=np.uint8)
    image[30:100, 40:150] = (230, 40, 40)
    h, w = resized_shape(150, 230, segmenter.cfg.min_size, segmenter.cfg.max_size)
    small = np.ascontiguousarray(image[:h, :w])  # already at the input size: no resize
    boxes = [[40, 30, 150, 100], [0, 0, 230, 150], [100.5, 60.2, 180.7, 140.1]]

    def run():
        return [segmenter.predict(image), segmenter.predict(image, boxes=boxes),
                segmenter.predict(small), segmenter.predict(small, boxes=boxes[:1]),
                *segmenter.predict_batch([image, image[::-1].copy()], batch_size=2)]

    calls = {"exact": 0, "dense": 0}

    def counted(name, fn):
        def wrapper(*a):
            calls[name] += 1
            return fn(*a)
        return wrapper

    monkeypatch.setattr(paste, "_crops_exact", counted("exact", paste._crops_exact))
    monkeypatch.setattr(paste, "_crops_dense", counted("dense", paste._crops_dense))
    new = run()
    # Every prediction took the fast path (box prompts may paste the image and crops of it
    # at another scale, one call each), never the dense fallback.
    assert calls["exact"] >= 6 and calls["dense"] == 0
    use_reference_pipeline(monkeypatch)
    old = run()
    for a, b in zip(new, old, strict=True):
        assert_same_predictions(a, b)
    assert new[1].masks.any() and new[2].masks.any()


def test_edges_in_small_chunks_give_the_same_masks(monkeypatch, expansion) -> None:
    """Edge groups interpolated a few at a time (the memory bound for large images)."""
    monkeypatch.setattr(paste, "EDGE_PIXELS", 1000)
    probs = blob_probs(4, (25, 34), 1)
    assert_equal_to_reference(probs, (100, 133), (600, 800), random_boxes(4, (600, 800), 1))
    assert_equal_to_reference(probs, (100, 133), (600, 800), None)


@pytest.mark.parametrize("threads", [2, 3])
def test_masks_cut_in_parallel_chunks_are_the_same_masks_in_order(monkeypatch, threads,
                                                                  expansion) -> None:
    """Many masks of a large image are cut in chunks on several threads: each chunk's masks
    (and clip boxes) stay with their index, and every mask equals the reference."""
    monkeypatch.setattr(paste, "PARALLEL_PIXELS", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    calls = []
    exact = paste._crops_exact
    monkeypatch.setattr(paste, "_crops_exact", lambda probs, *a: calls.append(len(probs))
                        or exact(probs, *a))
    probs = blob_probs(7, (40, 52), 4)
    boxes = random_boxes(7, (157, 205), 4)
    boxes[3] = torch.tensor([0.0, 0.0, 3.0, 3.0])  # one mask clipped to almost nothing
    for clip in (None, boxes):
        calls.clear()
        assert_equal_to_reference(probs, (157, 205), (157, 205), clip)
        assert sorted(calls) == sorted([2, 3, 2] if threads == 3 else [4, 3])


def test_a_chunk_is_written_as_its_whole_image_would_be(monkeypatch) -> None:
    """Small masks of an image too large for the all-at-once expansion: each chunk also
    writes its crops into one buffer of the crops' size (not a view of a (k, H, W) array
    that a chunk alone would be small enough for), and a call from inside the pool (nested)
    runs on its own thread."""
    monkeypatch.setattr(paste, "PARALLEL_PIXELS", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(paste, "DENSE_VIEW_BYTES", 4 * 120 * 160 - 1)  # 2 masks alone: fit
    probs = torch.full((4, 30, 40), 0.05)
    for k in range(4):
        probs[k, 5 + 3 * k:9 + 3 * k, 6:10] = 0.95  # a small square each
    got = mask_crops(probs, (120, 160), (120, 160), 0.5)
    held = sum(c.nbytes for c in got.crops)
    assert all(c.base is None or c.base.nbytes <= held for c in got.crops)
    assert_equal_to_reference(probs, (120, 160), (120, 160), None)
    nested = workers.pool(2).submit(mask_crops, probs, (120, 160), (120, 160), 0.5)
    assert np.array_equal(nested.result(timeout=60).dense(), got.dense())


def test_clip_boxes_must_match_the_masks() -> None:
    with pytest.raises(ValueError, match="clip_boxes: 3 boxes for 4 masks"):
        mask_crops(torch.rand(4, 8, 8), (30, 31), (30, 31), 0.5, torch.zeros(3, 4))


@pytest.mark.parametrize("n4, resized, size", [(64, 256, None), (25, 100, 600), (40, 157, 205),
                                                (16, 64, 96), (32, 128, 101), (8, 30, 31)])
def test_spreading_groups_to_pixels_equals_the_gather(n4, resized, size) -> None:
    """``_spread`` (a word multiply and slice copies where the layout allows) writes the
    same pixels as the byte gather ``np.take(groups, of, axis=2)``."""
    axis = paste_groups.axis_groups(n4, resized, size, True)
    groups = np.random.default_rng(n4).random((3, 5, len(axis.starts) - 1)) < 0.5
    assert np.array_equal(paste_groups.spread(groups, axis), np.take(groups, axis.of, axis=2))


def test_spread_layouts_cover_the_fast_path_and_the_fallback() -> None:
    """The cases above reach both branches of ``_spread``."""
    assert paste_groups.axis_groups(64, 256, None, True).runs is not None
    assert paste_groups.axis_groups(8, 30, 31, True).runs is not None
    assert paste_groups.axis_groups(25, 100, 600, True).runs is None


@pytest.mark.parametrize("rows, cols", [((64, 256, None), (64, 256, None)),
                                        ((16, 61, None), (50, 200, None)),
                                        ((64, 256, None), (25, 100, 600)),
                                        ((40, 157, 205), (8, 30, 31))])
def test_expanding_groups_to_pixels_equals_the_two_gathers(rows, cols) -> None:
    """``expand`` (4-byte words and a view past the shifts where both axes allow, else the
    gathers) writes the pixels of ``np.take`` along both axes, for groups as the plan makes
    them (one value per pair of source cells)."""
    row_axis = paste_groups.axis_groups(*rows, True)
    col_axis = paste_groups.axis_groups(*cols, True)
    cells = np.random.default_rng(len(row_axis.of)).random((3, rows[0] + 1, cols[0] + 1)) < 0.5
    groups = (np.take(cells, row_axis.ca, axis=1) & np.take(cells, row_axis.cb + 1, axis=1))
    groups = np.take(groups, col_axis.ca, axis=2) & np.take(groups, col_axis.cb + 1, axis=2)
    want = np.take(np.take(groups, col_axis.of, axis=2), row_axis.of, axis=1)
    got = paste_groups.expand(np.ascontiguousarray(groups), row_axis, col_axis)
    assert got.shape == want.shape == (3, len(row_axis.of), len(col_axis.of))
    assert np.array_equal(got, want)


def test_edge_groups_filling_a_block_are_written_as_words_the_others_as_pixels(
        monkeypatch, expansion) -> None:
    """At the network's input size an edge group that fills its 4x4 block is written as 4
    words; the first two groups of an axis (one cell's 6 pixels, cut 4 + 2) are not blocks
    and are written pixel by pixel. A mask reaching the image's corner has both kinds."""
    axis = paste_groups.axis_groups(52, 205, None, True)
    starts = paste_groups.block_starts(axis)
    assert not starts[0] and not starts[1] and starts[2:].all()
    assert not paste_groups.block_starts(paste_groups.axis_groups(25, 100, 600, True)).any()
    written = []
    write = paste._Edges.write_blocks
    monkeypatch.setattr(paste._Edges, "write_blocks",
                        lambda self, *a: written.append(len(self.kk)) or write(self, *a))
    probs = blob_probs(4, (40, 52), 1)
    yy, xx = torch.meshgrid(torch.arange(40.0), torch.arange(52.0), indexing="ij")
    probs[0] = 0.95 * torch.exp(-(yy ** 2 + xx ** 2) / 18)  # a blob at the corner
    for boxes in (None, random_boxes(4, (157, 205), 1)):
        assert_equal_to_reference(probs, (157, 205), (157, 205), boxes)
    assert written if expansion == "dense views" else not written


def test_groups_at_the_input_size_have_a_shift_and_resized_ones_none() -> None:
    """At the network's input size every axis is 4-pixel groups read from 2 pixels on (the
    aligned upsampling's 2-pixel offset; the first two groups read the same cells); a resized
    axis has groups of other lengths."""
    for n4, size in ((64, 256), (16, 61), (334, 1333)):
        axis = paste_groups.axis_groups(n4, size, None, True)
        assert axis.shift == 2
        assert np.array_equal(axis.ca[(np.arange(size) + 2) // 4], axis.ca[axis.of])
    for resized in ((25, 100, 600), (128, 512, 1024), (64, 256, 128), (40, 157, 205)):
        assert paste_groups.axis_groups(*resized, True).shift is None


@pytest.mark.parametrize("index", [[0, 0, 1, 2, 3, 4], [0, 1, 2, 3], [2, 3, 3, 4, 5], [0, 0, 1, 1],
                                   [0, 2, 3, 5, 6], [4, 4, 4], [0, 0, 1, 2, 3, 4, 4]])
@pytest.mark.parametrize("axis", [1, 2])
def test_group_takes_by_slices_equal_np_take(index, axis) -> None:
    """``_take`` (slice copies for at most 3 runs of consecutive indices, else ``np.take``)
    gives ``np.take``'s array, on bits packed in bytes as the plan's maps are."""
    a = np.random.default_rng(axis).integers(0, 4, (3, 7, 7), dtype=np.uint8)
    assert np.array_equal(paste_groups._take(a, np.array(index), axis),
                          np.take(a, index, axis=axis))


@pytest.mark.parametrize("shape", [(3, 7, 600), (2, 600, 5), (4, 65, 65)])
@pytest.mark.parametrize("keep", [1, 2])
def test_any_of_groups_by_byte_sums_equals_numpy_any(shape, keep) -> None:
    """``_any_groups`` (byte sums, at most 255 at a time) is ``any`` over the other axis,
    also where a line holds exactly 256 or 510 True groups (a sum that would wrap a byte)."""
    groups = np.random.default_rng(sum(shape) + keep).random(shape) > 0.97
    long_axis = 3 - keep
    if shape[long_axis] >= 510:
        line = [0, slice(None), slice(None)]
        line[keep] = 1
        full = np.zeros(shape[long_axis], bool)
        full[:256] = True
        groups[tuple(line)] = full
        line[keep] = 2
        groups[tuple(line)] = np.arange(shape[long_axis]) < 510
    want = groups.any(axis=long_axis)
    assert np.array_equal(paste._any_groups(groups, keep), want)
    assert np.array_equal(paste._any_groups(np.ascontiguousarray(groups[:, ::-1, ::-1]), keep),
                          want[:, ::-1])


@pytest.mark.parametrize("last", [1, 2, 3, 4, 6, 8])
def test_any_of_a_short_last_axis_equals_numpy_any(last) -> None:
    """``_any_last`` (the axis's bytes read as one word where it is 1, 2, 4 or 8 long) is
    ``any(-1)``, on a C-contiguous array and on one whose last axis alone is contiguous."""
    a = np.random.default_rng(last).random((50, 3, last)) > 0.8
    for blocks in (a, a.transpose(1, 0, 2).copy().transpose(1, 0, 2)):
        assert np.array_equal(paste._any_last(blocks), blocks.any(-1))


@pytest.mark.parametrize("length", [4, 3, 6])
def test_first_and_last_true_of_short_rows_equal_argmax(length) -> None:
    """``_first_last`` (for rows of 4, a word's bits index two tables) gives argmax's first
    and last True index, on every non-empty row of 4 and on random rows of other lengths."""
    if length == 4:
        used = (np.arange(1, 16)[:, None] >> np.arange(4)) & 1 == 1  # all 15 non-empty rows
    else:
        used = np.random.default_rng(length).random((300, length)) > 0.7
        used = used[used.any(1)]
    first, last = paste._first_last(used)
    assert np.array_equal(first, used.argmax(1))
    assert np.array_equal(last, length - 1 - used[:, ::-1].argmax(1))
