"""The napari docks in a real viewer (pytest-qt + Xvfb), driving the real tiling engine.

The packaged weights are used when they are installed; otherwise a tiny deterministic stand-in
predictor (same contract) keeps these tests about the widgets, not about model quality.
"""

from __future__ import annotations

import threading
import time
import warnings

import dask.array as da
import numpy as np
import pytest
import torch
from napari.layers import Image
from napari.utils.notifications import NotificationSeverity, notification_manager

from napari_lcm_stain._widgets import _jobs
from napari_lcm_stain._widgets._layers import PLUGIN_KEY
from napari_lcm_stain.simulate import simulate_pair

pytestmark = pytest.mark.gui

PLUGIN = "napari-lcm-stain"
TIMEOUT = 60_000  # ms: the first real-model run also loads weights


class TinyPredictor:
    """Stand-in for `sampling.Predictor`: smooth deterministic map, optional noise, optional delay."""

    multiple = 8
    pixel_size = 0.414
    latent_factor = 4
    noise_channels = 1

    def __init__(self, name: str, stochastic: bool, delay: float = 0.0):
        self.name = name
        self.n_noise = 1 if stochastic else 0
        self.delay = delay
        self.device = torch.device("cpu")
        self.calls = 0
        self.lock = threading.Lock()

    def noise_shape(self, h, w):
        return (1, 1, h // 4, w // 4) if self.n_noise else None

    def normalize(self, x):
        return np.asarray(x, dtype=np.float32)

    def __call__(self, x, noise=None):
        with self.lock:
            self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        y = torch.sigmoid(2.0 * torch.nn.functional.avg_pool2d(x, 3, 1, 1))
        if noise is not None:
            n = noise[:, 0, :1].repeat_interleave(4, -1).repeat_interleave(4, -2)
            y = y + 0.05 * n
        return y.clamp(0.0, 1.0)


def _have_packaged() -> bool:
    try:
        from napari_lcm_stain import checkpoints
    except ImportError:
        return False
    return all(checkpoints.packaged_path(n).exists() for n in ("lcm", "pix2pix"))


@pytest.fixture
def models(monkeypatch):
    """'packaged' when the real weights are installed, else patch in TinyPredictors."""
    if _have_packaged():
        return {}
    made: dict = {}

    def fake(cache, model, steps, device, texture=False, guidance=None):
        if not isinstance(model, str):
            return model
        key = str(model)
        if key not in made:
            if key not in ("lcm", "teacher", "pix2pix"):
                from napari_lcm_stain.sampling import load_predictor

                # real loading errors
                return load_predictor(model, steps=steps, device=device, texture=texture,
                                      guidance=guidance)  # fmt: skip
            made[key] = TinyPredictor(key, stochastic=key != "pix2pix")
        return made[key]

    monkeypatch.setattr(_jobs, "get_predictor", fake)
    return made


@pytest.fixture
def slow_models(monkeypatch):
    """Always TinyPredictors that take 50 ms per call, so a run can be cancelled midway."""
    made: dict = {}

    def fake(cache, model, steps, device, texture=False, guidance=None):
        made.setdefault(str(model), TinyPredictor(str(model), str(model) != "pix2pix", 0.05))
        return made[str(model)]

    monkeypatch.setattr(_jobs, "get_predictor", fake)
    return made


def _field(viewer, size=128, seed=3, z_planes=None, with_truth=True):
    s = simulate_pair("brain-20x", size=size, seed=seed, z_planes=z_planes)
    px = s.pixel_size
    nd = s.qobm.ndim
    scale = (1.0,) * (nd - 2) + (px, px)
    q = viewer.add_image(s.qobm, name="qOBM phase", scale=scale, translate=(0,) * (nd - 2) + (5, 7))
    if with_truth:
        viewer.add_image(s.dapi, name="DAPI (ground truth)", scale=scale, colormap="cyan")
        viewer.add_labels(s.nuclei, name="nuclei (ground truth)", scale=scale)
    return q, s


def _stain_dock(viewer):
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Virtual stain")
    widget.tile_spin.setValue(128)
    widget.overlap_spin.setValue(16)
    return widget


def _click_and_wait(qtbot, widget, button=None):
    (button or widget.stain_button).click()
    assert widget.is_running
    qtbot.waitUntil(lambda: not widget.is_running, timeout=TIMEOUT)


def _live_one_frame(qtbot, widget):
    """Live staining of the dock's layer with its settings: one frame, then stopped, no error."""
    widget.set_live(True)
    live = widget.live
    qtbot.waitUntil(lambda: len(live.stained) == 1, timeout=TIMEOUT)
    widget.set_live(False)
    qtbot.waitUntil(lambda: not widget.is_running, timeout=TIMEOUT)
    assert widget.last_error is None, widget.last_error


def _errors_since(n: int) -> list[str]:
    return [
        str(r.message)
        for r in notification_manager.records[n:]
        if r.severity == NotificationSeverity.ERROR
    ]


def test_stain_layer_makes_named_layers_with_source_geometry(make_napari_viewer, qtbot, models):
    viewer = make_napari_viewer()
    q, s = _field(viewer)
    before = q.data.copy()
    widget = _stain_dock(viewer)
    # defaults: the qOBM layer (not the DAPI one), ground truth auto-picked, Pix2Pix on, K off
    assert widget.layer_combo.layer() == q
    assert widget.truth_combo.layer().name == "DAPI (ground truth)"
    assert widget.pix2pix_check.isChecked() and not widget.uncertainty_check.isChecked()
    assert widget.steps_spin.value() == 1
    assert widget.device_label.text().startswith("→ cpu")

    _click_and_wait(qtbot, widget)

    assert widget.last_error is None, widget.last_error
    assert widget.stain_button.isEnabled() and not widget.cancel_button.isEnabled()
    for name in ("qOBM phase · DAPI (LCM)", "qOBM phase · DAPI (Pix2Pix)"):
        out = viewer.layers[name]
        assert out.data.shape == q.data.shape
        assert out.data.dtype == np.float32
        np.testing.assert_allclose(out.scale, q.scale)
        np.testing.assert_allclose(out.translate, q.translate)
        assert np.isfinite(out.data).all()
        assert 0.0 <= out.data.min() and out.data.max() <= 1.0
        assert out.data.std() > 0  # not a constant image
        assert out.metadata[PLUGIN_KEY]["source"] == "qOBM phase"
        assert tuple(out.contrast_limits) == pytest.approx((0.0, 0.8))
    assert "qOBM phase · uncertainty" not in viewer.layers
    # the main output is on top so it is what the user sees
    assert viewer.layers[-1].name == "qOBM phase · DAPI (LCM)"
    np.testing.assert_array_equal(q.data, before)  # the input is never touched

    # metrics against the ground truth, one row per model, in range
    table = widget.metrics_table
    assert table.isVisibleTo(widget) and table.rowCount() == 2
    assert [table.verticalHeaderItem(r).text() for r in range(2)] == ["LCM", "Pix2Pix"]
    metrics = widget.last_outcome.metrics
    for label in ("LCM", "Pix2Pix"):
        m = metrics[label]
        assert set(m) == set(_jobs.METRIC_KEYS)
        assert -1.0 <= m["pearson"] <= 1.0
        for key in ("recall", "precision", "f1"):
            assert 0.0 <= m[key] <= 1.0
    assert table.item(0, 0).text() == f"{metrics['LCM']['pearson']:.3f}"


def test_restain_replaces_outputs_in_place_and_adds_uncertainty(make_napari_viewer, qtbot, models):
    viewer = make_napari_viewer()
    q, _ = _field(viewer, with_truth=False)
    widget = _stain_dock(viewer)
    widget.pix2pix_check.setChecked(False)
    _click_and_wait(qtbot, widget)
    lcm = viewer.layers["qOBM phase · DAPI (LCM)"]
    first = lcm.data.copy()
    n_layers = len(viewer.layers)
    lcm.name = "my renamed output"  # still recognised as ours through its metadata

    widget.uncertainty_check.setChecked(True)
    widget.samples_spin.setValue(3)
    widget.seed_spin.setValue(7)
    _click_and_wait(qtbot, widget)

    assert widget.last_error is None, widget.last_error
    assert viewer.layers["my renamed output"] == lcm  # same layer object, data replaced
    assert not np.array_equal(lcm.data, first)  # mean of 3 new samples differs from seed 0
    unc = viewer.layers["qOBM phase · uncertainty"]
    assert len(viewer.layers) == n_layers + 1
    assert unc.data.shape == q.data.shape
    assert unc.data.min() >= 0.0 and unc.data.max() > 0.0
    assert unc.colormap.name == "magma"
    # the picker never offers our outputs as input
    offered = [widget.layer_combo.itemText(i) for i in range(widget.layer_combo.count())]
    assert offered == ["qOBM phase"]


def test_texture_box_off_by_default_and_on_draws_the_grain(make_napari_viewer, qtbot, tmp_path):
    """Texture (grain) is off by default (the smooth mean); ticked, the output layer holds the
    texture-on predictor's grainy stain (same layer name, new data), its provenance says texture
    on, the dock's cache holds two predictors (none changed), live staining follows the box, and
    the input layer is never modified. The model is a small random checkpoint with a texture
    head."""
    from _fake_predictor import blobs, texture_lcm
    from napari_lcm_stain.engine import stain

    ckpt = str(texture_lcm(tmp_path / "grain.safetensors"))
    image = blobs((64, 80), seed=2)
    viewer = make_napari_viewer()
    q = viewer.add_image(image.copy(), name="qOBM phase")
    widget = _stain_dock(viewer)
    assert not widget.texture_check.isChecked()
    assert "smooth mean" in widget.texture_check.toolTip()
    widget.pix2pix_check.setChecked(False)
    widget.add_model("grain", ckpt)
    name = "qOBM phase · DAPI (grain)"

    _click_and_wait(qtbot, widget)
    assert widget.last_error is None, widget.last_error
    out = viewer.layers[name]
    smooth = out.data.copy()
    assert out.metadata[PLUGIN_KEY]["provenance"]["texture"] is False
    n_layers = len(viewer.layers)

    widget.texture_check.setChecked(True)
    _click_and_wait(qtbot, widget)
    assert widget.last_error is None, widget.last_error
    assert len(viewer.layers) == n_layers and viewer.layers[name] is out  # replaced in place
    grainy = np.asarray(out.data)
    assert out.metadata[PLUGIN_KEY]["provenance"]["texture"] is True

    # the layer has no µm scale: the dock estimates the pixel size, as pixel_size="auto" does
    kw = {"steps": 1, "tile": 128, "overlap": 16, "device": "auto", "seed": 0, "pixel_size": "auto"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random blobs are out of distribution: not the point
        expected = {t: stain(image, ckpt, texture=t, **kw) for t in (True, False)}
    np.testing.assert_allclose(smooth, expected[False], atol=1e-5)
    np.testing.assert_allclose(grainy, expected[True], atol=1e-5)
    assert np.abs(grainy - smooth).max() > 0.1  # the grain is there now, and was not
    np.testing.assert_array_equal(q.data, image)  # the input is never touched

    preds = {k[3]: v for k, v in widget._cache.items() if len(k) == 5 and k[0] == ckpt}
    assert set(preds) == {True, False} and preds[True] is not preds[False]
    assert preds[True].texture is True and preds[False].texture is False

    _live_one_frame(qtbot, widget)  # live staining uses the same box
    shown = viewer.layers["qOBM phase · DAPI live (grain)"]
    np.testing.assert_allclose(shown.data, expected[True], atol=1e-5)
    assert shown.metadata[PLUGIN_KEY]["provenance"]["texture"] is True
    np.testing.assert_array_equal(q.data, image)


def test_picker_offers_single_channel_images_and_explains_the_rest(make_napari_viewer, models):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((32, 32, 3), np.uint8), name="photo", rgb=True)
    viewer.add_labels(np.zeros((32, 32), np.int32), name="cells")
    viewer.add_points(np.zeros((2, 2)), name="spots")
    widget = _stain_dock(viewer)
    assert widget.layer_combo.count() == 0
    note = widget.layer_note.text()
    assert "No single-channel image layer" in note
    assert "'photo': RGB" in note and "'cells': Labels layer" in note and "'spots'" in note
    widget.stain_button.click()
    assert not widget.is_running and "No qOBM layer" in widget.last_error

    dapi = viewer.add_image(np.zeros((32, 32), np.uint16), name="DAPI")
    assert widget.layer_combo.layer() == dapi  # the only candidate
    phase = viewer.add_image(np.zeros((32, 32), np.float32), name="sample 1 phase")
    other = viewer.add_image(np.zeros((32, 32), np.float32), name="other")
    assert widget.layer_combo.layer() == dapi  # an existing choice is kept when layers come
    assert "'photo'" in widget.layer_note.text() and "No single" not in widget.layer_note.text()

    # a new dock: the selected layer if it fits ...
    viewer.layers.selection.active = other
    _dock, fresh = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    assert fresh.qobm_combo.layer() == other
    assert fresh.dapi_combo.layer() == dapi
    viewer.window.remove_dock_widget(_dock)
    # ... but never a DAPI-named one: then the most qOBM-like name wins
    viewer.layers.selection.active = dapi
    _dock, fresh = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    assert fresh.qobm_combo.layer() == phase
    viewer.window.remove_dock_widget(_dock)


def test_qobm_picker_follows_the_layer_selection_until_picked_by_hand(make_napari_viewer, models):
    viewer = make_napari_viewer()
    img = np.zeros((32, 32), np.float32)
    a = viewer.add_image(img, name="field A phase")
    b = viewer.add_image(img, name="field B phase")
    dapi = viewer.add_image(img, name="DAPI")
    widget = _stain_dock(viewer)
    combo = widget.layer_combo
    viewer.layers.selection.active = b
    assert combo.layer() == b
    viewer.layers.selection.active = a
    assert combo.layer() == a
    viewer.layers.selection.active = dapi  # a DAPI-named layer is never the qOBM by itself
    assert combo.layer() == a
    labels = viewer.add_labels(np.zeros((32, 32), np.int32), name="cells")
    viewer.layers.selection.active = labels  # not offered: nothing changes
    assert combo.layer() == a
    c = viewer.add_image(img, name="field C phase")  # a layer just added does not take over
    assert combo.layer() == a
    viewer.layers.selection.active = b  # ... until the user selects layers
    viewer.layers.selection.active = c
    assert combo.layer() == c

    index = combo.findData("field B phase")  # picked by hand: the selection no longer moves it
    combo.setCurrentIndex(index)
    combo.activated.emit(index)
    viewer.layers.selection.active = a
    assert combo.layer() == b


def test_cancel_mid_run_leaves_no_layer_and_idle_ui(make_napari_viewer, qtbot, slow_models):
    viewer = make_napari_viewer()
    _field(viewer, size=256, with_truth=False)
    widget = _stain_dock(viewer)
    widget.tile_spin.setValue(64)  # many tiles (the stand-in has no context margin)
    n_layers = len(viewer.layers)
    widget.stain_button.click()
    predictor_calls = lambda: sum(p.calls for p in slow_models.values())  # noqa: E731
    qtbot.waitUntil(lambda: predictor_calls() >= 2, timeout=TIMEOUT)
    widget.cancel_button.click()
    at_cancel = predictor_calls()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=TIMEOUT)

    assert predictor_calls() - at_cancel <= 1  # stops within one tile batch
    assert len(viewer.layers) == n_layers
    assert widget.status.text().startswith("Cancelled")
    assert widget.stain_button.isEnabled() and not widget.cancel_button.isEnabled()
    assert widget.last_error is None
    # and the dock still works afterwards
    widget.pix2pix_check.setChecked(False)
    widget.tile_spin.setValue(256)
    _click_and_wait(qtbot, widget)
    assert "qOBM phase · DAPI (LCM)" in viewer.layers


