"""bench: JSON shape and consistency on a tiny run with fake models (timings are not tested)."""

from __future__ import annotations

import json

import pytest

from _fake_predictor import FakePredictor
from napari_lcm_stain import bench


def test_run_bench_json_shape(tmp_path):
    preds = {
        "lcm-1": FakePredictor(),
        "lcm-4": FakePredictor(n_noise=4),
        "teacher-50": FakePredictor(),
        "pix2pix": FakePredictor(n_noise=0),
    }
    path = tmp_path / "b" / "bench.json"
    res = bench.run_bench(path, size=64, repeats=2, big=0, predictors=preds, tile=32, overlap=8,
                          quiet=True, matmul_n=256)  # fmt: skip
    assert json.loads(path.read_text()) == json.loads(json.dumps(res))
    assert set(res["models"]) == {"lcm-1", "lcm-4", "teacher-50", "pix2pix"}
    for name, m in res["models"].items():
        for key in ("ms_per_mp", "mp_per_s", "gflop_per_mp", "fraction_of_matmul"):
            assert m[key] > 0, (name, key)
        assert m["ms_per_mp"] * m["mp_per_s"] == pytest.approx(1000.0)
        assert m["repeats"] == (1 if name == "teacher-50" else 2)
        assert m["overlap_factor"] >= 1.0
    r = res["ratios"]
    assert r["lcm-1/pix2pix"] == pytest.approx(
        res["models"]["lcm-1"]["ms_per_mp"] / res["models"]["pix2pix"]["ms_per_mp"]
    )
    assert set(r) == {"lcm-1/pix2pix", "teacher-50/lcm-1", "lcm-4/lcm-1"}
    assert res["cpu_matmul_gflops"] > 0 and res["peak_rss_mb"] is None
    assert res["size"] == 64 and res["device"] == "cpu"


def test_matmul_share_is_called_a_reference_and_explained(monkeypatch, capsys):
    """The probe is not a limit (a model can pass 100 %): the output says so, and uses the faster
    of a probe before and one after the models (load only slows a probe down)."""
    probes = iter([50.0, 80.0])
    monkeypatch.setattr(bench, "cpu_matmul_gflops", lambda n: next(probes))
    res = bench.run_bench(size=64, repeats=1, big=0, predictors={"m": FakePredictor()}, tile=32,
                          overlap=8)  # fmt: skip
    out = capsys.readouterr().out
    m = res["models"]["m"]
    assert res["cpu_matmul_gflops"] == 80.0 and res["cpu_matmul_probes_gflops"] == [50.0, 80.0]
    assert m["fraction_of_matmul"] == pytest.approx(m["achieved_gflops"] / 80.0)
    assert "fraction_of_limit" not in m and "% of matmul" not in out
    assert "CPU float32 matmul reference: 80.0 GFLOP/s" in out
    assert f"({bench.MATMUL_NOTE})" in out and "not a limit" in bench.MATMUL_NOTE
    assert "exceed 100 %" in bench.MATMUL_NOTE and res["matmul_note"] == bench.MATMUL_NOTE
    share = f"m {100 * m['fraction_of_matmul']:.1f} %"
    assert f"achieved GFLOP/s as % of the matmul reference: {share}" in out


def test_tile_gflop_counts_convolutions():
    pred = FakePredictor()
    gflop, side = bench.tile_gflop(pred, 64)
    # enc 5x5 1->8 at 64², mid 3x3 12->8 at 16², dec 3x3 8->1 at 64²; 2 FLOPs per MAC
    macs = 64 * 64 * 8 * 25 + 16 * 16 * 8 * 12 * 9 + 64 * 64 * 1 * 8 * 9
    assert side == 64 and gflop == pytest.approx(2 * macs / 1e9)


def test_bad_arguments():
    with pytest.raises(ValueError, match="big >= 0"):
        bench.run_bench(size=0, big=0, predictors={})


def test_uncertainty_by_region_shape(tmp_path):
    path = tmp_path / "u.json"
    res = bench.uncertainty_by_region(FakePredictor(), samples=2, n=1, size=64, json_path=path,
                                      quiet=True)  # fmt: skip
    assert json.loads(path.read_text()) == res
    assert set(res["mean_std"]) == {"background", "clear_nuclei", "low_contrast_nuclei",
                                    "out_of_section_nuclei", "near_distractors"}  # fmt: skip
    assert res["pixels"]["background"] > 0 and res["mean_std"]["background"] > 0
    assert all(v is None or v >= 0 for v in res["mean_std"].values())
    assert res["samples"] == 2 and res["model"] == "Fake"


def test_seams_report_shape():
    res = bench.seams_report(FakePredictor(), size=128, tile=64, overlap=16, contexts=(0, 16),
                             quiet=True)  # fmt: skip
    assert [r["context"] for r in res["rows"]] == [0, 16]
    assert all(r["max_abs_diff"] >= 0 and r["work_overhead"] >= 1 for r in res["rows"])
    assert res["rows"][1]["max_abs_diff"] <= res["rows"][0]["max_abs_diff"]
    assert set(res["measured_context_px"]) == {"0.01", "0.005", "0.002"}
