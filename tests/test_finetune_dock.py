"""The Fine-tune dock's training data (several layer pairs, a folder) and live validation metrics,
in a real napari viewer (pytest-qt + Xvfb).

Training starts from the tiny untrained LCM of test_finetune.py and runs the real
`finetune.iter_finetune` for a few steps on small images, so these tests are about the dock's
plumbing, not about whether fine-tuning helps.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_lcm_stain import finetune
from test_finetune import pair, tiny_finetunable, write_pairs

pytestmark = pytest.mark.gui

PLUGIN = "napari-lcm-stain"
TIMEOUT = 120_000  # ms


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_finetunable(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture
def calls(monkeypatch):
    """Record the arguments and the events of every `iter_finetune` run (the real one runs)."""
    real = finetune.iter_finetune
    seen: list[dict] = []

    def spy(qobm, dapi, **kwargs):
        seen.append({"qobm": qobm, "dapi": dapi, "events": [], **kwargs})
        result = yield from _recorded(real(qobm, dapi, **kwargs), seen[-1]["events"])
        return result

    monkeypatch.setattr(finetune, "iter_finetune", spy)
    return seen


def _recorded(gen, events):
    while True:
        try:
            ev = next(gen)
        except StopIteration as done:
            return done.value
        events.append(ev)
        yield ev


def _dock(viewer, base, source):
    _d, ft = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    ft.model_combo.insertItem(0, "tiny", base)
    ft.model_combo.setCurrentIndex(0)
    ft.source_combo.setCurrentIndex(ft.source_combo.findData(source))
    ft.patch_spin.setValue(32)
    ft.device_combo.setCurrentIndex(ft.device_combo.findData("cpu"))
    return ft


def _add_layer_pair(viewer, shape, seed, suffix=""):
    q, d = pair(shape, seed)
    return (
        viewer.add_image(q.astype(np.float32), name=f"my qOBM{suffix}"),
        viewer.add_image(d.astype(np.float32), name=f"my DAPI{suffix}"),
    )


def _column(table, col):
    return [table.item(r, col).text() for r in range(table.rowCount())]


def _shown(metrics):
    """How the dock's table writes a metrics dict (3 decimals, '–' for a missing value)."""
    keys = ("pearson", "ssim", "recall", "precision", "f1")
    return [
        f"{metrics[k]:.3f}" if metrics.get(k) is not None and np.isfinite(metrics[k]) else "–"
        for k in keys
    ]


def _run(ft, qtbot):
    worker = ft.start()
    assert worker is not None, ft.last_error
    qtbot.waitUntil(lambda: not ft.is_running, timeout=TIMEOUT)
    assert ft.last_error is None, ft.last_error
    assert ft.result is not None


def test_two_layer_pairs_train_together_with_live_validation_metrics(
    tiny, calls, make_napari_viewer, qtbot, monkeypatch
):
    viewer = make_napari_viewer()
    q1, d1 = _add_layer_pair(viewer, (64, 64), 0)
    q2, d2 = _add_layer_pair(viewer, (64, 80), 1, " 2")  # pairs may differ in size
    originals = [ly.data.copy() for ly in (q1, d1, q2, d2)]
    ft = _dock(viewer, tiny, "pairs")
    assert ft.pairs_box.isVisibleTo(ft) and not ft.folder_box.isVisibleTo(ft)
    assert not ft.start_button.isEnabled() and "Add pair" in ft.pair_note.text()
    for q, d in ((q1, d1), (q2, d2)):
        ft.qobm_combo.set_layer(q)
        ft.dapi_combo.set_layer(d)
        ft.add_pair_button.click()
    rows = [ft.pair_list.item(i).text() for i in range(ft.pair_list.count())]
    assert rows == ["my qOBM ↔ my DAPI", "my qOBM 2 ↔ my DAPI 2 (validation)"]
    assert ft.pair_problem() is None and ft.start_button.isEnabled()

    snapshots = []  # what the table showed right after each tick
    on_tick = ft._on_tick

    def spy(tick):
        on_tick(tick)
        snapshots.append((tick.step, _column(ft.metrics_table, 0), _column(ft.metrics_table, 1)))

    monkeypatch.setattr(ft, "_on_tick", spy)
    ft.steps_spin.setValue(4)  # validation every step (steps // 10 -> 1)
    _run(ft, qtbot)

    (call,) = calls
    assert len(call["qobm"]) == len(call["dapi"]) == 2
    assert call["names"] == ["my qOBM ↔ my DAPI", "my qOBM 2 ↔ my DAPI 2"]
    cfg = ft.result.config["finetune"]
    assert cfg["pairs"] == 2 and cfg["validation"] == "held-out pairs: my qOBM 2 ↔ my DAPI 2"
    assert "Validation: held-out pairs: my qOBM 2 ↔ my DAPI 2." in ft.status.text()

    # live: after every validation event, "before" and "now" show what that event carried
    events = [ev for ev in call["events"] if ev.val_metrics is not None]
    assert [ev.step for ev in events] == [1, 2, 3, 4]
    assert [s for s, _m in ft.live_metrics] == [1, 2, 3, 4]
    for ev, (step, before, now) in zip(events, snapshots):
        assert step == ev.step
        assert now == _shown(ev.val_metrics) and before == _shown(ev.metrics_before)
    for (_s, shown), ev in zip(ft.live_metrics, events):
        assert shown == pytest.approx(ev.val_metrics, nan_ok=True)
    # best so far: the plot's mark and the table's header follow the events
    last = events[-1]
    header = ft.metrics_table.horizontalHeaderItem
    assert ft.plot.best_step == (last.best_step or None) == (ft.result.best_step or None)
    assert header(1).text() == "last\nstep 4" and _column(ft.metrics_table, 1) == _shown(
        last.val_metrics
    )
    assert header(2).text() == f"after\nstep {ft.result.best_step}"
    assert _column(ft.metrics_table, 2) == _shown(ft.result.metrics_after)
    assert _column(ft.metrics_table, 0) == _shown(ft.result.metrics_before)

    # the user's layers are untouched
    for ly, before in zip((q1, d1, q2, d2), originals):
        np.testing.assert_array_equal(ly.data, before)