def test_engine_error_becomes_notification_and_ui_resets(make_napari_viewer, qtbot, models):
    viewer = make_napari_viewer()
    bad = np.full((64, 64), np.nan, np.float32)
    viewer.add_image(bad, name="broken phase")
    widget = _stain_dock(viewer)
    n_notes = len(notification_manager.records)
    _click_and_wait(qtbot, widget)
    errors = _errors_since(n_notes)
    assert len(errors) == 1 and errors[0].startswith("Staining failed: ")
    assert "NaN" in errors[0] or "nan" in errors[0]
    assert widget.stain_button.isEnabled() and not widget.cancel_button.isEnabled()
    assert [ly.name for ly in viewer.layers] == ["broken phase"]


def test_corrupt_checkpoint_reports_the_file(make_napari_viewer, qtbot, models, tmp_path):
    viewer = make_napari_viewer()
    _field(viewer, size=64, with_truth=False)
    widget = _stain_dock(viewer)
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x80\x04not a safetensors file")
    widget.add_model("broken", str(path))
    assert widget.model_combo.currentText() == "broken"
    n_notes = len(notification_manager.records)
    _click_and_wait(qtbot, widget)
    errors = _errors_since(n_notes)
    assert len(errors) == 1 and "broken.safetensors" in errors[0]
    assert "qOBM phase · DAPI (broken)" not in viewer.layers
    assert widget.stain_button.isEnabled()


