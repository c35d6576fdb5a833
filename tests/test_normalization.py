"""The one input normalisation: robust per-image statistics (invariant to the phase units) and the
fixed training-set statistics old checkpoints carry."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from napari_lcm_stain import checkpoints as ck
from napari_lcm_stain import normalization as N
from napari_lcm_stain.engine import stain
from napari_lcm_stain.sampling import predictor_from_checkpoint
from napari_lcm_stain.simulate import simulate_pair

AFFINE = [(a, b) for a in (0.01, 0.1, 3.0, 100.0) for b in (-5.0, 0.0, 7.0)]


@pytest.fixture(scope="module")
def field():
    return simulate_pair("brain-20x", size=512, seed=4242).qobm.astype(np.float32)


@pytest.mark.parametrize(("a", "b"), AFFINE)
def test_robust_normalisation_cancels_scale_and_offset(field, a, b):
    cfg = N.robust_config()
    ref = N.normalize(cfg, field)
    got = N.normalize(cfg, (a * field + b).astype(np.float32))
    assert np.abs(got - ref).max() < 2e-3  # float32 rounding of a*x + b only
    assert abs(float(np.median(ref))) < 1e-6  # centred on the median


def test_robust_statistics_come_from_the_whole_plane(field):
    cfg = N.robust_config()
    stats = N.plane_stats(cfg, field)
    tile = N.apply(field[:64, :64], stats)
    np.testing.assert_array_equal(tile, N.normalize(cfg, field)[:64, :64])
    assert not np.allclose(tile, N.normalize(cfg, field[:64, :64]))  # a tile's own stats differ


def test_integer_and_constant_planes(field):
    cfg = N.robust_config()
    cam = np.round(30_000 + 5_000 * field).astype(np.uint16)  # a 16-bit camera's phase image
    y = N.normalize(cfg, cam)
    assert y.dtype == np.float32
    assert np.abs(y - N.normalize(cfg, field)).max() < 0.01  # only the rounding differs
    stats = N.plane_stats(cfg, np.full((32, 32), 5.0))
    assert stats["constant"] and np.all(N.apply(np.full((32, 32), 5.0), stats) == 0)
    with pytest.raises(ValueError, match="no finite pixels"):
        N.plane_stats(cfg, np.full((8, 8), np.nan))
    with pytest.raises(ValueError, match="unknown normalization type"):
        N.plane_stats({"type": "zscore"}, cam)


def test_fixed_normalisation_is_the_old_formula(field):
    cfg = N.fixed_config(0.01, 0.08)
    old = np.clip((field - 0.01) / 0.08, -10, 10).astype(np.float32)
    np.testing.assert_array_equal(N.normalize(cfg, field), old)
    np.testing.assert_array_equal(N.normalize(cfg, np.stack([field, field]))[1], old)


def _with_normalization(norm: dict):
    base = ck.load_packaged("lcm")
    cfg = copy.deepcopy(base.config)
    cfg["normalization"] = norm
    return predictor_from_checkpoint(ck.Checkpoint(base.tensors, cfg), 1, "cpu")


def test_old_fixed_checkpoints_still_load_and_are_not_invariant(field):
    pred = _with_normalization(N.fixed_config(0.0, 0.0833))
    np.testing.assert_array_equal(
        pred.normalize(field), np.clip(field / np.float32(0.0833), -10, 10)
    )
    a = stain(field, model=pred, tile=512)
    b = stain(field * 3, model=pred, tile=512)
    assert np.abs(a - b).max() > 0.05  # the fixed scale sees a 3x brighter image as different


def test_packaged_lcm_stain_is_invariant_to_affine_phase_changes(field):
    """The invariance target of the instrument-robustness issue: max abs difference <= 0.02."""
    cfg = ck.load_packaged("lcm").config["normalization"]
    assert cfg["type"] == "robust"
    ref = stain(field, model="lcm", device="cpu")
    worst = max(
        float(
            np.abs(stain((a * field + b).astype(np.float32), model="lcm", device="cpu") - ref).max()
        )
        for a, b in AFFINE
    )
    assert worst <= 0.02, worst


def test_normalisation_round_trips_through_a_checkpoint(tmp_path):
    pred = _with_normalization(N.robust_config(mad_scale=2.0))
    path = tmp_path / "robust.safetensors"
    base = ck.load_packaged("lcm")
    cfg = copy.deepcopy(base.config)
    cfg["normalization"] = N.robust_config(mad_scale=2.0)
    ck.save_checkpoint(path, {k: base.sub(k) for k in ("unet", "decoder", "encoder")}, cfg)
    loaded = ck.load_checkpoint(path)
    assert loaded.config["normalization"] == N.robust_config(mad_scale=2.0)
    x = simulate_pair("brain-20x", size=64, seed=1).qobm
    again = predictor_from_checkpoint(loaded, 1, "cpu")
    np.testing.assert_array_equal(again.normalize(x), pred.normalize(x))