def test_layer_pairs_refuse_a_layer_twice_and_mismatched_shapes(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    q1, d1 = _add_layer_pair(viewer, (64, 64), 0)
    q2, _d2 = _add_layer_pair(viewer, (64, 64), 1, " 2")
    wide = viewer.add_image(np.ones((64, 80), np.float32), name="wide DAPI")
    ft = _dock(viewer, "lcm", "pairs")

    def add(q, d):
        ft.qobm_combo.set_layer(q)
        ft.dapi_combo.set_layer(d)
        return ft.add_pair()

    assert add(q1, d1) and ft.pair_names() == ["my qOBM ↔ my DAPI"]
    assert not add(q2, d1)
    assert (
        ft.last_error
        == "Layer 'my DAPI' is in pair 1 and pair 2: each layer may be in one pair only."
    )
    assert not add(q2, wide)
    assert ft.last_error.startswith("Pair 2 (my qOBM 2 ↔ wide DAPI): qOBM 'my qOBM 2' is (64, 64)")
    assert not add(q2, q2) and "as both qOBM and DAPI" in ft.last_error
    assert ft.pair_names() == ["my qOBM ↔ my DAPI"]  # nothing refused was added

    ft.val_check.setChecked(True)
    ft.val_qobm_combo.set_layer(q1)
    ft.val_dapi_combo.set_layer(wide)
    assert "is (64, 64) but validation DAPI 'wide DAPI' is (64, 80)" in ft.pair_problem()
    ft.val_dapi_combo.set_layer(d1)
    problem = ft.pair_problem()
    assert problem == (
        "The validation layer 'my qOBM' is also a training layer; validate on another field."
    )
    assert not ft.start_button.isEnabled() and ft.start() is None and ft.last_error == problem
    ft.val_check.setChecked(False)

    viewer.layers.remove(d1)  # a pair whose layer is deleted leaves the list
    assert ft.pair_names() == [] and ft.pair_list.count() == 0
    assert ft.start() is None and "Add pair" in ft.last_error
    assert add(q1, q2) and ft.pair_list.count() == 1
    ft.remove_pair(0)
    assert ft.pair_names() == []


def test_a_folder_of_pairs_is_listed_and_trained_on(
    tiny, calls, make_napari_viewer, qtbot, tmp_path, monkeypatch
):
    from qtpy.QtWidgets import QFileDialog

    folder = write_pairs(tmp_path / "pairs", [(64, 64), (64, 80), (64, 64)])
    (folder / "notes.txt").write_text("not an image")
    viewer = make_napari_viewer()
    ft = _dock(viewer, tiny, "folder")
    assert ft.folder_box.isVisibleTo(ft) and not ft.qobm_combo.isEnabled()
    assert "Choose a folder" in ft.pair_note.text() and not ft.start_button.isEnabled()
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: str(folder))
    ft.browse_folder_button.click()
    assert ft.folder_edit.text() == str(folder)
    assert ft.folder_note.text() == "3 pairs: f0, f1, f2; validation: f2"
    assert ft.pair_problem() is None and ft.start_button.isEnabled()

    ft.steps_spin.setValue(2)
    _run(ft, qtbot)
    (call,) = calls
    assert call["names"] == ["f0", "f1", "f2"] and len(call["qobm"]) == 3
    assert ft.result.config["finetune"]["pairs"] == 3
    assert ft.status.text().endswith("Validation: held-out pairs: f2.")
    assert ft.live_metrics and ft.metrics_table.isVisibleTo(ft)


def test_a_folder_without_pairs_is_explained_and_nothing_starts(
    calls, make_napari_viewer, tmp_path
):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    viewer = make_napari_viewer()
    ft = _dock(viewer, "lcm", "folder")
    assert ft.set_folder(empty) == []
    expected = f"no qOBM/DAPI pairs in {empty}: name each pair NAME_qobm.tif and NAME_dapi.tif"
    assert ft.pair_note.text().startswith(expected) and ft.pair_note.isVisibleTo(ft)
    assert not ft.start_button.isEnabled() and ft.folder_note.text() == ""
    assert ft.start() is None and ft.last_error.startswith(expected) and not ft.is_running

    lonely = tmp_path / "lonely"
    write_pairs(lonely, [(64, 64)])
    (lonely / "f0_dapi.tif").unlink()
    assert ft.set_folder(lonely) == []
    assert "f0_qobm.tif has no dapi partner" in ft.pair_note.text()
    assert ft.start() is None and not ft.is_running
    assert calls == []  # training never started