def test_side_by_side_grid_and_back(make_napari_viewer, qtbot, models):
    viewer = make_napari_viewer()
    q, _ = _field(viewer)
    widget = _stain_dock(viewer)
    widget.grid_button.click()  # nothing stained yet: refuses, stays off
    assert not widget.grid_button.isChecked()
    _click_and_wait(qtbot, widget)

    order = [ly.name for ly in viewer.layers]
    widget.grid_button.click()
    grid = viewer.canvas.grid
    assert grid.enabled and tuple(grid.shape) == (2, 2)
    expected = [
        "qOBM phase",
        "qOBM phase · DAPI (LCM)",
        "qOBM phase · DAPI (Pix2Pix)",
        "DAPI (ground truth)",
    ]
    layers = list(viewer.layers)
    shown = [ly for ly in layers if ly.visible]
    assert [ly.name for ly in shown] == expected
    positions = [grid.position(layers.index(ly), layers) for ly in shown]
    assert positions == [(0, 0), (0, 1), (1, 0), (1, 1)]  # reading order
    assert not viewer.layers["nuclei (ground truth)"].visible
    assert all(ly.name_overlay.visible for ly in shown)
    assert viewer.layers["DAPI (ground truth)"].colormap.name == "dapi_blue"  # same LUT as outputs

    widget.grid_button.click()
    assert not grid.enabled
    assert [ly.name for ly in viewer.layers] == order  # stacking order restored
    assert all(ly.visible for ly in viewer.layers)
    assert not any(ly.name_overlay.visible for ly in viewer.layers)
    assert viewer.layers["DAPI (ground truth)"].colormap.name == "cyan"


