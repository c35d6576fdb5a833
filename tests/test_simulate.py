"""Physics and contract tests of the paired qOBM/DAPI simulator (napari_lcm_stain.simulate)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from napari_lcm_stain import simulate as S

BRAIN = S.get_preset("brain-20x")
# a practically noise-free instrument for deterministic-signal checks
QUIET = dataclasses.replace(BRAIN, photons=1e9, read_noise_e=0.0)


def _radius_grid(n, px):
    yy, xx = np.mgrid[:n, :n] * px
    c = n * px / 2
    return np.hypot(yy - c, xx - c)


# ------------------------------------------------------------------------------------ presets
def test_presets_and_get_preset_errors():
    for name in ("brain-20x", "brain-60x", "tumour-dense-20x", "shifted-20x"):
        p = S.get_preset(name)
        assert p.name == name
    assert S.get_preset("brain-20x").pixel_size == pytest.approx(0.414)
    assert S.get_preset("brain-60x").pixel_size == pytest.approx(0.138)
    shifted, brain = S.get_preset("shifted-20x"), S.get_preset("brain-20x")
    assert shifted.pixel_size == brain.pixel_size
    assert (shifted.wavelength_um, shifted.na_objective) != (
        brain.wavelength_um,
        brain.na_objective,
    )
    with pytest.raises(ValueError, match="brain-20x"):
        S.get_preset("brain-40x")
    with pytest.raises(TypeError):
        S.get_preset(20)
    assert S.get_preset(QUIET) is QUIET


# ------------------------------------------------------------------------- shapes, determinism
@pytest.mark.parametrize("size", [32, (40, 72), 128])
def test_shapes_dtypes_and_label_contract(size):
    s = S.simulate_pair("brain-20x", size=size, seed=3)
    hw = (size, size) if isinstance(size, int) else size
    for name in ("qobm", "dapi", "nuclei", "distractors"):
        assert getattr(s, name).shape == hw, name
    assert s.qobm.dtype == np.float32 and s.dapi.dtype == np.float32
    assert s.nuclei.dtype == np.int32 and s.distractors.dtype == np.int32
    assert 0.0 <= s.dapi.min() and s.dapi.max() <= 1.0
    n = int(s.nuclei.max())
    assert s.nucleus_cnr.shape == (n,) and s.nucleus_in_section.shape == (n,)
    assert s.nucleus_cnr.dtype == np.float32 and s.nucleus_in_section.dtype == np.float32
    # labels are consecutive 1..N, every one present
    assert set(np.unique(s.nuclei)) - {0} == set(range(1, n + 1))
    assert np.all((s.nucleus_in_section >= 0) & (s.nucleus_in_section <= 1.0 + 1e-6))
    assert s.pixel_size == pytest.approx(0.414) and s.preset == "brain-20x"


def test_same_seed_identical_different_seed_differs():
    a = S.simulate_pair("tumour-dense-20x", size=96, seed=11)
    b = S.simulate_pair("tumour-dense-20x", size=96, seed=11)
    c = S.simulate_pair("tumour-dense-20x", size=96, seed=12)
    for name in ("qobm", "dapi", "nuclei", "distractors", "nucleus_cnr", "nucleus_in_section"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert not np.array_equal(a.qobm, c.qobm)
    assert not np.array_equal(a.dapi, c.dapi)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="at least 8"):
        S.simulate_pair(size=4)
    with pytest.raises(TypeError, match="size"):
        S.simulate_pair(size="big")
    with pytest.raises(ValueError, match="z_planes"):
        S.simulate_pair(size=32, z_planes=0)
    with pytest.raises(TypeError, match="seed"):
        S.simulate_pair(size=32, seed=1.5)
    with pytest.raises(ValueError, match="2-D"):
        S.qobm_forward(np.zeros((2, 8, 8)), BRAIN, 0)


# ------------------------------------------------------------------------------ qOBM physics
def test_reconstructed_phase_has_no_dc():
    rng = np.random.default_rng(0)
    phi = 3.0 + 0.2 * rng.standard_normal((96, 96))  # large offset: qOBM cannot see it
    out = S.qobm_forward(phi, BRAIN, 1)
    assert abs(float(out.phase.mean())) < 1e-4
    const = S.qobm_forward(np.full((64, 64), 2.5), QUIET, 0)
    assert np.abs(const.phase_clean).max() < 1e-6
    # the simulator's own output is relative too (cropped from a zero-mean canvas)
    s = S.simulate_pair("brain-20x", size=192, seed=2)
    assert abs(float(s.qobm.mean())) < 0.25 * float(s.qobm.std())


def test_transfer_function_is_odd_and_zero_at_dc():
    h = S.qobm_transfer_functions((64, 64), BRAIN)
    assert h.shape == (2, 64, 64)
    assert h[0, 0, 0] == 0.0 and h[1, 0, 0] == 0.0
    # odd in the shear direction: H(-f) = -H(f)
    np.testing.assert_allclose(h[0, 0, 5], -h[0, 0, -5], atol=1e-9)
    np.testing.assert_allclose(h[1, 5, 0], -h[1, -5, 0], atol=1e-9)
    assert abs(h[0, 0, 5]) > 0.05


def test_flat_disc_shows_edges_and_weak_interior():
    n = 256
    r = _radius_grid(n, BRAIN.pixel_size)
    radius, true = 20.0, 0.5
    out = S.qobm_forward(np.where(r < radius, true, 0.0), QUIET, 0).phase_clean
    interior = out[r < radius / 2].mean()
    edge = out[(r > radius - 1.5) & (r < radius)].mean()
    halo = out[(r > radius) & (r < radius + 2)].mean()
    assert interior < 0.25 * true  # high-pass: a big flat object loses its interior
    assert edge > 3 * interior  # but keeps its edge
    assert halo < -0.05  # and gets a dark halo outside
    # a small object keeps most of its value (the transfer is high-pass, not a pure edge filter)
    small = S.qobm_forward(np.where(r < 4.0, true, 0.0), QUIET, 0).phase_clean
    assert small[r < 2.0].mean() > 0.5 * true


def test_noise_scales_with_photon_count():
    sds = []
    for photons in (1000.0, 4000.0, 16000.0):
        p = dataclasses.replace(BRAIN, photons=photons, read_noise_e=0.0)
        sds.append(S.qobm_forward(np.zeros((128, 128)), p, 5).noise_std)
    assert sds[0] / sds[1] == pytest.approx(2.0, rel=0.05)
    assert sds[1] / sds[2] == pytest.approx(2.0, rel=0.05)
    # read noise adds on top
    p = dataclasses.replace(BRAIN, photons=1000.0, read_noise_e=30.0)
    assert S.qobm_forward(np.zeros((128, 128)), p, 5).noise_std > 1.2 * sds[0]


def test_raw_captures_follow_photon_budget_and_falloff():
    p = dataclasses.replace(BRAIN, photons=5000.0, falloff=0.5)
    out = S.qobm_forward(np.zeros((64, 64)), p, 0)
    assert out.raw.shape == (4, 64, 64) and out.dpc.shape == (2, 64, 64)
    assert 0.7 * 5000 < out.raw.mean() < 1.1 * 5000
    # +x fibre: brighter on the right; -x fibre: brighter on the left
    assert out.raw[0, :, -8:].mean() > out.raw[0, :, :8].mean()
    assert out.raw[1, :, :8].mean() > out.raw[1, :, -8:].mean()


# ----------------------------------------------------------------- scene-level physics (GT)
def _single(dn, z=0.0, cdn=0.0, cell_scale=0.0, size=160):
    """A one-nucleus scene rendered at focus, without background fields."""
    px = BRAIN.pixel_size
    sc = S.Scene(size * px, size * px)
    c = size * px / 2
    sc.add_nucleus(c, c, z=z, a=4.5, b=4.0, c=3.5, dn=dn, cdn=cdn, cell_scale=cell_scale)
    r = S.render_scene(sc, (size, size), px, 0.0, BRAIN)
    return sc, r


def test_zero_contrast_nucleus_invisible_in_phase_but_in_dapi_and_labels():
    sc, r = _single(dn=0.0)
    assert (r.nuclei == 1).sum() > 200  # labelled
    assert np.abs(r.phase).max() == 0.0  # no phase signature at all
    q = S.qobm_forward(r.phase, BRAIN, 0)
    inside = r.nuclei == 1
    cnr = S._cnr(q.phase_clean, r.nuclei, 1, q.noise_std)
    assert abs(cnr[0]) < 1e-3
    assert abs(q.phase[inside].mean() - q.phase[~inside].mean()) < 3 * q.noise_std / 10
    dapi = S.dapi_forward(r, sc, BRAIN, 0)
    assert dapi[inside].mean() > 0.2 and dapi[inside].mean() > 4 * np.median(dapi[~inside])
    # the same nucleus with contrast is clearly visible
    _, r2 = _single(dn=0.008)
    q2 = S.qobm_forward(r2.phase, BRAIN, 0)
    assert S._cnr(q2.phase_clean, r2.nuclei, 1, q2.noise_std)[0] > 3.0


def test_zero_contrast_nucleus_inside_cell_body_is_not_a_hole():
    # nucleus Δn is relative to its cytoplasm: with dn = 0 the cell body is uniform, no hole
    _, r = _single(dn=0.0, cdn=0.006, cell_scale=1.8)
    inside = r.nuclei == 1
    ring = (r.phase > 0) & ~inside
    assert ring.sum() > 50
    # per-µm path the nucleus region is like the cytoplasm: phase inside ≥ the body's rim
    assert r.phase[inside].mean() >= np.percentile(r.phase[ring], 50)


def test_in_section_fraction_falls_with_depth():
    ins = []
    for z in (0.0, 2.0, 3.5):
        _, r = _single(dn=0.006, z=z)
        ins.append(float(r.in_section[0]))
    assert ins[0] > 0.95
    assert ins[0] > ins[1] > ins[2]
    assert ins[2] < 0.5


def test_distractors_in_phase_absent_in_dapi():
    px = BRAIN.pixel_size
    n = 160
    sc = S.Scene(n * px, n * px)
    sc.add_blob(20.0, 20.0, a=3.7, b=3.7, dn=0.05, kind=S.RBC)
    sc.add_blob(45.0, 40.0, a=1.5, dn=0.1, kind=S.LIPID)
    r = S.render_scene(sc, (n, n), px, 0.0, BRAIN)
    assert r.distractors.max() == 2 and r.nuclei.max() == 0
    assert list(r.distractor_kind) == [S.RBC, S.LIPID]
    q = S.qobm_forward(r.phase, BRAIN, 0)
    d = r.distractors > 0
    assert np.abs(q.phase[d]).mean() > 5 * q.noise_std
    dapi = S.dapi_forward(r, sc, BRAIN, 0)
    assert float(r.dna_bins.sum()) == 0.0  # no DNA at all
    assert dapi[d].mean() < 0.12  # background only (autofluorescence 0.05 + noise)


def test_simulated_distractors_dark_in_dapi_bright_in_phase():
    s = S.simulate_pair("brain-20x", size=256, seed=4)
    assert s.distractors.max() > 0 and len(s.distractor_kind) == s.distractors.max()
    only_d = (s.distractors > 0) & (s.nuclei == 0)
    nuc = s.nuclei > 0
    assert np.median(s.dapi[only_d]) < 0.5 * np.median(s.dapi[nuc])
    assert np.abs(s.qobm[only_d]).mean() > np.abs(s.qobm[~only_d & ~nuc]).mean()


# ------------------------------------------------------------------------- ambiguity model
def test_ambiguity_statistics_brain20x():
    cnr, ins = [], []
    for seed in range(3):
        s = S.simulate_pair("brain-20x", size=256, seed=100 + seed)
        cnr.append(s.nucleus_cnr)
        ins.append(s.nucleus_in_section)
    cnr, ins = np.concatenate(cnr), np.concatenate(ins)
    assert len(cnr) > 40
    near_zero = np.mean(np.abs(cnr) < 1.0)
    assert 0.1 < near_zero < 0.5  # a real hard subset, but most nuclei have a signature
    assert np.mean(cnr > 1) > 0.15 and np.mean(cnr < -1) > 0.15  # both contrast signs
    assert 0.05 < np.mean(ins < 0.5) < 0.6  # some DAPI nuclei mostly outside the section
    assert np.mean(ins > 0.9) > 0.2


def test_dapi_fixed_scale():
    s = S.simulate_pair("brain-20x", size=256, seed=7)
    bg = s.dapi[s.nuclei == 0]
    assert 0.01 < np.median(bg) < 0.12
    per_nucleus = np.array(
        [np.percentile(s.dapi[s.nuclei == i], 90) for i in range(1, s.nuclei.max() + 1)]
    )
    assert 0.25 < np.median(per_nucleus) < 0.95


# ------------------------------------------------------------------------------- Z stacks
def test_z_stack_shapes_and_defocus():
    s = S.simulate_pair("brain-20x", size=96, seed=5, z_planes=3, z_step_um=2.0)
    for name in ("qobm", "dapi", "nuclei", "distractors"):
        assert getattr(s, name).shape == (3, 96, 96), name
    n = int(s.nuclei.max())
    assert s.nucleus_cnr.shape == (3, n) and s.nucleus_in_section.shape == (3, n)
    np.testing.assert_allclose(s.focus_um, [-2.0, 0.0, 2.0])
    assert not np.allclose(s.qobm[0], s.qobm[2])
    # the same nucleus keeps its label across planes; labelled planes have in_section > 0 info
    assert set(np.unique(s.nuclei)) - {0} == set(range(1, n + 1))
    absent = np.array([[(s.nuclei[k] == i + 1).sum() == 0 for i in range(n)] for k in range(3)])
    assert np.all(np.isnan(s.nucleus_cnr[absent]))
    assert np.all(s.nucleus_in_section[absent] == 0)


# --------------------------------------------------------------------------- dataset writer
def test_write_dataset_ome_tiff_and_cli(tmp_path):
    import tifffile

    paths = S.write_dataset(tmp_path / "ds", preset="brain-20x", n=2, size=48, seed=3)
    assert [p.name for p in paths] == ["000_qobm.ome.tif", "001_qobm.ome.tif"]
    for stem in ("000", "001"):
        for kind in ("qobm", "dapi", "nuclei"):
            f = tmp_path / "ds" / f"{stem}_{kind}.ome.tif"
            with tifffile.TiffFile(f) as tf:
                assert tf.is_ome
                assert 'PhysicalSizeX="0.414"' in tf.ome_metadata
                arr = tf.asarray()
            assert arr.shape == (48, 48)
        meta = json.loads((tmp_path / "ds" / f"{stem}_meta.json").read_text())
        assert meta["preset"] == "brain-20x" and meta["pixel_size_um"] == pytest.approx(0.414)
        lab = tifffile.imread(tmp_path / "ds" / f"{stem}_nuclei.ome.tif")
        assert len(meta["nucleus_cnr"]) == lab.max() == len(meta["nucleus_in_section"])
    s1 = S.simulate_pair("brain-20x", size=48, seed=4)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "ds" / "001_qobm.ome.tif"), s1.qobm)
    assert not list((tmp_path / "ds").glob(".tmp_*"))  # atomic writes leave no temp files

    from napari_lcm_stain.cli import main

    rc = main(["simulate", "--preset", "shifted-20x", "--n", "1", "--size", "32",
               "--out", str(tmp_path / "cli"), "--z-planes", "2"])  # fmt: skip
    assert rc == 0
    stack = tifffile.imread(tmp_path / "cli" / "000_dapi.ome.tif")
    assert stack.shape == (2, 32, 32)
    meta = json.loads((tmp_path / "cli" / "000_meta.json").read_text())  # strict JSON, no NaN
    assert np.asarray(meta["nucleus_in_section"]).shape[0] == 2
    assert main(["simulate", "--preset", "nope", "--n", "1", "--out", str(tmp_path / "x")]) == 2
    with pytest.raises(ValueError, match="n must be"):
        S.write_dataset(tmp_path / "y", n=0)


@pytest.mark.parametrize("preset", ["brain-60x", "shifted-20x", "tumour-dense-20x"])
def test_other_presets_run(preset):
    s = S.simulate_pair(preset, size=64, seed=1)
    assert s.qobm.shape == (64, 64) and np.isfinite(s.qobm).all()
    assert s.pixel_size == S.get_preset(preset).pixel_size


def test_focus_sweep_moves_the_section():
    sc, _ = _single(dn=0.006, z=2.0)
    px = BRAIN.pixel_size
    ins = [S.render_scene(sc, (160, 160), px, zf, BRAIN).in_section[0] for zf in (-2.0, 0.0, 2.0)]
    assert ins[0] < ins[1] < ins[2]
    assert ins[2] > 0.95  # focused on the nucleus: fully inside the section


def test_misregistration_option_shifts_dapi():
    sc, r = _single(dn=0.0)
    y, x = np.nonzero(r.nuclei == 1)
    quiet = dataclasses.replace(BRAIN, dapi_photons=1e7)
    d0 = S.dapi_forward(r, sc, quiet, 0)
    d1 = S.dapi_forward(r, sc, dataclasses.replace(quiet, dapi_misregistration_px=3.0), 0)

    def centroid(img):
        w = np.clip(img - np.median(img), 0, None)
        yy, xx = np.indices(img.shape)
        return np.array([(w * yy).sum(), (w * xx).sum()]) / w.sum()

    c0 = centroid(d0)
    np.testing.assert_allclose(c0, [y.mean(), x.mean()], atol=1.0)  # registered by default
    assert np.linalg.norm(centroid(d1) - c0) > 0.5
