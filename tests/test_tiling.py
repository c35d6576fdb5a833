"""Tiling: grid geometry, blending weights, shared noise canvas, seams, dask-graph twin."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _fake_predictor import EchoPredictor, FakePredictor, blobs, packaged_predictor
from napari_lcm_stain import tiling as T


def run(image, pred, tile, overlap, seed=0, batch=4, context=0):
    grid = T.make_grid(image.shape, pred.multiple, tile, overlap, context)
    noise = T.make_noise_canvas(pred, grid.padded, seed)
    return T.predict_tiled(image, pred, tile, overlap, noise, batch, context=context)


# ------------------------------------------------------------------------------ grid & windows


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 700),
    w=st.integers(1, 700),
    m=st.sampled_from([1, 4, 8, 16, 32]),
    tile=st.integers(16, 300),
    overlap=st.integers(0, 64),
)
def test_grid_covers_canvas_with_aligned_tiles(h, w, m, tile, overlap):
    try:
        g = T.make_grid((h, w), m, tile, overlap)
    except ValueError as e:  # only when the overlap leaves no stride in a tile that must repeat
        assert "leaves no stride" in str(e)
        t_req = max(m, tile // m * m)
        assert t_req - overlap < m
        return
    for a, n in enumerate((h, w)):
        p, t, starts = g.padded[a], g.tile[a], g.starts[a]
        assert p % m == 0 and p >= n and p - n < m
        assert t % m == 0 and t <= p
        assert g.tile[0] * g.tile[1] <= max(m, tile // m * m) ** 2 or g.n_tiles == 1
        assert all(s % m == 0 for s in starts)
        assert starts[0] == 0 and starts[-1] + t == p
        covered = np.zeros(p, bool)
        for s in starts:
            covered[s : s + t] = True
        assert covered.all()
        if len(starts) > 1:  # real overlap between neighbours is at least the requested one
            assert min(t - (b - a_) for a_, b in zip(starts[:-1], starts[1:])) >= overlap
        sums = g.weight_sums[a]
        assert sums.min() > 0
    assert g.n_tiles == len(g.tiles())


def test_small_and_odd_images_make_one_padded_tile():
    g = T.make_grid((1, 1), 16, 512, 32)
    assert g.padded == (16, 16) and g.tile == (16, 16) and g.n_tiles == 1
    g = T.make_grid((7, 1000), 16, 256, 32)  # a thin strip: one 16 x 1008 tile (< 256² px)
    assert g.padded == (16, 1008) and g.tile == (16, 1008) and g.n_tiles == 1
    g = T.make_grid((7, 100000), 16, 256, 32)  # tiles up to 16 x 4096: 25 of them
    assert g.tile[0] == 16 and g.tile[1] <= 4096 and g.n_tiles == 25
    assert g.starts[1][-1] == 100000 - g.tile[1]
    g = T.make_grid((300, 1000), 16, 256, 32)  # two tiles across: tiles stay at most 256
    assert max(g.tile) <= 256 and g.tile[0] > 16


def test_grid_uses_fewest_tiles_then_smallest_side():
    """2048² at tile 512 / overlap 32 needs 5 tiles per axis; 448 px tiles suffice (not 512)."""
    g = T.make_grid((2048, 2048), 32, 512, 32)
    assert len(g.starts[0]) == 5 and g.tile == (448, 448)
    assert g.taper == (32, 32)
    g = T.make_grid((1024, 1024), 32, 512, 32)  # 3 tiles of 384 instead of 3 of 512
    assert g.tile == (384, 384) and g.n_tiles == 9


def test_bad_tile_and_overlap_name_the_fix():
    with pytest.raises(ValueError, match="tile must be a positive integer"):
        T.make_grid((100, 100), 16, 0, 8)
    with pytest.raises(ValueError, match="overlap must be an integer >= 0"):
        T.make_grid((100, 100), 16, 64, -1)
    with pytest.raises(ValueError, match="use tile >= overlap"):
        T.make_grid((1000, 1000), 16, 64, 60)


def test_hann_ramp_is_partition_of_unity_and_positive():
    for n in (1, 5, 16, 33):
        r = T.hann_ramp(n)
        assert r.shape == (n,) and r.min() > 0 and r.max() < 1
        np.testing.assert_allclose(r + r[::-1], 1.0, atol=1e-6)
        assert np.all(np.diff(r) > 0)


def test_windows_taper_only_inner_sides_and_keep_a_floor():
    g = T.make_grid((300, 300), 16, 128, 32)
    first, last = g.windows[0][0], g.windows[0][-1]
    assert first[0] == 1.0 and last[-1] == 1.0  # canvas border keeps full weight
    assert first[-1] == pytest.approx(T.WINDOW_FLOOR) and last[0] == pytest.approx(T.WINDOW_FLOOR)
    assert g.windows[0][1].min() >= T.WINDOW_FLOOR


def test_reflect_indices_match_numpy_reflect_padding():
    for n in (2, 3, 7, 20):
        a = np.arange(n)
        for start, length in ((0, n + 40), (n - 3 if n > 3 else 0, 50)):
            padded = np.pad(a, (0, start + length), mode="reflect")
            np.testing.assert_array_equal(
                a[T.reflect_indices(n, start, length)], padded[start : start + length]
            )
    np.testing.assert_array_equal(T.reflect_indices(1, 0, 16), np.zeros(16, int))


# ------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (1, 1000), (100, 3), (257, 190)])
def test_identity_model_reproduces_the_image_exactly(shape):
    """Blending weights normalise to 1 everywhere and edges are cropped back correctly."""
    img = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    out = run(img, EchoPredictor("input"), 64, 16)
    assert out.shape == shape and out.dtype == np.float32
    np.testing.assert_allclose(out, img, atol=1e-5)


def test_overlapping_tiles_see_the_same_noise():
    """A model that outputs its noise reproduces the global canvas: tiles agree in overlaps."""
    pred = EchoPredictor("noise")
    img = np.zeros((200, 170), np.float32)
    grid = T.make_grid(img.shape, pred.multiple, 64, 32)
    noise = T.make_noise_canvas(pred, grid.padded, seed=3)
    out = T.predict_tiled(img, pred, 64, 32, noise)
    whole = noise[0, 0].repeat_interleave(4, 0).repeat_interleave(4, 1).numpy()[:200, :170]
    np.testing.assert_allclose(out, whole, atol=1e-5)
    assert grid.n_tiles > 9


def test_noise_canvas_is_seeded_and_checked():
    pred = FakePredictor()
    a = T.make_noise_canvas(pred, (64, 32), 5)
    assert tuple(a.shape) == (1, 4, 16, 8)
    assert torch.equal(a, T.make_noise_canvas(pred, (64, 32), 5))
    assert not torch.equal(a, T.make_noise_canvas(pred, (64, 32), 6))
    assert T.make_noise_canvas(EchoPredictor("input"), (64, 32), 0) is None
    with pytest.raises(ValueError, match="does not match the padded canvas"):
        T.predict_tiled(np.zeros((64, 64), np.float32), pred, 32, 8, a)


def test_batch_size_does_not_change_the_result():
    pred = FakePredictor()
    img = pred.normalize(blobs((150, 230)))
    a = run(img, pred, 64, 16, batch=1)
    b = run(img, pred, 64, 16, batch=7)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_progress_and_cancel():
    pred = FakePredictor()
    img = np.zeros((200, 200), np.float32)
    seen = []
    grid = T.make_grid(img.shape, 16, 64, 16)
    noise = T.make_noise_canvas(pred, grid.padded, 0)
    T.predict_tiled(img, pred, 64, 16, noise, batch=3, progress_cb=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (grid.n_tiles, grid.n_tiles)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    calls = []
    with pytest.raises(T.Cancelled):
        T.predict_tiled(img, pred, 64, 16, noise, batch=1, cancel_check=lambda: len(calls) > 2,
                        progress_cb=lambda d, t: calls.append(d))  # fmt: skip
    assert len(calls) == 3 < grid.n_tiles


# ------------------------------------------------------------------------------ seams


def _predictors():
    real = packaged_predictor("lcm")
    return [pytest.param(FakePredictor(), id="fake"),
            pytest.param(real, id="packaged-lcm", marks=[pytest.mark.slow, pytest.mark.skipif(
                real is None, reason="packaged LCM weights not trained yet")])]  # fmt: skip


def _border_energy(img: np.ndarray, positions, axis: int) -> float:
    """Mean squared finite difference across the given positions along `axis`."""
    g = np.diff(img, axis=axis)
    idx = [p - 1 for p in positions if 0 < p < img.shape[axis]]
    return float(np.mean(np.take(g, idx, axis=axis) ** 2))


@pytest.mark.parametrize("pred", _predictors())
def test_seams_tiled_equals_whole_image_on_1024(pred):
    img = pred.normalize(blobs((1024, 1024), seed=2))
    # the margin this network needs, measured (the checkpoint's receptive_field is tested below)
    ctx = max(T.measure_context(pred, img[:512, :512], tol=0.005), T.model_context(pred))
    tiled = run(img, pred, 256, 32, seed=0, context=ctx)
    whole = run(img, pred, 1024, 32, seed=0)  # one tile = whole-image prediction, same noise
    assert T.make_grid(img.shape, pred.multiple, 1024, 32).n_tiles == 1
    assert np.abs(tiled - whole).max() <= 0.01

    grid = T.make_grid(img.shape, pred.multiple, 256, 32, ctx)
    # every place where a tile starts, ends, or hands over to its neighbour
    borders = sorted({p for s in grid.starts[1][1:] for p in (s, s + grid.taper[1] // 2)}
                     | {s + grid.tile[1] for s in grid.starts[1][:-1]})  # fmt: skip
    for axis in (0, 1):
        e_tiled = _border_energy(tiled, borders, axis)
        e_whole = _border_energy(whole, borders, axis)
        assert e_tiled <= 1.05 * e_whole + 1e-8

    # negative control: cropping tiles without overlap/blending does leave seams the test sees
    naive = run(img, pred, 256, 0, seed=0)
    naive_borders = list(T.make_grid(img.shape, pred.multiple, 256, 0).starts[1][1:])
    assert _border_energy(naive, naive_borders, 1) > 1.05 * _border_energy(whole, naive_borders, 1)


# ------------------------------------------------------------------------------ dask graph


def test_dask_graph_equals_local_bit_for_bit():
    pred = FakePredictor()
    img = pred.normalize(blobs((300, 210), seed=4))
    grid = T.make_grid(img.shape, pred.multiple, 128, 32)
    noise = T.make_noise_canvas(pred, grid.padded, 1)
    local = T.predict_tiled(img, pred, 128, 32, noise, batch=4)
    lazy = T.predict_tiled_dask(img, pred, 128, 32, noise, batch=4)
    assert lazy.shape == img.shape and lazy.dtype == np.float32
    np.testing.assert_array_equal(lazy.compute(scheduler="threads"), local)


def test_dask_graph_accepts_dask_input_and_loader():
    import dask.array as da

    from _fake_predictor import fake_loader

    pred = FakePredictor()
    img = pred.normalize(blobs((130, 100), seed=5))
    noise = T.make_noise_canvas(pred, T.make_grid(img.shape, 16, 64, 16).padded, 0)
    local = T.predict_tiled(img, pred, 64, 16, noise, batch=2)
    lazy = T.predict_tiled_dask(da.from_array(img, chunks=50), pred, 64, 16, noise, 2, fake_loader)
    np.testing.assert_array_equal(lazy.compute(scheduler="sync"), local)


def test_rows_are_streamed_to_out_once_and_in_order():
    """Band accumulation: finished rows leave as soon as the next tile row starts."""
    pred = FakePredictor()
    raw = blobs((300, 170), seed=6)

    class Recorder:
        def __init__(self):
            self.data = np.full(raw.shape, np.nan, np.float32)
            self.rows = []

        def __setitem__(self, key, value):
            self.rows.append((key[0].start, key[0].stop))
            self.data[key] = value

    rec = Recorder()
    grid = T.make_grid(raw.shape, 16, 64, 16)
    noise = T.make_noise_canvas(pred, grid.padded, 0)
    T.predict_tiled(raw, pred, 64, 16, noise, out=rec, transform=pred.normalize, clip=(0.2, 0.8))
    assert rec.rows[0][0] == 0 and rec.rows[-1][1] == 300
    assert all(a[1] == b[0] for a, b in zip(rec.rows, rec.rows[1:]))
    assert len(rec.rows) == len(grid.starts[0])
    ref = T.predict_tiled(pred.normalize(raw), pred, 64, 16, noise)  # normalised up front
    np.testing.assert_array_equal(rec.data, np.clip(ref, 0.2, 0.8))


def test_skipping_tile_edges_reduces_the_tiling_error(monkeypatch):
    """The outer quarter of each overlap (zero-padding artefacts) gets ~no weight: that matters."""
    pred = FakePredictor()
    img = pred.normalize(blobs((512, 512), seed=3))
    whole = run(img, pred, 512, 32)
    err = np.abs(run(img, pred, 128, 32) - whole).max()
    monkeypatch.setattr(T, "EDGE_SKIP", 0.0)  # Hann ramp over the whole overlap
    err_full_ramp = np.abs(run(img, pred, 128, 32) - whole).max()
    assert err_full_ramp > 5 * err


def test_measure_context_and_context_margin():
    """The measured context of the test model is small but non-zero; with it, seams vanish."""
    pred = FakePredictor()
    img = pred.normalize(blobs((256, 256), seed=7))
    c = T.measure_context(pred, img, tol=0.002)
    assert 8 <= c <= 32
    assert T.measure_context(EchoPredictor("input"), img) == 0
    g = T.make_grid((1000, 1000), 16, 256, 32, context=c)
    assert g.context == c and g.tile[0] <= 256 + 2 * c
    assert min(b - a for a, b in zip(g.starts[0][:-1], g.starts[0][1:])) <= g.tile[0] - 32 - 2 * c
    w = g.windows[0][1]
    assert w[:c].max() <= T.WINDOW_FLOOR and w[-c:].max() <= T.WINDOW_FLOOR
    grid = T.make_grid(img.shape, 16, 96, 16, context=c)
    noise = T.make_noise_canvas(pred, grid.padded, 0)
    whole = T.predict_tiled(img, pred, 256, 16, noise)
    tiled = T.predict_tiled(img, pred, 96, 16, noise, context=c)
    assert np.abs(tiled - whole).max() <= 0.002
    assert T.model_context(pred) == pred.receptive_field // 2


def test_packaged_receptive_field_covers_measured_context():
    """The engine's default context comes from the checkpoint: it must be large enough."""
    real = packaged_predictor("lcm")
    if real is None:
        pytest.skip("packaged LCM weights not trained yet")
    from napari_lcm_stain.simulate import simulate_pair

    x = real.normalize(simulate_pair("brain-20x", size=512, seed=20_200).qobm)
    needed = T.measure_context(real, x, tol=0.005)
    assert T.model_context(real) >= needed, (
        f"receptive_field {real.receptive_field} in the checkpoint config is too small: "
        f"tiles need {needed} px of context (set receptive_field >= {2 * needed})"
    )


