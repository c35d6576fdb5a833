"""engine.stain / iter_stain: input validation, stacks, lazy arrays, pixel size, samples."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import zarr

from _fake_predictor import FakePredictor, blobs, packaged_predictor
from napari_lcm_stain import engine
from napari_lcm_stain.engine import StainResult, iter_stain, stain

KW = {"tile": 64, "overlap": 16}


@pytest.fixture(scope="module")
def pred():
    return FakePredictor()


def drain(gen):
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            return events, stop.value


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "bad, exc, match",
    [
        (np.zeros((32, 32, 3)), ValueError, "RGB.*convert"),
        (np.zeros((32, 32, 4), np.uint8), ValueError, "one channel"),
        (np.zeros((0, 10)), ValueError, "empty"),
        (np.zeros((5, 0, 10)), ValueError, "empty"),
        (np.zeros(10), ValueError, "1-D.*reshape"),
        (np.float32(3), ValueError, "scalar"),
        (np.zeros((1,) * 6 + (4, 4)), ValueError, "at most 5"),
        ("image.tif", TypeError, "read_image"),
        (None, TypeError, "None"),
        (np.array([["a", "b"], ["c", "d"]]), TypeError, "not numeric"),
        (np.empty((4, 4), object), TypeError, "not numeric"),
        (np.zeros((8, 8), np.complex64), TypeError, "complex"),
    ],
)
def test_bad_inputs_raise_with_the_fix(pred, bad, exc, match):
    with pytest.raises(exc, match=match):
        stain(bad, pred, **KW)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"tile": 0}, "tile must be"),
        ({"overlap": -2}, "overlap must be"),
        ({"samples": 0}, "samples must be"),
        ({"pixel_size": -1.0}, "pixel_size must be a positive"),
        ({"pixel_size": float("nan")}, "pixel_size must be a positive"),
        ({"steps": 0}, "steps must be"),
    ],
)
def test_bad_parameters_raise_value_error(pred, kw, match):
    with pytest.raises(ValueError, match=match):
        stain(np.zeros((32, 32), np.float32), pred, **{**KW, **kw})


def test_bad_model_and_progress_types(pred):
    with pytest.raises(TypeError, match="model must be"):
        stain(np.zeros((32, 32)), model=42)
    with pytest.raises(TypeError, match="progress must be"):
        stain(np.zeros((32, 32)), pred, progress="yes")


@pytest.mark.parametrize(
    "dtype", [bool, np.uint8, np.uint16, np.int16, np.int32, np.float16, np.float32, np.float64]
)
def test_numeric_dtypes_give_float32_in_unit_range(pred, dtype):
    img = (blobs((40, 50)) * 100).clip(0, 200).astype(dtype)
    out = stain(img, pred, **KW)
    assert out.dtype == np.float32 and out.shape == img.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.isfinite(out).all()


def test_input_is_never_modified(pred):
    img = blobs((3, 60, 70))
    img[1, 5:9, 5:9] = np.nan
    img[2, 0, 0] = np.inf
    before = img.copy()
    with pytest.warns(UserWarning, match="NaN/Inf"):
        stain(img, pred, samples=2, pixel_size=0.5, **KW)
    np.testing.assert_array_equal(img, before)  # NaNs in the same places, values untouched


def test_nonfinite_pixels_replaced_by_median_and_reported(pred):
    img = blobs((64, 64))
    bad = img.copy()
    bad[10:20, 10:20] = np.nan
    bad[0, :5] = -np.inf
    with pytest.warns(UserWarning, match="105 NaN/Inf"):
        _, res = drain(iter_stain(bad, pred, **KW))
    assert np.isfinite(res.mean).all()
    assert any("finite median" in w for w in res.info["warnings"])
    fixed = img.copy()
    fixed[np.isnan(bad) | np.isinf(bad)] = np.median(bad[np.isfinite(bad)])
    np.testing.assert_array_equal(res.mean, stain(fixed, pred, **KW))


def test_all_nan_plane_is_an_error(pred):
    img = blobs((2, 32, 32))
    img[1] = np.nan
    with pytest.raises(ValueError, match=r"plane \(1,\) has no finite pixels"):
        stain(img, pred, **KW)


@pytest.mark.parametrize("shape", [(1, 1), (1, 100000), (3, 7), (33, 17)])
def test_tiny_and_extreme_shapes(pred, shape):
    img = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    out = stain(img, pred, tile=512, overlap=32)
    assert out.shape == shape and np.isfinite(out).all()


def test_constant_image(pred):
    out = stain(np.full((48, 80), 0.3, np.float32), pred, **KW)
    assert out.shape == (48, 80) and np.isfinite(out).all()


# ------------------------------------------------------------------------------ stacks & lazy


def test_stack_planes_equal_2d_stains(pred):
    stack = blobs((2, 3, 40, 72))
    out = stain(stack, pred, **KW)
    assert out.shape == stack.shape
    for t in range(2):
        for z in range(3):
            np.testing.assert_array_equal(out[t, z], stain(stack[t, z], pred, **KW))
    assert not np.array_equal(out[0, 0], out[1, 2])


def test_dask_and_zarr_inputs_equal_numpy(pred, tmp_path):
    stack = blobs((3, 70, 90))
    ref = stain(stack, pred, **KW)
    np.testing.assert_array_equal(stain(da.from_array(stack, chunks=(1, 35, 45)), pred, **KW), ref)
    z = zarr.create_array(
        str(tmp_path / "in.zarr"), shape=stack.shape, chunks=(1, 32, 32), dtype="f4"
    )
    z[...] = stack
    np.testing.assert_array_equal(
        stain(zarr.open_array(str(tmp_path / "in.zarr")), pred, **KW), ref
    )


def test_non_contiguous_views(pred):
    big = blobs((130, 150))
    for view in (big[::2, ::3], big[::-1, 5:-5], big.T):
        assert not view.flags.c_contiguous
        np.testing.assert_array_equal(stain(view, pred, **KW), stain(view.copy(), pred, **KW))


def test_out_arrays_are_filled_in_place(pred):
    stack = blobs((2, 40, 40))
    out = np.full(stack.shape, -1, np.float32)
    out_std = np.full(stack.shape, -1, np.float32)
    _, res = drain(iter_stain(stack, pred, samples=2, out=out, out_std=out_std, **KW))
    assert res.mean is out and res.std is out_std
    assert out.min() >= 0 and out_std.min() >= 0
    with pytest.raises(ValueError, match="out has shape"):
        stain(stack, pred, out=np.zeros((3, 40, 40), np.float32), **KW)


# ------------------------------------------------------------------------------ seeds & samples


def test_same_seed_is_bit_identical_and_seed_matters(pred):
    img = blobs((70, 90))
    a = stain(img, pred, seed=3, **KW)
    np.testing.assert_array_equal(a, stain(img, pred, seed=3, **KW))
    assert np.abs(a - stain(img, pred, seed=4, **KW)).max() > 1e-3


def test_samples_mean_and_std_match_individual_seeds(pred):
    img = blobs((60, 80))
    events, res = drain(iter_stain(img, pred, seed=5, samples=3, **KW))
    assert isinstance(res, StainResult)
    singles = np.stack([stain(img, pred, seed=s, **KW) for s in (5, 6, 7)])
    np.testing.assert_allclose(res.mean, singles.mean(0), atol=1e-6)
    np.testing.assert_allclose(res.std, singles.std(0, ddof=1), atol=1e-5)
    assert res.std.min() >= 0 and res.std.max() > 0
    assert 0 <= res.mean.min() and res.mean.max() <= 1
    assert events[-1][0] == events[-1][1] == 3 * res.info["tiles_per_plane"]


def test_deterministic_model_samples_give_zero_std():
    pix = FakePredictor(n_noise=0, name="FakePix2Pix")
    _, res = drain(iter_stain(blobs((40, 40)), pix, samples=4, **KW))
    assert res.std is not None and np.all(res.std == 0)
    assert any("deterministic" in w for w in res.info["warnings"])


def test_progress_is_monotonic_and_complete(pred):
    seen = []
    stain(blobs((2, 100, 100)), pred, progress=lambda d, t: seen.append((d, t)), **KW)
    done = [d for d, _ in seen]
    assert done == sorted(done) and seen[-1][0] == seen[-1][1] and seen[0][0] == 0


def test_predictor_object_is_reused(pred):
    before = pred.calls
    stain(blobs((32, 32)), pred, **KW)
    assert pred.calls == before + 1


# ------------------------------------------------------------------------------ pixel size


def test_pixel_size_rescale_returns_input_shape(pred):
    img = blobs((90, 70))
    _, res = drain(iter_stain(img, pred, pixel_size=0.5, **KW))  # model: 0.25 µm/px
    assert res.mean.shape == img.shape
    assert res.info["rescale"] == pytest.approx(2.0)
    assert res.info["work_shape"] == [180, 140]
    assert any("rescaled" in w for w in res.info["warnings"])
    _, res2 = drain(iter_stain(img, pred, pixel_size=0.125, **KW))
    assert res2.mean.shape == img.shape and res2.info["work_shape"] == [45, 35]


def test_matching_pixel_size_does_not_rescale(pred):
    img = blobs((50, 60))
    same = stain(img, pred, pixel_size=0.2505, **KW)  # within 1 % of 0.25
    np.testing.assert_array_equal(same, stain(img, pred, **KW))


# ------------------------------------------------------------------------------ real model


def test_packaged_lcm_smoke():
    real = packaged_predictor("lcm")
    if real is None:
        pytest.skip("packaged LCM weights not trained yet")
    img = blobs((2, 96, 80))
    out = stain(img, "lcm", device="cpu", tile=64, overlap=16)
    assert out.shape == img.shape and out.dtype == np.float32
    assert 0 <= out.min() and out.max() <= 1
    np.testing.assert_array_equal(out[1], stain(img[1], "lcm", device="cpu", tile=64, overlap=16))
    assert engine.get_predictor("lcm", None, "cpu") is engine.get_predictor("lcm", None, "cpu")


def test_zarr_output_is_written_plane_by_plane(pred, tmp_path):
    stack = blobs((3, 50, 40))
    out = zarr.create_array(
        str(tmp_path / "o.zarr"), shape=stack.shape, chunks=(1, 16, 16), dtype="f4"
    )
    _, res = drain(iter_stain(stack, pred, out=out, **KW))
    assert res.mean is out
    np.testing.assert_array_equal(out[...], stain(stack, pred, **KW))