def test_current_plane_only_follows_the_slider(make_napari_viewer, qtbot, models):
    viewer = make_napari_viewer()
    q, _ = _field(viewer, size=64, z_planes=3, with_truth=False)
    widget = _stain_dock(viewer)
    widget.pix2pix_check.setChecked(False)
    assert widget.plane_check.isEnabled()
    widget.plane_check.setChecked(True)
    viewer.dims.set_current_step(0, 1)
    _click_and_wait(qtbot, widget)
    out = viewer.layers["qOBM phase · DAPI (LCM)"]
    assert out.data.shape == (64, 64)
    assert out.metadata[PLUGIN_KEY]["plane"] == [1]
    np.testing.assert_allclose(out.scale, q.scale[-2:])

    viewer.dims.set_current_step(0, 2)  # the dock re-stains the new plane by itself
    qtbot.waitUntil(lambda: out.metadata[PLUGIN_KEY]["plane"] == [2], timeout=TIMEOUT)
    qtbot.waitUntil(lambda: not widget.is_running, timeout=TIMEOUT)
    assert viewer.layers["qOBM phase · DAPI (LCM)"] == out

    # whole stack again: the 2-D layer becomes a 3-D one of the input's shape
    widget.plane_check.setChecked(False)
    _click_and_wait(qtbot, widget)
    assert viewer.layers["qOBM phase · DAPI (LCM)"].data.shape == q.data.shape


