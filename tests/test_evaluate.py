"""`lcm-stain evaluate`: table logic, JSON shape and the oracle row, with a stubbed stain()."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from skimage.draw import disk

from napari_lcm_stain import evaluate as E
from napari_lcm_stain import metrics as M

PS = 0.414


def _fake_sample(seed: int, size: int = 96):
    """A tiny SimSample-like field: discs in DAPI, a phase image, one distractor, one unlabelled."""
    rng = np.random.default_rng(seed)
    dapi = np.full((size, size), 0.05, np.float32)
    nuclei = np.zeros((size, size), np.int32)
    centres = [(20, 20), (20, 70), (70, 20), (70, 70)]
    for i, c in enumerate(centres, start=1):
        rr, cc = disk(c, 7 + seed % 2, shape=dapi.shape)
        dapi[rr, cc] = 0.6
        if i < 4:  # nucleus 4 is visible in DAPI but not labelled (out of focus)
            nuclei[rr, cc] = i
    dapi += 0.01 * rng.standard_normal(dapi.shape).astype(np.float32)
    distr = np.zeros_like(nuclei)
    rr, cc = disk((46, 46), 4)
    distr[rr, cc] = 1
    qobm = (dapi - 0.3).astype(np.float32)
    qobm[distr > 0] = 1.0  # the distractor is bright in phase
    return SimpleNamespace(
        qobm=qobm,
        dapi=dapi,
        nuclei=nuclei,
        distractors=distr,
        nucleus_cnr=np.array([0.2, 3.0, 5.0]),
        nucleus_in_section=np.array([1.0, 0.3, 1.0]),
        pixel_size=PS,
        preset="fake",
    )


@pytest.fixture
def fake_bench(monkeypatch):
    """Two fake fields instead of the simulator, and a stain() stub that records its calls."""
    samples = [_fake_sample(0), _fake_sample(1)]

    def fields(n, size):
        for i in range(n):
            yield E.BENCHMARK_SEED0 + i, "fake", samples[i % 2]

    calls = []

    def stub(image, **kw):
        calls.append(kw)
        q = np.asarray(image, np.float64)
        out = np.clip(q + 0.3, 0, 1)  # the phase happens to be DAPI - 0.3 (+ the distractor)
        if kw["model"] == "pix2pix":
            out = np.clip(out + 0.05, 0, 1)
        return out.astype(np.float32)

    def no_vae(dapi, model="lcm"):
        raise FileNotFoundError("no VAE weights in this test")

    monkeypatch.setattr(E, "benchmark_fields", fields)
    monkeypatch.setattr(E, "_stain", stub)
    monkeypatch.setattr(E, "vae_reconstruction", no_vae)
    # FULL_ROWS only: the rows a guided release adds (test_guidance_rows_follow_the_checkpoints)
    monkeypatch.setattr(E, "guidance_rows", lambda weights_dir=None: ())
    return SimpleNamespace(samples=samples, calls=calls)


def test_json_shape_and_oracle_row_match_hand_computation(fake_bench, tmp_path, capsys):
    out = tmp_path / "sub" / "eval.json"
    res = E.run_evaluate(json_path=out, n=2, size=96, device="cpu")
    data = json.loads(out.read_text())
    assert data["benchmark_version"] == E.BENCHMARK_VERSION == 1
    assert (data["n"], data["size"], data["device"]) == (2, 96, "cpu")
    assert isinstance(data["seconds"], float)
    names = [r.name for r in E.FULL_ROWS if r.name != "vae-recon"]
    assert list(data["models"]) == names
    assert data["skipped"]["vae-recon"].startswith("FileNotFoundError")
    for key in ("oracle", "lcm-1", "lcm-2", "lcm-4", "teacher-50", "pix2pix", "threshold-phase"):
        row = data["models"][key]
        for col in E.COLUMNS:
            assert isinstance(row[col], float), (key, col)
            assert isinstance(row["std"][col], float)
        assert {"pooled", "recall_by_contrast", "seconds"} <= set(row)
    assert set(data["hard_subset"]["models"]) == set(names)
    assert set(data["skipped"]) == {"vae-recon"}

    # the oracle row is the mean / sample std of image_metrics(true DAPI, true DAPI) by hand
    per = [M.image_metrics(s.dapi, s.dapi, sample=s) for s in fake_bench.samples]
    oracle = data["models"]["oracle"]
    for col in E.COLUMNS:
        vals = np.array([p[col] for p in per], float)
        assert oracle[col] == pytest.approx(vals.mean()), col
        assert oracle["std"][col] == pytest.approx(vals.std(ddof=1)), col
    assert oracle["pearson"] == pytest.approx(1.0) and oracle["ssim"] == pytest.approx(1.0)
    # three labelled nuclei per field, all found; the unlabelled visible one is ignored, not an FP
    assert oracle["pooled"]["tp"] == 6 and oracle["pooled"]["fp"] == 0
    assert oracle["pooled"]["n_ignored"] == 2 and oracle["f1"] == 1.0
    for col in E.COLUMNS:
        assert res["models"]["oracle"][col] == pytest.approx(oracle[col])

    # the printed table has the oracle beside every model, in order
    table = capsys.readouterr().out
    lines = [ln.split()[0] for ln in table.splitlines() if ln.split() and ln.split()[0] in names]
    assert lines == names


def test_stain_called_with_contract_arguments(fake_bench):
    E.run_evaluate(n=1, size=96, device="cpu")
    got = {(c["model"], c["steps"], c["texture"]) for c in fake_bench.calls}
    assert got == {("lcm", 1, False), ("lcm", 1, True), ("lcm", 2, False), ("lcm", 4, False)} | {
        ("teacher", 1, False),
        ("teacher", 4, False),
        ("teacher", 50, False),
        ("pix2pix", None, False),
    }  # the texture row is LCM-1 with grain; every other row as a user gets it (smooth)
    for c in fake_bench.calls:
        assert c["seed"] == 0 and c["pixel_size"] == PS and c["device"] == "cpu"


def test_quick_uses_fewer_rows_and_fields(fake_bench):
    res = E.run_evaluate(quick=True, size=96)
    assert res["n"] == E.QUICK_N and list(res["models"]) == [r.name for r in E.QUICK_ROWS]
    assert len(E.QUICK_ROWS) < len(E.FULL_ROWS)


def test_models_differ_in_the_table(fake_bench):
    res = E.run_evaluate(n=2, size=96)
    lcm, p2p, base = (res["models"][k] for k in ("lcm-1", "pix2pix", "threshold-phase"))
    # the stub's LCM output equals the DAPI except at the distractor, pix2pix is brighter
    assert lcm["psnr"] > p2p["psnr"]
    assert lcm["pearson"] > 0.9
    assert base["hallu_near_distractors"] >= lcm["hallu_near_distractors"]


def test_missing_weights_row_is_skipped_with_reason(fake_bench, monkeypatch, tmp_path):
    from napari_lcm_stain.checkpoints import CheckpointError

    real = E._stain

    def flaky(image, **kw):
        if kw["model"] == "pix2pix":
            raise CheckpointError("packaged 'pix2pix' weights are missing from weights/")
        return real(image, **kw)

    monkeypatch.setattr(E, "_stain", flaky)
    out = tmp_path / "e.json"
    res = E.run_evaluate(json_path=out, n=1, size=96)
    assert "pix2pix" not in res["models"] and "missing" in res["skipped"]["pix2pix"]
    assert json.loads(out.read_text())["skipped"]["pix2pix"].startswith("CheckpointError")


def test_no_model_at_all_is_an_error_after_the_table(fake_bench, monkeypatch, tmp_path, capsys):
    def missing(image, **kw):
        raise ImportError("No module named 'napari_lcm_stain.engine'")

    monkeypatch.setattr(E, "_stain", missing)
    out = tmp_path / "e.json"
    with pytest.raises(FileNotFoundError, match="no model could be evaluated"):
        E.run_evaluate(json_path=out, n=1, size=96)
    assert "oracle" in capsys.readouterr().out  # the table is still printed
    data = json.loads(out.read_text())  # and the JSON written
    assert list(data["models"]) == ["oracle", "threshold-phase"]
    assert len(data["skipped"]) == len(E.FULL_ROWS) - 2


def test_real_bugs_are_not_swallowed(fake_bench, monkeypatch):
    def broken(image, **kw):
        raise RuntimeError("shape mismatch inside the model")

    monkeypatch.setattr(E, "_stain", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        E.run_evaluate(n=1, size=96)


def test_weights_dir_passes_checkpoint_paths(fake_bench, tmp_path):
    for name in ("lcm", "teacher"):
        (tmp_path / f"{name}.safetensors").write_bytes(b"")
    nested = tmp_path / "run" / "pix2pix"
    nested.mkdir(parents=True)
    (nested / "pix2pix.safetensors").write_bytes(b"")
    E.run_evaluate(n=1, size=96, weights_dir=tmp_path)
    models = {c["model"] for c in fake_bench.calls}
    assert models == {
        str(tmp_path / "lcm.safetensors"),
        str(tmp_path / "teacher.safetensors"),
        str(nested / "pix2pix.safetensors"),
    }


def test_bad_arguments_raise_clear_errors(fake_bench, tmp_path):
    with pytest.raises(ValueError, match="n must be at least 1"):
        E.run_evaluate(n=0)
    with pytest.raises(TypeError, match="size must be an integer"):
        E.run_evaluate(size="big")
    with pytest.raises(ValueError, match="size must be at least"):
        E.run_evaluate(size=16)
    with pytest.raises(FileNotFoundError, match="weights_dir"):
        E.run_evaluate(n=1, weights_dir=tmp_path / "nope")
    with pytest.raises(ValueError, match="device"):
        E.run_evaluate(n=1, device="tpu")


def test_json_written_atomically_and_strict(fake_bench, tmp_path):
    out = tmp_path / "e.json"
    out.write_text("old")
    E.run_evaluate(json_path=out, n=1, size=96)
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text)
    assert [p.name for p in tmp_path.iterdir()] == ["e.json"]  # no temp files left behind


def test_cli_evaluate_writes_json(fake_bench, tmp_path):
    from napari_lcm_stain.cli import main

    out = tmp_path / "cli.json"
    assert main(["evaluate", "--quick", "--size", "96", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["models"]["oracle"]["f1"] == 1.0


def test_benchmark_fields_fixed_and_held_out():
    pytest.importorskip("napari_lcm_stain.simulate")
    a = list(E.benchmark_fields(2, 64))
    b = list(E.benchmark_fields(2, 64))
    assert [(s, p) for s, p, _ in a] == [
        (900_000, E.BENCHMARK_PRESETS[0]),
        (900_001, E.BENCHMARK_PRESETS[1]),
    ]
    np.testing.assert_array_equal(a[1][2].dapi, b[1][2].dapi)
    assert a[0][2].dapi.shape == (64, 64)


def test_threshold_phase_baseline_range():
    q = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    b = E.threshold_phase(q, PS)
    assert b.dtype == np.float32 and b.shape == q.shape
    assert b.min() == 0.0 and b.max() == 1.0
    assert np.all(E.threshold_phase(np.zeros((32, 32)), PS) == 0)


_WEIGHTS = Path(E.__file__).parent / "weights"


@pytest.mark.slow
@pytest.mark.skipif(
    not all((_WEIGHTS / f"{m}.safetensors").exists() for m in ("lcm", "teacher", "pix2pix")),
    reason="packaged weights not built yet",
)
def test_quick_evaluate_with_packaged_weights(tmp_path):
    out = tmp_path / "quick.json"
    res = E.run_evaluate(json_path=out, quick=True, device="cpu")
    assert res["skipped"] == {}
    assert list(res["models"]) == [r.name for r in E.QUICK_ROWS]
    lcm, base = res["models"]["lcm-1"], res["models"]["threshold-phase"]
    assert lcm["pearson"] > base["pearson"]
    assert json.loads(out.read_text())["benchmark_version"] == 1


def _row(**per_field):
    return {"per_field": {k: list(map(float, v)) for k, v in per_field.items()}}


def _rows_for_compare(f1_a, f1_b, hard_a, hard_b):
    """Two rows over the same fields; hard_* = (tp_hard, n_hard, near) per field."""
    n = len(f1_a)

    def row(f1, hard):
        tp, nh, near = zip(*hard)
        return _row(
            pearson=[0.5] * n, ssim=[0.4] * n, f1=f1, realism=[1.0] * n,
            tp_hard=tp, n_hard=nh, hallu_near_distractors=near,
        )  # fmt: skip

    return row(f1_a, hard_a), row(f1_b, hard_b)


def test_compare_rows_differences_and_pooled_hard_f1():
    a, b = _rows_for_compare(
        [0.5, 0.7, 0.6, 0.8], [0.4, 0.5, 0.5, 0.6], [(2, 10, 1)] * 4, [(1, 10, 4)] * 4
    )
    c = E.compare_rows(a, b, n_resamples=500)
    assert c["f1"]["diff"] == pytest.approx(0.15)
    assert 0 < c["f1"]["lo"] <= 0.15 <= c["f1"]["hi"]  # every field improves: interval above 0
    assert c["ssim"] == {"diff": 0.0, "lo": 0.0, "hi": 0.0}
    # pooled hard F1 by hand: a = 2*8/(16+4+32), b = 2*4/(8+16+36)
    assert c["hard_f1"]["diff"] == pytest.approx(16 / 52 - 8 / 60)
    # every field has the same counts, so every resample gives the same pooled difference
    assert c["hard_f1"]["lo"] == pytest.approx(c["hard_f1"]["diff"])


def test_compare_rows_interval_straddles_zero_for_mixed_fields_and_is_paired():
    a, b = _rows_for_compare(
        [0.9, 0.1, 0.8, 0.2, 0.7, 0.3], [0.5] * 6, [(1, 5, 0)] * 6, [(1, 5, 0)] * 6
    )
    c = E.compare_rows(a, b, n_resamples=500)
    assert c["f1"]["lo"] < 0 < c["f1"]["hi"]
    assert c["hard_f1"]["diff"] == 0.0
    # a constant offset on every field has a zero-width paired interval, however spread the fields
    a2, b2 = _rows_for_compare([0.9, 0.1, 0.5], [0.8, 0.0, 0.4], [(1, 5, 0)] * 3, [(1, 5, 0)] * 3)
    c2 = E.compare_rows(a2, b2, n_resamples=200)
    assert c2["f1"]["lo"] == pytest.approx(0.1) and c2["f1"]["hi"] == pytest.approx(0.1)


def test_compare_rows_errors_and_single_field():
    a, b = _rows_for_compare([0.5, 0.6], [0.4], [(1, 2, 0)] * 2, [(1, 2, 0)])
    with pytest.raises(ValueError, match="different fields"):
        E.compare_rows(a, b)
    a1, b1 = _rows_for_compare([0.5], [0.4], [(1, 2, 0)], [(0, 2, 1)])
    c = E.compare_rows(a1, b1)
    assert c["f1"]["lo"] is None and c["f1"]["diff"] == pytest.approx(0.1)


def test_report_has_comparisons_with_intervals(fake_bench, tmp_path, capsys):
    res = E.run_evaluate(json_path=tmp_path / "e.json", n=2, size=96)
    data = json.loads((tmp_path / "e.json").read_text())
    assert set(data["comparisons"]) == {
        "lcm-1 - pix2pix",
        "lcm-1 - teacher-1",
        "lcm-1-texture - lcm-1",
    }
    d = data["comparisons"]["lcm-1 - pix2pix"]
    lcm, p2p = res["models"]["lcm-1"], res["models"]["pix2pix"]
    assert d["f1"]["diff"] == pytest.approx(lcm["f1"] - p2p["f1"])
    assert d["realism"]["diff"] == pytest.approx(lcm["realism"] - p2p["realism"])
    assert len(lcm["per_field"]["f1"]) == 2
    assert (
        "lcm-1 - pix2pix (95 % bootstrap interval over fields): pearson" in capsys.readouterr().out
    )


def test_edge_sharpness_in_json_table_and_comparisons(fake_bench, tmp_path, capsys):
    out = tmp_path / "e.json"
    E.run_evaluate(json_path=out, n=2, size=96)
    data = json.loads(out.read_text())
    for name, row in data["models"].items():
        assert isinstance(row["edge_sharpness"], float), name
        assert len(row["per_field"]["edge_sharpness"]) == 2
    assert data["models"]["oracle"]["edge_sharpness"] == pytest.approx(1.0)
    # the stub's LCM output is the true DAPI but at the distractor: rims as sharp as the truth
    assert data["models"]["lcm-1"]["edge_sharpness"] == pytest.approx(1.0, abs=0.05)
    assert "edge_sharpness" in data["comparisons"]["lcm-1 - pix2pix"]
    header = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("model"))
    assert "edge" in header.split()


def test_edge_sharpness_nan_fields_are_skipped_in_means_and_comparisons():
    base = {k: 0.5 for k in E.COLUMNS + E.EXTRA_COLUMNS + E._COUNTS}
    bins = [{"lo": 0.0, "hi": None, "n_true": 0, "n_matched": 0}]
    bright = {k: {"pred": 0.5, "truth": 1.0, "n": 1} for k in ("clear", "all")}
    base.update(_bins=bins, _bright=bright)
    per = [dict(base, edge_sharpness=v) for v in (0.4, float("nan"), 0.8)]
    row = E._aggregate(per, 1.0)
    assert row["brightness_clear"] == pytest.approx(0.5)
    assert row["edge_sharpness"] == pytest.approx(0.6)
    assert row["std"]["edge_sharpness"] == pytest.approx(np.std([0.4, 0.8], ddof=1))
    assert row["f1"] == 0.5
    empty = E._aggregate([dict(base, edge_sharpness=float("nan"))], 1.0)
    assert np.isnan(empty["edge_sharpness"])
    assert E._cell("edge_sharpness", empty["edge_sharpness"], 0.0) == "n/a"

    a, b = _rows_for_compare([0.5] * 3, [0.4] * 3, [(1, 2, 0)] * 3, [(1, 2, 0)] * 3)
    a["per_field"]["edge_sharpness"] = [0.9, float("nan"), 0.7]
    b["per_field"]["edge_sharpness"] = [0.5, 0.6, float("nan")]
    c = E.compare_rows(a, b, n_resamples=200)
    assert c["edge_sharpness"] == {"diff": pytest.approx(0.4), "lo": None, "hi": None}  # 1 field
    del a["per_field"]["edge_sharpness"]  # a row scored before the column existed
    assert "edge_sharpness" not in E.compare_rows(a, b, n_resamples=200)


def test_guidance_rows_follow_the_checkpoints(tmp_path):
    """Rows at other guidances exist only for models that accept guidance: the trained range's
    ends for LCM-1/2/4, one more for teacher-50; none for unguided weights."""
    import json
    import shutil

    from napari_lcm_stain import checkpoints as ck

    src = Path(ck.__file__).parent / "weights"
    for name in ("lcm", "teacher"):
        for ext in ("safetensors", "json"):
            shutil.copy(src / f"{name}.{ext}", tmp_path / f"{name}.{ext}")
    for n in ("lcm", "teacher"):  # the configs as an unguided release has them
        cfg = json.loads((tmp_path / f"{n}.json").read_text())
        cfg.pop("guidance", None)
        cfg["architecture"]["unet"]["kwargs"].pop("guidance_embed", None)
        (tmp_path / f"{n}.json").write_text(json.dumps(cfg))
    assert E.guidance_rows(tmp_path) == ()
    cfg = json.loads((tmp_path / "teacher.json").read_text())
    cfg["guidance"] = {"min": 1.0, "max": 3.0, "default": 1.0}
    (tmp_path / "teacher.json").write_text(json.dumps(cfg))
    rows = E.guidance_rows(tmp_path)
    assert [(r.name, r.model, r.steps, r.guidance) for r in rows] == [
        ("teacher-50-g3", "teacher", 50, 3.0)  # unguided by default: once at the top
    ]
    cfg["guidance"]["default"] = 2.0
    (tmp_path / "teacher.json").write_text(json.dumps(cfg))
    assert [(r.name, r.guidance) for r in E.guidance_rows(tmp_path)] == [("teacher-50-g1", 1.0)]
    # an LCM without a guidance input gets no rows even if its config names a range
    cfg = json.loads((tmp_path / "lcm.json").read_text())
    cfg["guidance"] = {"min": 1.0, "max": 3.0, "default": 1.5}
    (tmp_path / "lcm.json").write_text(json.dumps(cfg))
    assert [r.model for r in E.guidance_rows(tmp_path)] == ["teacher"]
