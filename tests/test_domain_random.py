"""Domain randomisation of the simulator: the new instrument knobs, `sample_instrument` and
`simulate_training_pair` (napari_lcm_stain.simulate)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from napari_lcm_stain import simulate as S

BRAIN = S.get_preset("brain-20x")
QUIET = dataclasses.replace(BRAIN, photons=1e9, read_noise_e=0.0)
N = 256


def _stripes(axis: int, period_um: float) -> np.ndarray:
    """A 0.2 rad sinusoid varying along `axis` (0: y, 1: x) on an N² grid at 0.414 µm/px."""
    t = np.arange(N) * BRAIN.pixel_size
    s = 0.2 * np.sin(2 * np.pi * t / period_um)
    return np.tile(s[:, None] if axis == 0 else s[None, :], (1, N) if axis == 0 else (N, 1))


def _gain(p, phi) -> float:
    """Amplitude of the reconstruction (noise-free) relative to the true phase."""
    return float(S.qobm_forward(phi, p, 0).phase_clean.std() / phi.std())


# ------------------------------------------------------------------------ instrument knobs
def test_neutral_knob_values_reproduce_the_preset_exactly():
    """The new fields at their neutral values (what every preset uses) change nothing."""
    ref = S.simulate_pair("brain-20x", size=64, seed=5)
    explicit = dataclasses.replace(
        BRAIN,
        source_gains=(1.0, 1.0, 1.0, 1.0),
        illum_rotation_deg=0.0,
        recon_na_objective=BRAIN.na_objective,
        recon_wavelength_um=BRAIN.wavelength_um,
        recon_illum_na_ratio=BRAIN.illum_na_ratio,
        recon_illum_tilt=BRAIN.illum_tilt,
        recon_illum_rotation_deg=0.0,
        nucleus_size_scale=1.0,
    )
    s = S.simulate_pair(explicit, size=64, seed=5)
    for k in ("qobm", "dapi", "nuclei", "distractors", "nucleus_cnr"):
        np.testing.assert_array_equal(getattr(s, k), getattr(ref, k), err_msg=k)


def test_single_axis_dpc_is_blind_along_the_other_axis():
    one = dataclasses.replace(QUIET, dpc_axes="x")
    period = 8.0
    assert _gain(QUIET, _stripes(0, period)) > 0.8  # two axes: both orientations recovered
    assert _gain(QUIET, _stripes(1, period)) > 0.8
    assert _gain(one, _stripes(1, period)) > 0.8  # x-only still sees variation along x
    assert _gain(one, _stripes(0, period)) < 0.02  # ... but nothing that varies along y only


def test_gradient_reconstruction_has_another_spectral_response():
    grad = dataclasses.replace(QUIET, reconstruction="gradient")
    mid, fine = _stripes(1, 1 / 0.38), _stripes(1, 1 / 0.75)
    # Tikhonov + WOTF recovers both ≈1; integrating DPC as a gradient boosts mid frequencies
    # and loses fine ones (the WOTF falls off towards 2NA/λ)
    assert _gain(QUIET, mid) == pytest.approx(1.0, abs=0.1)
    assert _gain(QUIET, fine) == pytest.approx(1.0, abs=0.1)
    assert _gain(grad, mid) > 1.5 and _gain(grad, fine) < 0.8
    out = S.qobm_forward(mid, grad, 0).phase_clean
    assert np.corrcoef(out.ravel(), mid.ravel())[0, 1] > 0.95  # same sign, same structure


def test_wotf_mismatch_rotation_and_source_imbalance_distort_but_keep_the_object():
    ref = S.simulate_pair(QUIET, size=128, seed=2).qobm
    for kw in (
        {"recon_na_objective": 0.46, "recon_illum_tilt": 0.2},
        {"illum_rotation_deg": 10.0},  # the reconstruction assumes the true (rotated) axes
        {"illum_rotation_deg": 10.0, "recon_illum_rotation_deg": 0.0},  # ... or 0°
        {"source_gains": (0.8, 1.25, 1.1, 0.9)},
    ):
        q = S.simulate_pair(dataclasses.replace(QUIET, **kw), size=128, seed=2).qobm
        r = np.corrcoef(q.ravel(), ref.ravel())[0, 1]
        assert 0.85 < r, (kw, r)
        assert not np.array_equal(q, ref), kw
        assert abs(float(q.mean())) < 0.25 * float(q.std()), kw  # source imbalance: no DC
    rot_known = S.simulate_pair(
        dataclasses.replace(QUIET, illum_rotation_deg=10.0), size=128, seed=2
    ).qobm
    rot_unknown = S.simulate_pair(
        dataclasses.replace(QUIET, illum_rotation_deg=10.0, recon_illum_rotation_deg=0.0),
        size=128,
        seed=2,
    ).qobm
    err_known = np.abs(rot_known - ref).mean()
    assert np.abs(rot_unknown - ref).mean() > 1.5 * err_known


def test_bad_knob_values_raise():
    with pytest.raises(ValueError, match="dpc_axes"):
        S.qobm_forward(np.zeros((32, 32)), dataclasses.replace(BRAIN, dpc_axes="y"), 0)
    with pytest.raises(ValueError, match="reconstruction"):
        S.qobm_forward(np.zeros((32, 32)), dataclasses.replace(BRAIN, reconstruction="tv"), 0)


def test_nucleus_size_scale_scales_the_nuclei():
    big = dataclasses.replace(BRAIN, nucleus_size_scale=1.3)
    a = S.make_scene(BRAIN, 100, 100, 4)
    b = S.make_scene(big, 100, 100, 4)
    np.testing.assert_allclose(b.nuclei["a"], 1.3 * a.nuclei["a"])
    np.testing.assert_allclose(b.nuclei["ca"], 1.3 * a.nuclei["ca"])


# ----------------------------------------------------------------------- sample_instrument
def test_sample_instrument_draws_inside_the_documented_ranges():
    draws = [S.sample_instrument(seed) for seed in range(200)]
    R = S.DOMAIN_RANGES
    direct = ("pixel_size", "na_objective", "wavelength_um", "illum_na_ratio", "illum_tilt")
    direct += ("illum_rotation_deg", "falloff", "optical_section_um", "tikhonov_alpha")
    direct += ("background_sigma_um", "photons", "read_noise_e", "background_dn_rms")
    direct += ("background_beta", "nucleus_size_scale", "shape_noise", "cytoplasm_absent_p")
    direct += ("near_nucleus_p",)
    for name in direct:
        v = np.array([getattr(p, name) for p in draws])
        assert R[name].lo <= v.min() and v.max() <= R[name].hi, name
        # spread over most of the range, not stuck at one value
        assert v.max() - v.min() > 0.7 * (R[name].hi - R[name].lo), name
    gains = np.array([p.source_gains for p in draws])
    assert gains.min() >= R["source_gain"].lo and gains.max() <= R["source_gain"].hi
    assert len({p.source_gains for p in draws}) == 200
    for p in draws:
        assert p.name == S.RANDOM_PRESET
        assert sum(p.nucleus_sign_p) == pytest.approx(1.0)
        assert sum(p.kind_fractions) == pytest.approx(1.0)
        assert p.recon_illum_rotation_deg == 0.0 and p.recon_na_objective is not None
        ratio = p.recon_na_objective / p.na_objective
        assert R["recon_na_error"].lo <= ratio <= R["recon_na_error"].hi
        assert p.recon_illum_na_ratio <= 1.0 and 0.0 <= p.recon_illum_tilt <= 1.0
        assert p.dpc_axes == "xy" and p.reconstruction == "tikhonov"  # held out (suite)
    # the contrast-sign mix varies: some fields mostly positive, some mostly negative or ~0
    sign = np.array([p.nucleus_sign_p for p in draws])
    assert (sign.argmax(1) == 0).any() and (sign.argmax(1) == 1).any()
    assert (sign.argmax(1) == 2).any()
    assert (sign[:, 0] > 0.6).any() and (sign[:, 1] > 0.6).any()
    # deterministic per seed, and from a Generator too
    assert S.sample_instrument(7) == S.sample_instrument(np.random.default_rng(7))


def test_ranges_bracket_the_20x_presets():
    R = S.DOMAIN_RANGES
    for preset in ("brain-20x", "shifted-20x", "tumour-dense-20x"):
        p = S.get_preset(preset)
        for name in ("pixel_size", "na_objective", "wavelength_um", "illum_tilt", "photons"):
            assert R[name].lo <= getattr(p, name) <= R[name].hi, (preset, name)
        for name in ("read_noise_e", "optical_section_um", "tikhonov_alpha", "falloff"):
            assert R[name].lo <= getattr(p, name) <= R[name].hi, (preset, name)
        assert R["background_dn_rms"].lo <= p.background_dn_rms <= R["background_dn_rms"].hi


# ------------------------------------------------------------------ simulate_training_pair
def test_training_pair_contract_and_determinism():
    a = S.simulate_training_pair(3, 96)
    b = S.simulate_training_pair(3, 96)
    c = S.simulate_training_pair(4, 96)
    for k in ("qobm", "dapi", "nuclei", "distractors", "nucleus_cnr", "nucleus_in_section"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k), err_msg=k)
    assert a.params == b.params and a.params != c.params
    assert a.qobm.shape == a.dapi.shape == a.nuclei.shape == a.distractors.shape == (96, 96)
    assert a.qobm.dtype == a.dapi.dtype == np.float32 and a.nuclei.dtype == np.int32
    assert a.pixel_size == pytest.approx(0.414) and a.preset == "domain-random" and a.seed == 3
    n = int(a.nuclei.max())
    assert set(np.unique(a.nuclei)) - {0} == set(range(1, n + 1))
    assert a.nucleus_cnr.shape == a.nucleus_in_section.shape == a.nucleus_kind.shape == (n,)
    assert len(a.distractor_kind) == a.distractors.max()
    assert 0.0 <= a.dapi.min() and a.dapi.max() <= 1.0
    # the camera pixel it drew (coarser cameras image the phase only: qobm_pixel_size)
    assert 0.25 * 0.99 < (a.params.qobm_pixel_size or a.params.pixel_size) < 0.8 * 1.01
    # the preset name runs the same thing
    d = S.simulate_pair("domain-random", size=96, seed=3)
    np.testing.assert_array_equal(d.qobm, a.qobm)
    with pytest.raises(ValueError, match="single planes"):
        S.simulate_pair("domain-random", size=32, seed=0, z_planes=2)
    with pytest.raises(ValueError, match="sample_instrument"):
        S.get_preset("domain-random")
    with pytest.raises(ValueError, match="domain-random"):
        S.get_preset("brain-40x")
    with pytest.raises(TypeError, match="seed"):
        S.simulate_training_pair(1.5, 32)
    with pytest.raises(ValueError, match="pixel_size"):
        S.simulate_training_pair(1, 32, pixel_size=0.0)


def test_resampling_keeps_physical_sizes_and_label_bookkeeping():
    native = S.simulate_pair("brain-20x", size=240, seed=6)
    half = S._resample_sample(native, (120, 120), 0.828, "x", 6)  # 2x coarser, same area
    px0, px1 = 0.414, 0.828
    area0 = (native.nuclei > 0).sum() * px0**2
    area1 = (half.nuclei > 0).sum() * px1**2
    assert area1 == pytest.approx(area0, rel=0.08)
    assert half.dapi.mean() == pytest.approx(native.dapi.mean(), rel=0.02)
    assert half.qobm.std() < native.qobm.std()  # anti-aliased: the finest detail is gone
    # every kept label carries its own CNR / in-section value: the majority native id under it
    for new in range(1, int(half.nuclei.max()) + 1):
        up = np.kron(half.nuclei == new, np.ones((2, 2), bool))
        ids, cnt = np.unique(native.nuclei[up], return_counts=True)
        old = ids[ids > 0][cnt[ids > 0].argmax()]
        assert half.nucleus_cnr[new - 1] == native.nucleus_cnr[old - 1]
        assert half.nucleus_in_section[new - 1] == native.nucleus_in_section[old - 1]
    assert int(half.nuclei.max()) >= 0.9 * int(native.nuclei.max())
    up = S._resample_sample(native, (480, 480), 0.207, "x", 6)  # upsampling: no anti-aliasing
    assert (up.nuclei > 0).sum() * 0.207**2 == pytest.approx(area0, rel=0.03)


def test_training_fields_vary_in_camera_pixel_and_keep_dapi_on_the_model_grid():
    ps = []
    for seed in range(12):
        p = S.simulate_training_pair(seed, 32).params
        ps.append(p.qobm_pixel_size or p.pixel_size)
        if p.qobm_pixel_size is not None:  # coarser camera: ground truth simulated at 0.414
            assert p.pixel_size == pytest.approx(0.414) and p.qobm_pixel_size > 0.414
        else:
            assert p.pixel_size <= 0.414
    assert min(ps) < 0.35 and max(ps) > 0.55


def test_coarser_qobm_camera_images_only_the_phase_coarsely():
    coarse = dataclasses.replace(BRAIN, qobm_pixel_size=0.828)
    a = S.simulate_pair("brain-20x", size=128, seed=3)
    b = S.simulate_pair(coarse, size=128, seed=3)
    assert b.qobm.shape == (128, 128) and b.pixel_size == pytest.approx(0.414)
    np.testing.assert_array_equal(a.nuclei, b.nuclei)  # same tissue, same DAPI grid
    assert b.dapi.mean() == pytest.approx(a.dapi.mean(), rel=0.02)
    assert np.corrcoef(a.qobm.ravel(), b.qobm.ravel())[0, 1] > 0.6

    # the camera cannot carry detail finer than 0.828 µm: little energy above its Nyquist
    def fine_energy(q):
        f = np.abs(np.fft.fftshift(np.fft.fft2(q - q.mean()))) ** 2
        k = np.hypot(*np.meshgrid(np.fft.fftshift(np.fft.fftfreq(128, 0.414)),
                                  np.fft.fftshift(np.fft.fftfreq(128, 0.414))))  # fmt: skip
        return f[k > 1 / (2 * 0.828)].sum() / f.sum()

    assert fine_energy(b.qobm) < 0.3 * fine_energy(a.qobm)
    out = S.qobm_forward(np.zeros((64, 64)), coarse, 0)
    assert out.phase.shape == (64, 64) and out.raw.shape == (4, 32, 32)
    with pytest.raises(ValueError, match="must not be finer"):
        S.qobm_forward(np.zeros((32, 32)), dataclasses.replace(BRAIN, qobm_pixel_size=0.2), 0)


def test_write_dataset_and_cli_with_domain_random(tmp_path):
    import tifffile

    from napari_lcm_stain.cli import main

    assert main(["simulate", "--preset", "domain-random", "--n", "2", "--size", "48",
                 "--seed", "5", "--out", str(tmp_path / "d")]) == 0  # fmt: skip
    for i, seed in enumerate((5, 6)):
        with tifffile.TiffFile(tmp_path / "d" / f"00{i}_qobm.ome.tif") as tf:
            assert 'PhysicalSizeX="0.414"' in tf.ome_metadata
            np.testing.assert_array_equal(tf.asarray(), S.simulate_training_pair(seed, 48).qobm)
        meta = json.loads((tmp_path / "d" / f"00{i}_meta.json").read_text())
        assert meta["preset"] == "domain-random" and meta["pixel_size_um"] == pytest.approx(0.414)
        # provenance: the drawn instrument, with its native pixel size
        assert meta["params"] == S.simulate_training_pair(seed, 48).params.to_dict()
    assert main(["simulate", "--preset", "domain-random", "--n", "1", "--size", "32",
                 "--z-planes", "2", "--out", str(tmp_path / "z")]) == 2  # fmt: skip


def test_training_pair_speed_budget():
    """≤ 0.5 s per 256² field is the budget; generous here (shared CI cores): mean of 6 < 1.5 s."""
    import time

    S.simulate_training_pair(100, 256)
    t0 = time.perf_counter()
    for seed in range(101, 107):
        S.simulate_training_pair(seed, 256)
    assert (time.perf_counter() - t0) / 6 < 1.5
