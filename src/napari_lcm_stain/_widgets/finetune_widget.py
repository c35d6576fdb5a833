"""The "Fine-tune" dock: adapt the 1-step model to a user's own paired qOBM/DAPI images.

Training runs in a napari ``thread_worker`` (`_jobs.finetune_job` around `finetune.iter_finetune`);
Stop sets a `threading.Event` that the trainer checks every step, and the trainer then returns the
best weights so far, so stopping early still gives a usable model.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

from napari.layers import Layer
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from . import _jobs
from ._layers import base_data, default_dapi, default_qobm, same_layer
from ._qt_helpers import LayerCombo, LossPlot, fit_table_height
from .stain_widget import DEVICES, _stop_worker

PLUGIN = "napari-lcm-stain"
STAIN_WIDGET = "Virtual stain"
_BROWSE = "__browse__"
#: Metrics shown before/after, in this order, when the trainer reports them.
SHOWN_METRICS = (
    ("pearson", "Pearson"),
    ("ssim", "SSIM"),
    ("recall", "Nuclei recall"),
    ("precision", "Nuclei precision"),
    ("f1", "Nuclei F1"),
)


class FinetuneWidget(QWidget):
    """Dock that fine-tunes the packaged LCM on paired layers, then saves or uses the result."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self._job: dict[str, Any] = {}
        self._pbar: progress | None = None
        self.result: Any = None
        self.last_error: str | None = None
        self._n_used = 0
        self._build()
        layers = self.viewer.layers
        for ev in (layers.events.inserted, layers.events.removed, layers.events.moved):
            ev.connect(self._on_layers_changed)
        layers.events.inserted.connect(self._on_layer_inserted)
        for ly in layers:
            ly.events.name.connect(self._on_layers_changed)
        self.destroyed.connect(lambda *_a, h=self._job: _stop_worker(h))

    # ------------------------------------------------------------------ UI
    def _build(self) -> None:
        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.qobm_combo = LayerCombo(
            self.viewer,
            default=lambda: default_qobm(self.viewer.layers, self.viewer.layers.selection.active),
        )
        self.qobm_combo.setToolTip("qOBM phase image of your paired training data.")
        form.addRow("qOBM layer", self.qobm_combo)
        self.dapi_combo = LayerCombo(
            self.viewer, default=lambda: default_dapi(self.viewer.layers, self.qobm_combo.layer())
        )
        self.dapi_combo.setToolTip("Measured DAPI of the same field, pixel-aligned, same shape.")
        form.addRow("Paired DAPI", self.dapi_combo)

        self.val_check = QCheckBox("Separate validation pair")
        self.val_check.setToolTip(
            "Validate on another field; otherwise a held-out fraction of the pair is used."
        )
        form.addRow(self.val_check)
        self.val_qobm_combo = LayerCombo(self.viewer, allow_none=True)
        self.val_dapi_combo = LayerCombo(self.viewer, allow_none=True)
        form.addRow("Validation qOBM", self.val_qobm_combo)
        form.addRow("Validation DAPI", self.val_dapi_combo)
        self.val_fraction_spin = QDoubleSpinBox()
        self.val_fraction_spin.setRange(0.05, 0.5)
        self.val_fraction_spin.setSingleStep(0.05)
        self.val_fraction_spin.setValue(0.2)
        self.val_fraction_spin.setToolTip("Share of the pair held out for validation.")
        form.addRow("Held-out fraction", self.val_fraction_spin)

        self.model_combo = QComboBox()
        self.model_combo.addItem("LCM (packaged)", "lcm")
        self.model_combo.addItem("Checkpoint file…", _BROWSE)
        self.model_combo.activated.connect(self._on_model_activated)
        self._model_index = 0
        form.addRow("Start from", self.model_combo)

        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 100_000)
        self.steps_spin.setValue(300)
        form.addRow("Steps", self.steps_spin)
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(6)
        self.lr_spin.setRange(1e-6, 1e-2)
        self.lr_spin.setSingleStep(5e-5)
        self.lr_spin.setValue(2e-4)
        form.addRow("Learning rate", self.lr_spin)
        self.patch_spin = QSpinBox()
        self.patch_spin.setRange(32, 1024)
        self.patch_spin.setSingleStep(32)
        self.patch_spin.setValue(128)
        self.patch_spin.setSuffix(" px")
        form.addRow("Patch size", self.patch_spin)
        self.device_combo = QComboBox()
        for name in DEVICES:
            self.device_combo.addItem(name, name)
        form.addRow("Device", self.device_combo)
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        form.addRow("Seed", self.seed_spin)

        self.pair_note = QLabel()
        self.pair_note.setWordWrap(True)
        self.pair_note.setStyleSheet("color: #ff8a65;")

        self.start_button = QPushButton("Start")
        self.start_button.clicked.connect(lambda: self.start())
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("Stop after this step and keep the best weights so far.")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self.stop)
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button, 2)
        buttons.addWidget(self.stop_button, 1)

        self.status = QLabel("Pick a qOBM layer and its paired DAPI layer.")
        self.status.setWordWrap(True)
        self.plot = LossPlot()

        self.metrics_table = QTableWidget(len(SHOWN_METRICS), 2)
        self.metrics_table.setHorizontalHeaderLabels(["before", "after"])
        self.metrics_table.setVerticalHeaderLabels([t for _, t in SHOWN_METRICS])
        self.metrics_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.metrics_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.metrics_table.setToolTip(
            "Validation metrics of the starting and the fine-tuned model."
        )
        self.metrics_table.setVisible(False)

        self.save_button = QPushButton("Save checkpoint…")
        self.save_button.setEnabled(False)
        self.save_button.clicked.connect(lambda: self.save())
        self.use_button = QPushButton("Use in Stain widget")
        self.use_button.setEnabled(False)
        self.use_button.clicked.connect(lambda: self.use_in_stain_widget())
        after = QHBoxLayout()
        after.addWidget(self.save_button)
        after.addWidget(self.use_button)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.pair_note)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        layout.addWidget(self.plot)
        layout.addWidget(self.metrics_table)
        layout.addLayout(after)
        layout.addStretch(1)

        for combo in (self.qobm_combo, self.dapi_combo, self.val_qobm_combo, self.val_dapi_combo):
            combo.layerChanged.connect(self._check_pair)
        self.qobm_combo.layerChanged.connect(lambda _l: self.dapi_combo.refresh())
        self.val_check.toggled.connect(self._on_val_toggled)
        self._on_val_toggled(False)

    def _on_val_toggled(self, on: bool) -> None:
        self.val_qobm_combo.setEnabled(on)
        self.val_dapi_combo.setEnabled(on)
        self.val_fraction_spin.setEnabled(not on)
        self._check_pair()

    def _on_layer_inserted(self, event: Any) -> None:
        event.value.events.name.connect(self._on_layers_changed)

    def _on_layers_changed(self, *_args: Any) -> None:
        for combo in (self.qobm_combo, self.dapi_combo, self.val_qobm_combo, self.val_dapi_combo):
            combo.refresh()
        self._check_pair()

    def _on_model_activated(self, index: int) -> None:
        if self.model_combo.itemData(index) != _BROWSE:
            self._model_index = index
            return
        path, _ = QFileDialog.getOpenFileName(
            self, "Start from a checkpoint", "", "Checkpoints (*.safetensors);;All files (*)"
        )
        if path:
            self.model_combo.insertItem(self.model_combo.count() - 1, Path(path).name, path)
            index = self.model_combo.count() - 2
        else:
            index = self._model_index
        self.model_combo.setCurrentIndex(index)
        self._model_index = index

    # ------------------------------------------------------------------ validation of the pair
    def pair_problem(self) -> str | None:
        """Why training cannot start with the current choice (None when it can)."""
        q, d = self.qobm_combo.layer(), self.dapi_combo.layer()
        if q is None or d is None:
            return "Pick a qOBM layer and its paired DAPI layer (single-channel images)."
        if same_layer(q, d):
            return "The qOBM and DAPI layers are the same layer; pick the measured DAPI."
        problem = _shape_problem(q, d, "qOBM", "DAPI")
        if problem:
            return problem
        if self.val_check.isChecked():
            vq, vd = self.val_qobm_combo.layer(), self.val_dapi_combo.layer()
            if vq is None or vd is None:
                return "Pick both validation layers, or untick 'Separate validation pair'."
            problem = _shape_problem(vq, vd, "validation qOBM", "validation DAPI")
            if problem:
                return problem
        return None

    def _check_pair(self, *_args: Any) -> None:
        problem = self.pair_problem()
        self.pair_note.setText(problem or "")
        self.pair_note.setVisible(bool(problem))
        self.start_button.setEnabled(problem is None and not self.is_running)

    @property
    def is_running(self) -> bool:
        return self._job.get("worker") is not None

    # ------------------------------------------------------------------ training
    def start(self) -> Any:
        """Start fine-tuning in the background; returns the worker (None if not started)."""
        if self.is_running:
            return None
        problem = self.pair_problem()
        if problem:
            self._fail(problem)
            return None
        # lazy (dask/zarr) layers are read in the worker, not on the UI thread
        qobm = base_data(self.qobm_combo.layer())
        dapi = base_data(self.dapi_combo.layer())
        val = None
        if self.val_check.isChecked():
            val = (
                base_data(self.val_qobm_combo.layer()),
                base_data(self.val_dapi_combo.layer()),
            )
        stop = threading.Event()
        steps = self.steps_spin.value()
        worker = create_worker(
            _jobs.finetune_job,
            qobm,
            dapi,
            stop=stop,
            model=self.model_combo.currentData(),
            steps=steps,
            lr=self.lr_spin.value(),
            patch=self.patch_spin.value(),
            val=val,
            val_fraction=self.val_fraction_spin.value(),
            seed=self.seed_spin.value(),
            device=self.device_combo.currentData(),
            _start_thread=False,
        )
        worker.yielded.connect(self._on_tick)
        worker.returned.connect(self._on_returned)
        worker.finished.connect(self._on_finished)
        self._job.update(worker=worker, stop=stop)
        self.result = None
        self.last_error = None
        self.plot.clear(steps)
        self.metrics_table.setVisible(False)
        self._pbar = progress(total=steps, desc="Fine-tuning")
        self.status.setText("Fine-tuning… (first steps include loading the model)")
        self.start_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        self.save_button.setEnabled(False)
        self.use_button.setEnabled(False)
        worker.start()
        return worker

    def stop(self) -> None:
        """Ask the trainer to stop after the current step; it returns the best weights so far."""
        event = self._job.get("stop")
        if event is None or not self.is_running:
            return
        event.set()
        self.stop_button.setEnabled(False)
        self.status.setText("Stopping after this step; keeping the best weights so far…")

    def _on_tick(self, tick: _jobs.FinetuneTick) -> None:
        self.plot.add(tick.step, tick.train_loss, tick.val_loss)
        pbar = self._pbar  # local: progress events may process Qt events (re-entrancy)
        if pbar is not None:
            if tick.total and pbar.total != tick.total:
                pbar.total = tick.total
            pbar.update(max(0, tick.step - pbar.n))
        if not self._job.get("stop") or not self._job["stop"].is_set():
            loss = "" if tick.train_loss is None else f", train loss {tick.train_loss:.4g}"
            val = "" if tick.val_loss is None else f", validation {tick.val_loss:.4g}"
            self.status.setText(f"Step {tick.step}/{tick.total}{loss}{val}")

    def _on_returned(self, result: Any) -> None:
        if self._job.get("closing"):
            return
        if isinstance(result, _jobs.JobFailure):
            self._fail(f"Fine-tuning failed: {result.message}")
            return
        if result is None:
            self._fail("Fine-tuning stopped before it produced weights.")
            return
        self.result = result
        self._show_metrics(
            getattr(result, "metrics_before", {}), getattr(result, "metrics_after", {})
        )
        stopped = self._job.get("stop") is not None and self._job["stop"].is_set()
        best = getattr(result, "best_step", None)
        what = "Stopped" if stopped else "Finished"
        self.status.setText(
            f"{what}. Best validation at step {best}." if best is not None else f"{what}."
        )
        self.save_button.setEnabled(True)
        self.use_button.setEnabled(True)

    def _on_finished(self) -> None:
        self._job.pop("worker", None)
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        if self._job.get("closing"):
            return
        self.stop_button.setEnabled(False)
        self._check_pair()

    def _fail(self, message: str) -> None:
        self.last_error = message
        self.status.setText(message)
        show_error(message)

    def _show_metrics(self, before: dict, after: dict) -> None:
        shown = False
        for r, (key, _title) in enumerate(SHOWN_METRICS):
            for c, values in enumerate((before or {}, after or {})):
                v = values.get(key)
                ok = isinstance(v, (int, float)) and math.isfinite(v)
                item = QTableWidgetItem(f"{v:.3f}" if ok else "–")
                item.setTextAlignment(Qt.AlignmentFlag.AlignCenter)
                self.metrics_table.setItem(r, c, item)
                shown = shown or ok
        self.metrics_table.setVisible(shown)
        if shown:
            fit_table_height(self.metrics_table)

    # ------------------------------------------------------------------ after training
    def save(self, path: str | Path | None = None) -> Path | None:
        """Write the fine-tuned checkpoint (atomic safetensors + JSON) to ``path`` or a chosen file."""
        if self.result is None:
            self._fail("Nothing to save yet: run fine-tuning first.")
            return None
        if path is None:
            chosen, _ = QFileDialog.getSaveFileName(
                self,
                "Save fine-tuned checkpoint",
                "finetuned.safetensors",
                "Checkpoints (*.safetensors)",
            )
            if not chosen:
                return None
            path = chosen
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        try:
            saved = self.result.save(path)
        except Exception as exc:  # noqa: BLE001 - the user gets the message
            self._fail(f"Could not save the checkpoint: {_jobs.failure_message(exc)}")
            return None
        saved = Path(saved) if isinstance(saved, (str, Path)) else path
        self.status.setText(f"Saved {saved}")
        show_info(f"Saved fine-tuned checkpoint to {saved}")
        return saved

    def use_in_stain_widget(self) -> Any:
        """Offer the fine-tuned model in this viewer's Stain dock (opened if needed); return it."""
        if self.result is None:
            self._fail("Nothing to use yet: run fine-tuning first.")
            return None
        try:
            predictor = self.result.predictor(device=self.device_combo.currentData())
        except Exception as exc:  # noqa: BLE001
            self._fail(f"Could not build the fine-tuned model: {_jobs.failure_message(exc)}")
            return None
        _dock, widget = self.viewer.window.add_plugin_dock_widget(PLUGIN, STAIN_WIDGET)
        self._n_used += 1
        label = "LCM fine-tuned" + (f" {self._n_used}" if self._n_used > 1 else "")
        widget.add_model(label, predictor, uses_steps=False)
        show_info(f"'{label}' is now the model in the Virtual stain dock.")
        return widget


def _shape_problem(a: Layer, b: Layer, name_a: str, name_b: str) -> str | None:
    sa, sb = tuple(base_data(a).shape), tuple(base_data(b).shape)
    if sa != sb:
        return (
            f"{name_a} '{a.name}' is {sa} but {name_b} '{b.name}' is {sb}: the pair must have the "
            "same shape (pixel-aligned images of one field)."
        )
    return None
