"""`lcm-stain evaluate --suite instruments`: held-out instrument variants, JSON shape, stain()
arguments per variant, seeds, and that no variant lies inside the training ranges."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_lcm_stain import evaluate as E
from napari_lcm_stain import simulate as S

MODELS = ["oracle", "lcm-1", "lcm-4", "teacher-1", "pix2pix"]


@pytest.fixture
def stub_stain(monkeypatch):
    """A stain() stand-in: 'lcm' returns the true DAPI when the pixel size is given, pix2pix a
    blurred copy; no-metadata calls get a blank output. Records every call."""
    calls = []

    def stub(image, **kw):
        calls.append({**kw, "shape": np.shape(image), "std": float(np.std(image))})
        truth = stub.truth[np.shape(image)]
        if kw["pixel_size"] == "auto":  # no metadata: the engine would estimate it
            return np.zeros(np.shape(image), np.float32)
        if kw["model"] == "pix2pix":
            from scipy import ndimage

            return ndimage.gaussian_filter(truth, 3).astype(np.float32)
        return truth

    real_fields = E.suite_fields

    def fields(variant, n, size):
        out = real_fields(variant, n, size)
        for s in out:
            stub.truth[np.shape(s.qobm)] = s.dapi
        return out

    stub.truth = {}
    monkeypatch.setattr(E, "_stain", stub)
    monkeypatch.setattr(E, "suite_fields", fields)
    return calls


def test_suite_json_shape_on_a_tiny_run(stub_stain, tmp_path, capsys):
    from napari_lcm_stain.cli import main

    out = tmp_path / "suite.json"
    rc = main(["evaluate", "--suite", "instruments", "--n", "1", "--size", "128",
               "--device", "cpu", "--json", str(out)])  # fmt: skip
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["suite"] == "instruments" and data["suite_version"] == E.SUITE_VERSION
    assert (data["n"], data["size"], data["device"]) == (1, 128, "cpu")
    assert data["fields"] == [{"seed": E.SUITE_SEED0, "preset": E.BENCHMARK_PRESETS[0]}]
    names = [v.name for v in E.INSTRUMENT_VARIANTS]
    assert len(names) >= 5 and list(data["variants"]) == names
    for group in [data["in_domain"], *data["variants"].values()]:
        assert isinstance(group["description"], str) and group["description"]
        assert list(group["models"]) == MODELS and group["skipped"] == {}
        for m in MODELS:
            for k in ("f1", "pearson", "ssim"):
                assert isinstance(group["models"][m][k], float), (m, k)
    for name in names:
        sm = data["variants"][name]["summary"]
        assert set(sm) == {"lcm1_f1_over_oracle", "vs_in_domain", "lcm1_minus_pix2pix_f1",
                           "meets_target"}  # fmt: skip
    # the stub makes LCM perfect with a pixel size and blank without one
    assert data["in_domain"]["models"]["lcm-1"]["ssim"] == pytest.approx(1.0)
    nometa = data["variants"]["coarse-2x-nometa"]
    assert nometa["models"]["lcm-1"]["f1"] == 0.0 and nometa["summary"]["meets_target"] is False
    assert data["variants"]["phase-nm"]["summary"]["vs_in_domain"] == pytest.approx(1.0)
    table = capsys.readouterr().out
    for name in ["in-domain", *names]:
        assert any(line.startswith(name + " ") for line in table.splitlines()), name
    assert "phase given as optical path in nm" in table
    md = E.format_suite_markdown(data).splitlines()
    assert len(md) == 2 + 1 + len(names)  # header, rule, in-domain, one row per variant
    for line, v in zip(md[3:], E.INSTRUMENT_VARIANTS):
        assert line.startswith(f"| `{v.name}` | {v.description} |")
    assert "| no |" in next(ln for ln in md if ln.startswith("| `coarse-2x-nometa`"))
    # the estimator is scored on every no-metadata variant, and pooled
    nometa_names = [v.name for v in E.INSTRUMENT_VARIANTS if not v.pixel_size_known]
    assert len(nometa_names) >= 4
    for name in nometa_names:
        pe = data["variants"][name]["pixel_size_estimator"]
        assert len(pe["rel_errors"]) == 1 and pe["true_um"][0] > 0.2
        assert pe["rel_errors"][0] == pytest.approx(
            abs(pe["estimated_um"][0] / pe["true_um"][0] - 1), abs=1e-3
        )
    assert data["pixel_size_estimator"]["n"] == len(nometa_names)
    assert "pixel-size estimator on the" in table


def test_stain_gets_each_variant_as_a_user_would_give_it(stub_stain):
    E.run_instrument_suite(n=1, size=64, device="cpu")
    by_variant: dict[tuple, list] = {}
    for c in stub_stain:
        by_variant.setdefault((c["pixel_size"], c["shape"]), []).append(c)
    # 0.414 µm/px fields of 64²; the same area at 0.828, 0.25 and 1.24 µm/px, with and without
    # metadata (without: "auto", the engine estimates it)
    assert {k for k in by_variant} == {
        (0.414, (64, 64)), (0.828, (32, 32)), ("auto", (32, 32)), (0.25, (106, 106)),
        ("auto", (106, 106)), (1.24, (21, 21)), ("auto", (21, 21)),
    }  # fmt: skip
    # four model rows (the oracle never calls stain) × eight 0.414 groups
    assert len(by_variant[(0.414, (64, 64))]) == 4 * 8
    assert {(c["model"], c["steps"]) for c in stub_stain} == {
        ("lcm", 1), ("lcm", 4), ("teacher", 1), ("pix2pix", None)
    }  # fmt: skip
    stds = sorted(c["std"] for c in by_variant[(0.414, (64, 64))])
    assert stds[-1] > 50 * stds[0]  # the nm variant hands over a phase ~115× larger


def test_variant_fields_same_tissue_other_instrument():
    v = {x.name: x for x in E.INSTRUMENT_VARIANTS}
    ref = E.suite_fields(E.IN_DOMAIN, 2, 64)
    assert [s.pixel_size for s in ref] == [0.414, 0.414]
    nm = E.suite_fields(v["phase-nm"], 2, 64)
    for a, b in zip(ref, nm):
        np.testing.assert_allclose(b.qobm, a.qobm * E.NM_PER_RAD, rtol=1e-6)
        np.testing.assert_array_equal(a.dapi, b.dapi)
    one = E.suite_fields(v["single-axis-dpc"], 2, 64)
    for a, b in zip(ref, one):
        np.testing.assert_array_equal(a.nuclei, b.nuclei)  # the tissue does not change
        assert not np.allclose(a.qobm, b.qobm)
    coarse = E.suite_fields(v["coarse-2x-meta"], 1, 64)[0]
    assert coarse.pixel_size == pytest.approx(0.828) and coarse.qobm.shape == (32, 32)


def test_variants_lie_outside_the_training_ranges():
    R = S.DOMAIN_RANGES
    draws = [S.sample_instrument(seed) for seed in range(300)]
    v = {x.name: x for x in E.INSTRUMENT_VARIANTS}
    # structural: training always reconstructs two axes with the WOTF
    assert (
        {p.dpc_axes for p in draws} == {"xy"} != {dict(v["single-axis-dpc"].overrides)["dpc_axes"]}
    )
    assert {p.reconstruction for p in draws} == {"tikhonov"}
    assert dict(v["gradient-recon"].overrides)["reconstruction"] != "tikhonov"
    # out of range
    low = dict(v["low-light"].overrides)
    assert low["photons"] < R["photons"].lo and low["read_noise_e"] > R["read_noise_e"].hi
    base = S.get_preset("brain-20x").pixel_size
    assert base * v["coarse-2x-meta"].coarsen > R["pixel_size"].hi
    assert 1 / v["coarse-2x-nometa"].coarsen < R["nucleus_size_scale"].lo  # apparent size
    assert not v["coarse-2x-nometa"].pixel_size_known
    assert v["phase-nm"].phase_scale > 100  # training phase is always in rad
    for x in E.INSTRUMENT_VARIANTS:
        assert x.description and "\n" not in x.description and len(x.description) < 120
    # tissue: held-out families, through-focus settings and pixel sizes outside training's
    from napari_lcm_stain.tissue import HELD_OUT_FAMILIES

    T = S.TISSUE_RANGES
    assert dict(v["rosettes"].overrides)["layout"] in HELD_OUT_FAMILIES
    assert dict(v["perivascular-cuffs"].overrides)["layout"] in HELD_OUT_FAMILIES
    tf = dict(E.TF_HELD_OUT)
    assert tf["tf_defocus_um"] > T["tf_defocus_um"].hi
    assert tf["tf_residual_defocus_um"] > T["tf_residual_defocus_um"].hi
    assert tf["tf_alpha"] > T["tf_alpha"].hi and tf["tf_lowcut_um"] < T["tf_lowcut_um"].lo
    assert v["px-1.24-meta"].pixel_size_um > T["pixel_size"].hi
    assert len(E.INSTRUMENT_VARIANTS) >= 12


def test_suite_seeds_are_disjoint_from_training_and_benchmark():
    suite = set(range(E.SUITE_SEED0, E.SUITE_SEED0 + 1000))
    bench = set(range(E.BENCHMARK_SEED0, E.BENCHMARK_SEED0 + 1000))
    training = {seed * 100_000 + i for seed in range(20) for i in range(1000)}
    assert not suite & bench and not suite & training


def test_suite_summary_target_logic():
    def models(oracle, lcm, p2p):
        return {"oracle": {"f1": oracle}, "lcm-1": {"f1": lcm}, "pix2pix": {"f1": p2p}}

    ind = models(0.6, 0.3, 0.2)  # rel 0.5
    ok = E._suite_summary(ind, models(0.5, 0.21, 0.1))  # rel 0.42 = 0.84 of in-domain
    assert ok["vs_in_domain"] == pytest.approx(0.84) and ok["meets_target"] is True
    assert E._suite_summary(ind, models(0.5, 0.19, 0.1))["meets_target"] is False  # 0.76
    assert E._suite_summary(ind, models(0.5, 0.25, 0.3))["meets_target"] is False  # < pix2pix
    none = E._suite_summary(ind, {"oracle": {"f1": 0.5}})
    assert none["vs_in_domain"] is None and none["meets_target"] is False


def test_suite_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n must be at least 1"):
        E.run_instrument_suite(n=0)
    with pytest.raises(FileNotFoundError, match="weights_dir"):
        E.run_instrument_suite(n=1, size=64, weights_dir=tmp_path / "nope")