def test_closing_the_viewer_mid_run_is_safe(make_napari_viewer, qtbot, slow_models):
    viewer = make_napari_viewer()
    _field(viewer, size=256, with_truth=False)
    widget = _stain_dock(viewer)
    widget.tile_spin.setValue(64)  # many tiles (the stand-in has no context margin)
    worker = widget.run()
    qtbot.waitUntil(lambda: sum(p.calls for p in slow_models.values()) >= 1, timeout=TIMEOUT)
    finished = []
    worker.finished.connect(lambda: finished.append(True))
    calls_at_close = sum(p.calls for p in slow_models.values())
    viewer.close()
    qtbot.waitUntil(lambda: bool(finished), timeout=TIMEOUT)
    assert sum(p.calls for p in slow_models.values()) - calls_at_close <= 2


def test_open_sample_and_stain(make_napari_viewer, qtbot, models):
    pytest.importorskip("napari_lcm_stain._sample_data")
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "qobm_field")
    names = [ly.name for ly in viewer.layers]
    assert {"qOBM phase", "DAPI (ground truth)", "nuclei (ground truth)"} <= set(names)
    widget = _stain_dock(viewer)
    assert widget.layer_combo.currentText() == "qOBM phase"
    assert widget.truth_combo.currentText() == "DAPI (ground truth)"
    _click_and_wait(qtbot, widget)
    assert widget.last_error is None, widget.last_error
    q = viewer.layers["qOBM phase"]
    out = viewer.layers["qOBM phase · DAPI (LCM)"]
    assert isinstance(out, Image) and out.data.shape == q.data.shape
    np.testing.assert_allclose(out.scale, q.scale)


# ----------------------------------------------------------------------------- live staining


def _frames(n=20, size=64):
    s = simulate_pair("brain-20x", size=size, seed=4, z_planes=n)
    return s.qobm.astype(np.float32)


def _append_by_timer(qtbot, layer, frames, interval_ms):
    """Append the frames to ``layer`` one by one from a QTimer, as an acquisition would."""
    from qtpy.QtCore import QTimer

    timer = QTimer()
    timer.setInterval(interval_ms)

    def append():
        n = layer.data.shape[0]
        if n >= len(frames):
            timer.stop()
            return
        layer.data = np.concatenate([layer.data, frames[n][None]])

    timer.timeout.connect(append)
    timer.start()
    qtbot.waitUntil(lambda: layer.data.shape[0] == len(frames), timeout=TIMEOUT)
    return timer


def _check_live_keys(live, n_frames):
    """Every frame stained or counted as skipped, newest-first order, none twice, last stained."""
    keys = live.stained
    assert len(set(keys)) == len(keys), keys  # none twice
    indices = [k[0] for k in keys]
    assert indices == sorted(indices) and indices[-1] == n_frames - 1
    assert len(keys) + live.skipped == n_frames, (keys, live.skipped)


def test_live_stains_appended_frames_with_the_engine(make_napari_viewer, qtbot, models):
    from napari_lcm_stain.engine import stain

    frames = _frames()
    viewer = make_napari_viewer()
    layer = viewer.add_image(frames[:1], name="live phase", scale=(1, 0.4, 0.4))
    widget = _stain_dock(viewer)
    widget.seed_spin.setValue(3)
    predictor = _jobs.get_predictor(widget._cache, "lcm", 1, "auto")  # loaded before frames come
    widget.live_button.click()
    assert widget.is_running and not widget.stain_button.isEnabled()
    live = widget.live
    qtbot.waitUntil(lambda: live.stained == [(0, 0)], timeout=TIMEOUT)  # the frame already there
    _append_by_timer(qtbot, layer, frames, interval_ms=40)
    qtbot.waitUntil(lambda: bool(live.stained) and live.stained[-1][0] == 19, timeout=TIMEOUT)
    widget.live_button.click()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=TIMEOUT)
    assert widget.stain_button.isEnabled() and widget.last_error is None, widget.last_error

    _check_live_keys(live, 20)
    shown = viewer.layers["live phase · DAPI live (LCM)"]
    stack = viewer.layers["live phase · DAPI live stack (LCM)"]
    assert shown.data.shape == (64, 64) and stack.data.shape == (len(live.stained), 64, 64)
    np.testing.assert_array_equal(stack.data[-1], shown.data)
    assert viewer.layers.index(shown) > viewer.layers.index(stack)  # the newest frame on top
    np.testing.assert_allclose(shown.scale, (0.4, 0.4))
    assert shown.metadata[PLUGIN_KEY]["provenance"]["frame"] == [19, 0]
    # the staining is the core engine's, with the dock's settings
    expected = stain(frames[19], predictor, 1, 128, 16, "auto", seed=3, pixel_size=None)
    np.testing.assert_allclose(shown.data, expected, atol=1e-5)
    # frames/s and latency are shown
    text = widget.live_label.text()
    assert f"{len(live.stained)} stained, {live.skipped} skipped" in text
    assert "frames/s" in text and "latency" in text and live.latency > 0
    np.testing.assert_array_equal(layer.data, frames)  # the input is never touched


