"""The pixel-size estimator: on fields of known pixel size, through the engine's "auto", the
CLI for a file without metadata, and the dock."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from napari_lcm_stain import simulate as S
from napari_lcm_stain._drain import drain
from napari_lcm_stain.engine import iter_stain, stain
from napari_lcm_stain.pixel_size_estimate import estimate_pixel_size, features, load_estimator


def _field(px, preset="brain-20x", seed=11, size=256, **over):
    p = replace(S.get_preset(preset), pixel_size=px, **over)
    return S.simulate_pair(p, size=size, seed=seed)


def test_packaged_estimator_records_its_measured_error():
    cfg = load_estimator()
    held = cfg["held_out"]
    assert held["n"] >= 50 and 0 < held["median_rel_error"] < 0.5
    assert cfg["range_um"][0] < 0.25 and cfg["range_um"][1] > 1.24


@pytest.mark.parametrize("px", [0.25, 0.414, 0.83])
def test_estimate_on_fields_of_known_pixel_size(px):
    errs = [abs(estimate_pixel_size(_field(px, seed=s).qobm) / px - 1) for s in (11, 12, 13)]
    assert np.median(errs) < 0.3, errs


def test_features_are_affine_invariant_and_refuse_tiny_planes():
    q = _field(0.414).qobm
    np.testing.assert_allclose(features(q), features(3.7 * q - 20), atol=1e-6)
    with pytest.raises(ValueError, match="at least 32"):
        features(np.zeros((16, 16)))


def test_engine_auto_records_the_estimate_and_says_so():
    s = _field(0.7, size=192)
    res = drain(iter_stain(s.qobm, model="lcm", tile=256, device="cpu", pixel_size="auto"))
    est = res.info["pixel_size_estimated"]
    assert est == res.info["pixel_size"] and est == pytest.approx(estimate_pixel_size(s.qobm))
    assert any("estimated" in w and f"{est:.3g}" in w for w in res.info["warnings"])
    assert res.info["rescale"] == pytest.approx(est / 0.414, rel=1e-6)
    # a given pixel size is used as is and nothing is estimated
    res2 = drain(iter_stain(s.qobm, model="lcm", tile=256, device="cpu", pixel_size=0.7))
    assert res2.info["pixel_size_estimated"] is None and res2.info["pixel_size"] == 0.7


def test_bad_pixel_size_strings_are_clear_errors():
    with pytest.raises(TypeError, match="'auto' or None"):
        stain(np.zeros((64, 64), np.float32), pixel_size="big")


def test_cli_estimates_for_a_file_without_metadata(tmp_path, capsys):
    import tifffile

    from napari_lcm_stain.cli import main

    s = _field(0.6, size=160)
    src = tmp_path / "plain.tif"
    tifffile.imwrite(src, s.qobm)  # no resolution, no OME: no pixel size
    out = tmp_path / "out.ome.tif"
    assert main(["stain", str(src), "-o", str(out), "--device", "cpu", "--tile", "256"]) == 0
    text = capsys.readouterr().out
    assert "no pixel size given: estimated" in text
    from napari_lcm_stain.io import read_image

    _arr, meta = read_image(out)
    assert meta["pixel_size"] == pytest.approx(estimate_pixel_size(s.qobm), rel=1e-5)


def test_dock_estimates_shows_and_lets_the_user_override(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    s = _field(0.6, size=160)
    layer = viewer.add_image(s.qobm, name="no scale")  # pixel units: no µm scale
    _dock, w = viewer.window.add_plugin_dock_widget("napari-lcm-stain", "Virtual stain")
    w.tile_spin.setValue(256)
    w.layer_combo.setCurrentIndex(w.layer_combo.findText("no scale"))
    assert w._pixel_size(layer) == "auto"
    assert "estimated from the image" in w.pixel_spin.specialValueText()
    w.stain_button.click()
    qtbot.waitUntil(lambda: not w.is_running, timeout=60_000)
    est = w._px_estimates["no scale"]
    assert est == pytest.approx(estimate_pixel_size(s.qobm), rel=1e-6)
    assert f"≈{est:.3g} µm/px" in w.pixel_spin.specialValueText()
    assert "estimated" in w.status.text()
    from napari_lcm_stain._widgets._layers import PLUGIN_KEY

    outs = [
        ly for ly in viewer.layers if ly.metadata.get(PLUGIN_KEY, {}).get("source") == "no scale"
    ]
    assert outs, "no output layer"
    for ly in outs:  # the estimate travels with the layer (and into files the writer makes)
        assert ly.metadata[PLUGIN_KEY]["provenance"]["pixel_size_estimated"] == pytest.approx(est)
    assert w._pixel_size(layer) == pytest.approx(est)  # reused, e.g. by live frames
    w.pixel_spin.setValue(0.6)  # the user knows better
    assert w._pixel_size(layer) == pytest.approx(0.6)
    assert layer.data is s.qobm or np.array_equal(layer.data, s.qobm)  # input never modified