def test_texture_decoder_tiles_exactly():
    """A latent predictor whose decoder draws per-pixel texture (noise hashed from the latent
    canvas): tiled = whole image, and the texture is really there (texture off differs)."""
    from napari_lcm_stain.models import VAE, LatentUNet
    from napari_lcm_stain.sampling import LatentPredictor

    torch.manual_seed(0)
    unet = LatentUNet(4, 8, (8, 16)).eval()
    vae = VAE(4, 8, 8, 8, 8, 8, False, dec_texture=True).eval()
    torch.nn.init.constant_(vae.decoder.amplitude[0].bias, -0.2)  # amplitude ~exp(-2) = 0.13
    for m in (unet, vae.decoder):
        for prm in m.parameters():  # random, non-trivial weights (zero-initialised convs too)
            prm.data += 0.05 * torch.randn_like(prm)
    cfg = {"latent_scale": 1.0, "normalization": {"type": "fixed", "mean": 0.0, "std": 1.0}}
    pred = LatentPredictor(unet, vae.decoder, cfg, torch.device("cpu"), "lcm", 1, texture=True)
    assert pred.texture
    img = pred.normalize(blobs((768, 768), seed=3))
    ctx = T.measure_context(pred, img[:512, :512], tol=0.005)
    tiled = run(img, pred, 256, 32, seed=0, context=ctx)
    whole = run(img, pred, 768, 32, seed=0)
    assert np.abs(tiled - whole).max() <= 0.01
    pred.texture = False
    smooth = run(img, pred, 768, 32, seed=0)
    assert np.abs(whole - smooth).std() > 0.02  # the texture is there, and it tiles