def test_live_falls_behind_skips_to_the_newest_frame(make_napari_viewer, qtbot, monkeypatch):
    slow = TinyPredictor("lcm", stochastic=True, delay=0.25)  # slower than the frames come
    monkeypatch.setattr(_jobs, "get_predictor", lambda *_a: slow)
    frames = _frames()
    viewer = make_napari_viewer()
    layer = viewer.add_image(frames[:1], name="live phase")
    widget = _stain_dock(viewer)
    worker = widget.set_live(True)
    assert worker is not None and widget.live_button.isChecked()
    live = widget.live
    _append_by_timer(qtbot, layer, frames, interval_ms=10)
    qtbot.waitUntil(lambda: bool(live.stained) and live.stained[-1][0] == 19, timeout=TIMEOUT)
    widget.cancel_button.click()  # Cancel stops live staining too
    qtbot.waitUntil(lambda: not widget.is_running, timeout=TIMEOUT)
    assert not widget.live_button.isChecked()
    _check_live_keys(live, 20)
    assert live.skipped > 0 and len(live.stained) < 20
    assert "Live staining stopped" in widget.status.text()


def test_live_on_a_2d_layer_stains_each_replacement(make_napari_viewer, qtbot, models):
    frames = _frames(n=3)
    viewer = make_napari_viewer()
    layer = viewer.add_image(frames[0], name="camera phase")
    widget = _stain_dock(viewer)
    widget.set_live(True)
    live = widget.live
    qtbot.waitUntil(lambda: len(live.stained) == 1, timeout=TIMEOUT)
    for i in (1, 2):
        layer.data = frames[i]
        qtbot.waitUntil(lambda i=i: len(live.stained) == i + 1, timeout=TIMEOUT)
    widget.set_live(False)
    qtbot.waitUntil(lambda: not widget.is_running, timeout=TIMEOUT)
    assert live.stained == [(0, 1), (0, 2), (0, 3)] and live.skipped == 0
    assert viewer.layers["camera phase · DAPI live stack (LCM)"].data.shape == (3, 64, 64)
    layer.data = frames[0]  # after stopping, changes are no longer followed
    qtbot.wait(200)
    assert len(live.stained) == 3


def test_watch_folder_entry_stains_new_files_into_a_layer(
    make_napari_viewer, qtbot, models, tmp_path
):
    import tifffile

    src, out = tmp_path / "acquisition", tmp_path / "stained"
    src.mkdir()
    viewer = make_napari_viewer()
    widget = _stain_dock(viewer)
    assert widget.start_watch(src, out) is not None
    assert widget.watch_button.isChecked() and widget.is_running
    qtbot.waitUntil(lambda: widget.live_label.text().startswith("watching"), timeout=TIMEOUT)
    frame = _frames(n=1)[0]
    tifffile.imwrite(src / "frame 1.tif", frame)
    qtbot.waitUntil(lambda: len(widget.folder_watch.outputs) == 1, timeout=TIMEOUT)
    layer = viewer.layers["acquisition · DAPI live (watch)"]
    np.testing.assert_array_equal(layer.data, tifffile.imread(out / "frame 1_dapi.ome.tif"))
    assert layer.metadata[PLUGIN_KEY]["provenance"]["source"].endswith("frame 1.tif")
    widget.watch_button.click()  # stops the watch
    qtbot.waitUntil(lambda: not widget.is_running, timeout=TIMEOUT)
    assert not widget.watch_button.isChecked() and widget.last_error is None, widget.last_error
    assert widget.status.text() == "Folder watch stopped: 1 file(s) stained, 0 not stained."


# ----------------------------------------------------------------------------- fine-tune dock


@pytest.fixture
def finetune_base():
    """The base model the Fine-tune dock starts from (the packaged LCM).

    Request it before ``make_napari_viewer`` so a skip happens before napari's fixture starts.
    """
    try:
        from napari_lcm_stain import checkpoints
    except ImportError:
        pytest.skip("checkpoints module missing")
    if not checkpoints.packaged_path("lcm").exists():
        pytest.skip("packaged LCM weights are not installed yet")
    return "lcm"


def _pair(viewer, size=96, seed=5, suffix=""):
    s = simulate_pair("shifted-20x", size=size, seed=seed)
    q = viewer.add_image(s.qobm, name=f"my qOBM{suffix}")
    d = viewer.add_image(s.dapi, name=f"my DAPI{suffix}")
    return q, d


def _finetune_dock(viewer, base="lcm"):
    _dock, ft = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    if base != "lcm":  # a checkpoint path: offered like the "Checkpoint file…" entry does
        ft.model_combo.insertItem(0, "base", base)
        ft.model_combo.setCurrentIndex(0)
    ft.patch_spin.setValue(64)
    ft.device_combo.setCurrentIndex(ft.device_combo.findData("cpu"))
    return ft


def test_finetune_pair_checks(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((64, 64), np.float32), name="qOBM phase")
    viewer.add_image(np.zeros((64, 80), np.float32), name="DAPI (ground truth)")
    ft = _finetune_dock(viewer)
    assert ft.qobm_combo.currentText() == "qOBM phase"
    assert ft.dapi_combo.currentText() == "DAPI (ground truth)"
    problem = ft.pair_problem()
    assert "(64, 64)" in problem and "(64, 80)" in problem and "same shape" in problem
    assert ft.pair_note.text() == problem and not ft.start_button.isEnabled()
    assert ft.start() is None and ft.last_error == problem

    viewer.add_image(np.zeros((64, 64), np.float32), name="DAPI 2")
    ft.dapi_combo.set_layer(viewer.layers["DAPI 2"])
    assert ft.pair_problem() is None and ft.start_button.isEnabled()
    ft.dapi_combo.set_layer(viewer.layers["qOBM phase"])
    assert "same layer" in ft.pair_problem()
    ft.dapi_combo.set_layer(viewer.layers["DAPI 2"])
    ft.val_check.setChecked(True)
    assert "validation" in ft.pair_problem() and not ft.start_button.isEnabled()
    assert not ft.val_fraction_spin.isEnabled() and ft.val_qobm_combo.isEnabled()


