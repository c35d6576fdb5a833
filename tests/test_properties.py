"""Issue 7: property test of `napari_lcm_stain.stain` over random shapes, dtypes and tile settings.

For any input hypothesis draws (2-D to 4-D, 1-px images and thin strips, every numeric dtype,
NaN/Inf, extreme values, constant planes, any tile/overlap/pixel size/samples) the call either
returns a float32 stain that is finite, in [0, 1] and of the input's shape, with the input left
untouched, or raises one of the documented ValueErrors, and only when its cause is present.
Uses the fake predictor so 200 examples take seconds.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import napari_lcm_stain
from _fake_predictor import FakePredictor

PRED = FakePredictor()

DTYPES = [
    np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16, np.int32, np.int64,
    np.float16, np.float32, np.float64, bool,
]  # fmt: skip

SPATIAL = st.one_of(
    st.tuples(st.integers(1, 80), st.integers(1, 80)),  # small, incl. 1x1
    st.tuples(st.just(1), st.integers(1, 2000)),  # one-pixel rows
    st.tuples(st.integers(1, 2000), st.integers(1, 2)),  # one/two-pixel columns
    st.tuples(st.integers(2, 5), st.integers(100, 500)),  # thin strips
    st.tuples(st.integers(1, 40), st.integers(3, 4)),  # 3-4 px wide: RGB-like when >= 3-D
)


@st.composite
def cases(draw):
    h, w = draw(SPATIAL)
    lead = tuple(draw(st.lists(st.integers(1, 2), min_size=0, max_size=2)))  # 2-D .. 4-D
    return {
        "shape": lead + (h, w),
        "dtype": np.dtype(draw(st.sampled_from(DTYPES))),
        "content": draw(st.sampled_from(["noise", "constant", "extreme", "nonfinite"])),
        "data_seed": draw(st.integers(0, 2**32 - 1)),
        "tile": draw(st.sampled_from([1, 8, 16, 31, 48, 64, 100, 512])),
        "overlap": draw(st.sampled_from([0, 1, 8, 16, 32, 64])),
        "pixel_size": draw(st.sampled_from([None, 0.1, 0.25, 0.4])),
        "samples": draw(st.sampled_from([1, 1, 2])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def make_image(c) -> np.ndarray:
    rng = np.random.default_rng(c["data_seed"])
    shape, dt = c["shape"], c["dtype"]
    if dt.kind == "b":
        img = rng.random(shape) > 0.5
        return np.zeros(shape, bool) if c["content"] == "constant" else img
    if dt.kind in "iu":
        info = np.iinfo(dt)
        if c["content"] == "constant":
            return np.full(shape, rng.integers(info.min, info.max, dtype=dt, endpoint=True), dt)
        img = rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)
        if c["content"] == "noise":  # a narrower, realistic range
            img = rng.integers(0, min(int(info.max), 1000), size=shape, dtype=dt)
        return img
    big = 1e30 if dt.itemsize >= 4 else 6e4  # beyond that the fake's normalisation overflows
    img = rng.normal(0.1, 0.3, shape)
    if c["content"] == "constant":
        img = np.full(shape, rng.normal())
    elif c["content"] == "extreme":
        img = np.where(rng.random(shape) > 0.5, big, -big) * rng.random(shape)
    elif c["content"] == "nonfinite":
        bad = rng.random(shape) < rng.choice([0.05, 0.5, 1.0])  # 1.0: whole planes NaN/Inf
        img[bad] = rng.choice([np.nan, np.inf, -np.inf], size=int(bad.sum()))
    return img.astype(dt)


def documented_error(c, img, err: ValueError) -> None:
    """A ValueError is fine only if it is documented and its cause is really in the input."""
    msg = str(err)
    shape = img.shape
    if "looks like RGB/RGBA" in msg:
        event("error: RGB-like")
        assert len(shape) >= 3 and shape[-1] in (3, 4), msg
    elif "has no finite pixels" in msg:
        event("error: no finite pixels")
        planes = img.reshape(-1, *shape[-2:])
        assert any(not np.isfinite(p).any() for p in planes), msg
    elif "leaves no stride" in msg:
        event("error: overlap too large for the tile")
        # the message's own suggestion must work (or meet another documented error)
        tile = int(re.search(r"--tile (\d+)", msg).group(1))
        assert tile > c["tile"], msg
        stain_or_explain({**c, "tile": tile}, img)
    else:
        raise AssertionError(f"undocumented ValueError: {msg}")


def stain_or_explain(c, img) -> None:
    try:
        out = stain(img, c)
    except ValueError as e:  # TypeError cannot happen: all drawn dtypes are numeric
        documented_error(c, img, e)
    else:
        event("stained")
        check_output(out, img.shape)


def stain(img, c, **override):
    kw = {k: c[k] for k in ("tile", "overlap", "pixel_size", "samples", "seed")}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*NaN/Inf.*", category=UserWarning)
        return napari_lcm_stain.stain(img, model=PRED, **{**kw, **override})


def check_output(out, shape):
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert out.shape == shape
    assert np.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.slow
@settings(
    max_examples=200,
    deadline=None,
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(c=cases())
def test_stain_is_total_finite_in_range_and_shape_preserving(c):
    img = make_image(c)
    before = img.copy()
    stain_or_explain(c, img)
    np.testing.assert_array_equal(img, before)
