"""The out-of-distribution score: flags clearly wrong inputs, stays quiet on in-domain fields,
reaches `StainResult.info`, the CLI and `stain()`'s warnings, and never blocks."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from _fake_predictor import FakePredictor
from napari_lcm_stain import cli, ood
from napari_lcm_stain._drain import drain
from napari_lcm_stain.engine import iter_stain, stain
from napari_lcm_stain.simulate import get_preset, simulate_pair

SEED = 610_500  # the reference script's "wrong input" seed range, away from training/benchmark
KW = {"tile": 128, "overlap": 16}


@pytest.fixture(scope="module")
def field():
    return simulate_pair("brain-20x", size=256, seed=SEED)


def test_packaged_reference_is_complete():
    ref = ood.load_reference()
    assert set(ref["features"]) == set(ood.FEATURES)
    assert 1.0 < ref["threshold"] < 10.0
    assert ref["pixel_size"] == pytest.approx(0.414)
    assert all(v["spread"] > 0 for v in ref["features"].values())


@pytest.mark.parametrize("preset", ["brain-20x", "tumour-dense-20x"])
def test_in_domain_fields_are_not_flagged(preset):
    for seed in (SEED + 1, SEED + 2):
        r = ood.ood_score(simulate_pair(preset, size=256, seed=seed).qobm)
        assert not r["flag"], r
        assert r["score"] < r["threshold"]
        assert r["reasons"] == [] or all("z =" in s for s in r["reasons"])


def _brightfield(s, rng):
    absorb = ndimage.gaussian_filter((s.nuclei > 0) * 0.5 + (s.distractors > 0) * 0.3, 1.0)
    return rng.poisson(2000 * np.exp(-absorb)) / 2000.0


@pytest.mark.parametrize(
    "case, reason",
    [
        ("dapi", "bright"),
        ("brightfield", "dark tail"),
        ("noise", "noise, or coarser pixels"),
        ("labels", "exactly equal"),
        ("coarse3", "pixel size"),
    ],
)
def test_wrong_inputs_are_flagged_with_a_reason(field, case, reason):
    rng = np.random.default_rng(0)
    if case == "dapi":
        plane = field.dapi
    elif case == "brightfield":
        plane = _brightfield(field, rng)
    elif case == "noise":
        plane = rng.standard_normal((256, 256)).astype(np.float32)
    elif case == "labels":
        plane = field.nuclei
    else:  # 3x coarser pixels, scored with no pixel size (as if at the model's)
        p = get_preset("brain-20x")
        plane = simulate_pair(dataclasses.replace(p, pixel_size=3 * p.pixel_size), 256, SEED).qobm
    r = ood.ood_score(plane)
    assert r["flag"], r
    assert r["score"] > r["threshold"]
    assert any(reason in s for s in r["reasons"]), r["reasons"]


def test_score_is_invariant_to_scale_and_offset(field):
    x = field.qobm.astype(np.float64)
    base = ood.ood_score(x)
    for a in (0.01, 3.0, 100.0):
        for b in (-5.0, 7.0):
            r = ood.ood_score(a * x + b)
            assert r["score"] == pytest.approx(base["score"], abs=0.02), (a, b)
            assert r["flag"] == base["flag"]


def test_known_pixel_size_is_resampled_before_the_spectra(field):
    # the same field down-sampled 2x: flagged when read as the model's pixel size, fine when the
    # true pixel size is given (spectra then compare the same physical frequencies)
    from skimage.transform import rescale

    big = simulate_pair("brain-20x", size=512, seed=SEED + 3).qobm
    small = rescale(big, 0.5, anti_aliasing=True)
    told = ood.ood_score(small, pixel_size=2 * field.pixel_size)
    untold = ood.ood_score(small)
    assert not told["flag"], told
    assert untold["score"] > told["score"] + 1.0


def test_bad_shapes_small_planes_and_a_broken_reference_never_raise(monkeypatch, field):
    with pytest.raises(ValueError, match="one 2-D plane"):
        ood.ood_score(np.zeros((2, 64, 64)))
    small = ood.ood_score(np.zeros((16, 200)))
    assert small["score"] is None and not small["flag"]
    assert "smaller than 32 px" in small["reasons"][0]
    monkeypatch.setattr(ood, "load_reference", lambda path=None: json.loads("{}"))
    r = ood.check_plane(field.qobm)
    assert r["score"] is None and r["flag"] is False
    assert r["reasons"][0].startswith("not scored: ")


def test_summarise_a_stack_names_the_worst_plane():
    good = {"score": 1.0, "threshold": 2.8, "flag": False, "reasons": []}
    bad = {"score": 9.0, "threshold": 2.8, "flag": True, "reasons": ["many equal (z = +20)"]}
    s = ood.summarise({(0,): good, (1,): bad, (2,): good})
    assert s["flag"] and s["score"] == 9.0
    assert s["plane"] == [1] and s["planes_flagged"] == 1 and s["planes"] == 3
    assert "1 of 3 planes; worst plane (1,): OOD score 9.0 > 2.8: many equal" in s["note"]
    quiet = ood.summarise({(): good})
    assert quiet["note"] is None and "planes" not in quiet
    assert ood.summarise({}) is None


# ------------------------------------------------------------------------------ engine, CLI


def test_engine_info_has_the_score_and_a_note_only_when_flagged(field):
    pred = FakePredictor()
    ok = drain(iter_stain(field.qobm[:128, :128], pred, pixel_size=field.pixel_size, **KW))
    assert ok.info["ood"]["flag"] is False and ok.info["ood"]["score"] is not None
    assert not any("OOD score" in n for n in ok.info["warnings"])

    labels = np.stack([field.nuclei[:128, :128], field.qobm[:128, :128]])
    res = drain(iter_stain(labels, pred, pixel_size=field.pixel_size, **KW))
    info = res.info["ood"]
    assert info["flag"] and info["plane"] == [0] and info["planes_flagged"] == 1
    assert info["planes"] == 2
    notes = [n for n in res.info["warnings"] if "OOD score" in n]
    assert len(notes) == 1 and notes[0] == info["note"]
    assert "1 of 2 planes; worst plane (0,)" in notes[0]
    assert res.mean.shape == labels.shape and np.isfinite(res.mean).all()  # never blocks


def test_stain_warns_when_flagged(field):
    with pytest.warns(UserWarning, match="does not look like the qOBM phase"):
        out = stain(field.nuclei[:128, :128], FakePredictor(), **KW)
    assert out.shape == (128, 128)


def test_cli_prints_one_note_for_a_wrong_input_and_none_for_phase(capsys, tmp_path, field):
    wrong, phase = tmp_path / "labels.tif", tmp_path / "phase.tif"
    tifffile.imwrite(wrong, field.nuclei[:128, :128].astype(np.uint16))
    tifffile.imwrite(phase, field.qobm[:128, :128])
    for src in (wrong, phase):
        rc = cli.main(["stain", str(src), "-o", str(tmp_path / f"{src.stem}-out.tif"), "--tile",
                       "128", "--overlap", "16", "--device", "cpu"])  # fmt: skip
        assert rc == 0
    out = capsys.readouterr().out.splitlines()
    ood_lines = [ln for ln in out if "does not look like the qOBM phase" in ln]
    assert len(ood_lines) == 1, out
    assert ood_lines[0].startswith("  note: input does not look like")
    assert "OOD score" in ood_lines[0] and "exactly equal" in ood_lines[0]
    wrote = [ln for ln in out if ln.startswith("wrote ")]
    assert "labels-out.tif" in wrote[0] and "phase-out.tif" in wrote[1]
    assert out.index(ood_lines[0]) < out.index(wrote[1])  # the note belongs to the labels


# ------------------------------------------------------------------------------ reference script


@pytest.fixture(scope="module")
def script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "scripts" / "ood_reference.py"
    spec = importlib.util.spec_from_file_location("ood_reference", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reference_script_builds_from_any_sampler(script, tmp_path, field, monkeypatch):
    calls = []

    def sampler(seed, size):  # a stand-in for a future domain-randomised sampler
        calls.append((seed, size))
        return field.qobm[: size // 2, : size // 2] * (1 + seed % 3), 0.5

    monkeypatch.setattr(script, "load_sampler", lambda spec: sampler)
    out = tmp_path / "ref.json"
    assert script.main(["--sampler", "mine:sampler", "--n", "4", "--out", str(out)]) == 0
    ref = json.loads(out.read_text())
    assert [s for s, _ in calls] == [script.REFERENCE_SEED0 + i for i in range(4)]
    assert [z for _, z in calls] == list(script.REFERENCE_SIZES)
    assert ref["pixel_size"] == 0.5 and set(ref["features"]) == set(ood.FEATURES)
    assert ref["built_from"]["sampler"] == "mine:sampler" and ref["built_from"]["n"] == 4
    assert ref["threshold"] == pytest.approx(
        math.ceil(script.THRESHOLD_FACTOR * ref["reference_max_score"] * 10) / 10
    )
    assert ood.ood_score(field.qobm, 0.5, ref)["threshold"] == ref["threshold"]
    monkeypatch.undo()
    with pytest.raises(SystemExit, match="module:function"):
        script.load_sampler("no_colon")


def test_reference_script_measure_reports_every_case(script, tmp_path):
    out = tmp_path / "ood.json"
    args = ["--measure", "--n-holdout", "2", "--n-case", "1", "--json", str(out)]
    assert script.main(args) == 0
    result = json.loads(out.read_text())
    assert result["threshold"] == ood.load_reference()["threshold"]
    assert result["false_alarms"]["in-domain held-out fields"]["n"] == 2
    must = result["must_flag"]
    assert {"DAPI image as phase", "label image (nuclei labels)", "pure noise (Gaussian, float)",
            "pixel size 3x coarser, no metadata"} <= set(must)  # fmt: skip
    assert any(k.startswith("brightfield-like") for k in must)
    assert all(r["n"] == 1 and r["rate"] == 1.0 for r in must.values()), must
    assert "shifted-20x (mild shift)" in result["reported"]