def test_finetune_dock_defaults_are_the_tested_protocol(make_napari_viewer):
    """The dock starts from the settings `evaluate.finetune_shift_check` shows to help."""
    import inspect

    from napari_lcm_stain.evaluate import finetune_shift_check

    _dock, ft = make_napari_viewer().window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    tested = inspect.signature(finetune_shift_check).parameters
    assert ft.steps_spin.value() == tested["steps"].default == 300
    assert ft.lr_spin.value() == pytest.approx(tested["lr"].default)
    assert ft.patch_spin.value() == tested["patch"].default


def test_finetune_bad_checkpoint_reports_and_resets(
    make_napari_viewer, qtbot, tmp_path, monkeypatch
):
    from qtpy.QtWidgets import QFileDialog

    viewer = make_napari_viewer()
    _pair(viewer, size=64)
    ft = _finetune_dock(viewer)
    bad = tmp_path / "pickle.safetensors"
    bad.write_bytes(b"\x80\x04\x95 pickled data, never unpickled")
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(bad), ""))
    ft.model_combo.activated.emit(ft.model_combo.count() - 1)  # "Checkpoint file…"
    assert ft.model_combo.currentData() == str(bad)
    n_notes = len(notification_manager.records)
    ft.start_button.click()
    qtbot.waitUntil(lambda: not ft.is_running, timeout=TIMEOUT)
    errors = _errors_since(n_notes)
    assert len(errors) == 1 and errors[0].startswith("Fine-tuning failed: ")
    assert "pickle.safetensors" in errors[0]
    assert ft.result is None and not ft.save_button.isEnabled()
    assert ft.start_button.isEnabled() and not ft.stop_button.isEnabled()


@pytest.mark.slow
def test_finetune_stop_save_reload_and_use(
    finetune_base, make_napari_viewer, qtbot, tmp_path, monkeypatch
):
    from qtpy.QtWidgets import QFileDialog

    from napari_lcm_stain.sampling import load_predictor

    viewer = make_napari_viewer()
    q, _d = _pair(viewer)
    ft = _finetune_dock(viewer, finetune_base)
    assert ft.qobm_combo.currentText() == "my qOBM" and ft.dapi_combo.currentText() == "my DAPI"
    ft.steps_spin.setValue(30)  # validation every 3 steps
    ft.start_button.click()
    assert ft.is_running and ft.stop_button.isEnabled() and not ft.start_button.isEnabled()
    qtbot.waitUntil(lambda: len(ft.plot.val) >= 1 and len(ft.plot.train) >= 4, timeout=300_000)
    ft.stop_button.click()
    qtbot.waitUntil(lambda: not ft.is_running, timeout=TIMEOUT)

    assert ft.last_error is None, ft.last_error
    assert ft.result is not None and ft.status.text().startswith("Stopped")
    assert 4 <= len(ft.plot.train) < 30  # stopped early
    assert all(np.isfinite(v) and v >= 0 for _, v in ft.plot.train + ft.plot.val)
    table = ft.metrics_table
    assert table.isVisibleTo(ft)
    for col in (0, 1, 2):
        assert -1.0 <= float(table.item(0, col).text()) <= 1.0  # Pearson before / last / after
    assert table.horizontalHeaderItem(2).text() == f"after\nstep {ft.result.best_step}"
    assert ft.save_button.isEnabled() and ft.use_button.isEnabled()

    target = tmp_path / "mine"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(target), ""))
    ft.save_button.click()
    saved = tmp_path / "mine.safetensors"
    assert saved.exists() and ft.status.text() == f"Saved {saved}"
    predictor = load_predictor(str(saved), device="cpu")
    x = torch.from_numpy(predictor.normalize(q.data[:64, :64]))[None, None]
    noise = torch.zeros((1, *predictor.noise_shape(64, 64)))
    y = predictor(x, noise)
    assert y.shape == (1, 1, 64, 64) and 0.0 <= float(y.min()) and float(y.max()) <= 1.0

    ft.use_button.click()
    stain = viewer.window.add_plugin_dock_widget(PLUGIN, "Virtual stain")[1]
    assert stain.model_combo.currentText() == "LCM fine-tuned"
    stain.pix2pix_check.setChecked(False)
    stain.tile_spin.setValue(128)
    stain.layer_combo.set_layer(q)
    _click_and_wait(qtbot, stain)
    assert stain.last_error is None, stain.last_error
    out = viewer.layers["my qOBM · DAPI (LCM fine-tuned)"]
    assert out.data.shape == q.data.shape and 0.0 <= out.data.min() <= out.data.max() <= 1.0


