"""Tissue architecture (tissue.py) and the through-focus retrieval in the simulator."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy import fft as sfft
from scipy import ndimage

from napari_lcm_stain import simulate as S
from napari_lcm_stain.tissue import FAMILIES, HELD_OUT_FAMILIES, TRAIN_FAMILIES, arrange


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "scattered"])
def test_family_labels_are_exact_instances(family):
    p = replace(S.get_preset("brain-20x"), layout=family, rim_p=0.5)
    s = S.simulate_pair(p, size=192, seed=4)
    ids = np.unique(s.nuclei)
    ids = ids[ids > 0]
    assert len(ids) >= 8, f"{family}: only {len(ids)} labelled nuclei"
    assert np.array_equal(ids, np.arange(1, len(ids) + 1))  # consecutive instance ids
    # each instance is one piece (a nucleus painted over by a nearer one may lose pixels,
    # not split into islands, in nearly every case)
    pieces = [ndimage.label(s.nuclei == i)[1] for i in ids]
    assert np.mean(np.asarray(pieces) == 1) >= 0.9, f"{family}: split instances {pieces}"


@pytest.mark.parametrize("family", ["gland", "sheet", "cuff"])
def test_touching_nuclei_keep_their_own_labels(family):
    p = replace(S.get_preset("brain-20x"), layout=family)
    lab = S.simulate_pair(p, size=192, seed=1).nuclei
    h = (lab[:, 1:] != lab[:, :-1]) & (lab[:, 1:] > 0) & (lab[:, :-1] > 0)
    v = (lab[1:] != lab[:-1]) & (lab[1:] > 0) & (lab[:-1] > 0)
    assert h.sum() + v.sum() > 20, "no touching nuclei with distinct labels"


def test_gland_nuclei_are_columnar_and_radial():
    a = arrange("gland", np.random.default_rng(0), 150.0, 150.0, 4.0)
    assert len(a) > 30
    assert np.median(a.a / a.b) > 1.5  # elongated
    assert np.all(2 * a.a <= 15.0 + 1e-9) and np.all(2 * a.a >= 4.0 - 1e-9)
    assert a.regions and all(r[5] < 0 for r in a.regions)  # lumens below the epithelium


def test_unknown_family_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown tissue family 'villus'"):
        arrange("villus", np.random.default_rng(0), 50.0, 50.0, 4.0)


def test_training_never_samples_held_out_families():
    assert not set(HELD_OUT_FAMILIES) & set(TRAIN_FAMILIES)
    inst = S.sample_instrument(0)
    drawn = {S.sample_tissue(np.random.default_rng(i), inst).layout for i in range(300)}
    assert drawn == set(S.TISSUE_FAMILY_P) and drawn <= set(TRAIN_FAMILIES)
    rec = {S.sample_tissue(np.random.default_rng(i), inst).reconstruction for i in range(100)}
    assert rec == {"tikhonov", "through-focus"}


def test_tissue_random_is_deterministic_and_at_model_pixel_size():
    a = S.simulate_pair("tissue-random", size=96, seed=7)
    b = S.simulate_pair("tissue-random", size=96, seed=7)
    assert np.array_equal(a.qobm, b.qobm) and np.array_equal(a.nuclei, b.nuclei)
    assert a.pixel_size == pytest.approx(S.MODEL_PIXEL_SIZE) and a.preset == "tissue-random"


def _phase_object(n=256):
    yy, xx = np.mgrid[:n, :n]
    phi = np.zeros((n, n))
    for cy, cx, r in [(60, 60, 8), (150, 100, 12), (200, 200, 6), (90, 190, 10)]:
        phi += 0.3 * ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)
    return ndimage.gaussian_filter(phi, 1.0)


def test_through_focus_recovers_a_known_phase_object():
    """The noise-free inversion equals the truth seen through its own Wiener band
    Σ|H|²/(Σ|H|² + α) × the low cut, to Pearson ≥ 0.98; with noise ≥ 0.9. The band itself
    loses the low frequencies (∝ |f|⁴ near DC): the truth's own correlation is much lower."""
    p = replace(S.get_preset("brain-20x"), reconstruction="through-focus", falloff=0.0)
    phi = _phase_object()
    out = S.qobm_forward(phi, p, 0)
    zs = np.array([-1.0, 0.0, 1.0]) * p.tf_defocus_um
    h = np.stack([S.defocus_transfer(phi.shape, p.pixel_size, p.wavelength_um, p.na_objective,
                                     p.illum_na_ratio, z) for z in zs])  # fmt: skip
    fy = sfft.fftfreq(phi.shape[0], d=p.pixel_size)[:, None]
    fx = sfft.rfftfreq(phi.shape[1], d=p.pixel_size)[None, :]
    hp = 1 - np.exp(-2 * (np.pi * p.tf_lowcut_um) ** 2 * (fx * fx + fy * fy))
    band = (h**2).sum(0) / ((h**2).sum(0) + p.tf_alpha) * hp
    expected = sfft.irfft2(band * sfft.rfft2(phi), s=phi.shape)
    r_clean = np.corrcoef(out.phase_clean.ravel(), expected.ravel())[0, 1]
    r_noisy = np.corrcoef(out.phase.ravel(), expected.ravel())[0, 1]
    assert r_clean >= 0.98 and r_noisy >= 0.9, (r_clean, r_noisy)
    # a stronger low cut than DPC: DPC keeps more of the raw truth
    dpc = S.qobm_forward(phi, replace(p, reconstruction="tikhonov"), 0)
    r_tf = np.corrcoef(out.phase_clean.ravel(), phi.ravel())[0, 1]
    r_dpc = np.corrcoef(dpc.phase_clean.ravel(), phi.ravel())[0, 1]
    assert r_dpc > r_tf + 0.1


def test_through_focus_residual_defocus_and_speckle_degrade_it():
    phi = _phase_object()
    base = replace(S.get_preset("brain-20x"), reconstruction="through-focus", falloff=0.0)
    clean = S.qobm_forward(phi, base, 0).phase_clean
    worse = S.qobm_forward(phi, replace(base, tf_residual_defocus_um=1.5), 0).phase_clean
    assert np.corrcoef(worse.ravel(), clean.ravel())[0, 1] < 0.99
    plain = S.qobm_forward(phi, base, 0).phase
    speckled = S.qobm_forward(phi, replace(base, tf_speckle=0.1), 0).phase
    r_plain = np.corrcoef(plain.ravel(), clean.ravel())[0, 1]
    r_speckled = np.corrcoef(speckled.ravel(), clean.ravel())[0, 1]
    assert r_speckled < r_plain - 0.05, (r_plain, r_speckled)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "scattered"])
def test_every_family_fits_a_small_field(family):
    a = arrange(family, np.random.default_rng(2), 26.0, 26.0, 4.0)
    assert np.all(np.isfinite(a.x)) and np.all(a.a >= a.b)