def test_closing_the_viewer_mid_finetune_is_safe(finetune_base, make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    _pair(viewer, size=96)
    ft = _finetune_dock(viewer, finetune_base)
    ft.steps_spin.setValue(500)
    worker = ft.start()
    qtbot.waitUntil(lambda: len(ft.plot.train) >= 1, timeout=300_000)
    finished = []
    worker.finished.connect(lambda: finished.append(True))
    t0 = time.perf_counter()
    viewer.close()
    qtbot.waitUntil(lambda: bool(finished), timeout=TIMEOUT)
    assert time.perf_counter() - t0 < 30  # stopped, not trained to the end


BAD_INPUTS = {
    "one pixel": np.ones((1, 1), np.float32),
    "thin strip": np.linspace(0, 1, 300, dtype=np.float32)[None, :],
    "constant": np.full((40, 40), 0.3, np.float32),
    "uint16": (np.arange(48 * 48, dtype=np.uint16) * 7).reshape(48, 48),
    "bool": np.eye(32, dtype=bool),
    "float64 huge": np.full((32, 32), 1e300, np.float64),
    "int8 4-D": np.arange(2 * 2 * 24 * 24, dtype=np.int8).reshape(2, 2, 24, 24),
    "some NaN": np.where(np.eye(32, dtype=bool), np.nan, 0.5).astype(np.float32),
    "all NaN": np.full((16, 16), np.nan, np.float32),
    "strided view": np.random.default_rng(0).random((96, 96), dtype=np.float32)[::2, ::3],
    "dask stack": da.from_array(
        np.random.default_rng(1).random((3, 40, 40), dtype=np.float32), chunks=(1, 20, 20)
    ),
}


def test_strange_inputs_stain_or_explain(make_napari_viewer, qtbot, models):
    """Each input either gives in-range outputs of its shape, or one clear error and no layer."""
    viewer = make_napari_viewer()
    for name, data in BAD_INPUTS.items():
        viewer.add_image(data, name=name)
    widget = _stain_dock(viewer)
    widget.pix2pix_check.setChecked(False)
    outcomes = {}
    for name, data in BAD_INPUTS.items():
        widget.layer_combo.set_layer(viewer.layers[name])
        n_notes = len(notification_manager.records)
        _click_and_wait(qtbot, widget)
        errors = _errors_since(n_notes)
        out_name = f"{name} · DAPI (LCM)"
        if widget.last_error is None:
            out = viewer.layers[out_name].data
            assert out.shape == data.shape, name
            assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1, name
            assert errors == [], name
            outcomes[name] = "stained"
        else:
            assert len(errors) == 1 and errors[0] == widget.last_error, name
            assert out_name not in viewer.layers, name
            outcomes[name] = errors[0]
        assert widget.stain_button.isEnabled() and not widget.is_running
        np.testing.assert_array_equal(viewer.layers[name].data, data)  # input untouched
    assert outcomes["all NaN"].startswith("Staining failed:") and "NaN" in outcomes["all NaN"]
    assert outcomes["some NaN"] == "stained" and outcomes["constant"] == "stained"
    assert outcomes["dask stack"] == "stained" and outcomes["strided view"] == "stained"


def test_out_of_distribution_input_is_a_warning_and_a_status_note(
    make_napari_viewer, qtbot, models
):
    viewer = make_napari_viewer()
    q, s = _field(viewer, with_truth=False)
    labels = viewer.add_image(s.nuclei, name="labels as phase", scale=q.scale)
    widget = _stain_dock(viewer)
    widget.pix2pix_check.setChecked(False)

    def ood_warnings_since(n):
        return [
            str(r.message)
            for r in notification_manager.records[n:]
            if r.severity == NotificationSeverity.WARNING and "does not look like" in str(r.message)
        ]

    widget.layer_combo.set_layer(q)
    n_notes = len(notification_manager.records)
    _click_and_wait(qtbot, widget)  # a simulated phase field: quiet
    assert ood_warnings_since(n_notes) == []
    assert "OOD score" not in widget.status.text()

    widget.layer_combo.set_layer(labels)
    n_notes = len(notification_manager.records)
    _click_and_wait(qtbot, widget)
    warned = ood_warnings_since(n_notes)
    assert len(warned) == 1 and warned[0].startswith("'labels as phase': input does not look like")
    assert "exactly equal" in warned[0]
    assert widget.status.text().startswith("Done: 1 layer(s)")  # never blocks
    assert "OOD score" in widget.status.text()
    assert widget.last_outcome.ood["flag"] is True
    assert "labels as phase · DAPI (LCM)" in viewer.layers


def test_an_implausible_layer_scale_is_named_in_the_error(make_napari_viewer, qtbot):
    """Issue 15 item 10 in the dock: the message says the pixel size came from the layer scale."""
    from napari_lcm_stain._widgets.stain_widget import StainWidget

    viewer = make_napari_viewer()
    viewer.add_image(
        np.random.default_rng(0).random((64, 64), dtype=np.float32),
        name="q",
        scale=(414, 414),
        units=("micrometer", "micrometer"),
    )
    dock = StainWidget(viewer)
    dock.pix2pix_check.setChecked(False)
    worker = dock.run()
    qtbot.waitUntil(lambda: not dock.is_running, timeout=60_000)
    assert worker is not None
    assert "layer scale of 'q'" in dock.status.text(), dock.status.text()
