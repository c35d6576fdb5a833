"""The "Fine-tune" dock: adapt the 1-step model to a user's own paired qOBM/DAPI images.

Training runs in a napari ``thread_worker`` (`_jobs.finetune_job` around `finetune.iter_finetune`);
Stop sets a `threading.Event` that the trainer checks every step, and the trainer then returns the
best weights so far, so stopping early still gives a usable model.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from napari.layers import Layer
from napari.utils.notifications import show_info
from qtpy.QtWidgets import QComboBox, QFileDialog, QWidget

from . import _base as ui
from . import _jobs
from ._base import BROWSE, DEVICES, DockBase
from ._layers import base_data, default_dapi, same_layer
from ._qt_helpers import LayerCombo, LossPlot

PLUGIN = "napari-lcm-stain"
STAIN_WIDGET = "Virtual stain"
#: Metrics shown before/after, in this order, when the trainer reports them.
SHOWN_METRICS = (
    ("pearson", "Pearson"),
    ("ssim", "SSIM"),
    ("recall", "Nuclei recall"),
    ("precision", "Nuclei precision"),
    ("f1", "Nuclei F1"),
)


class FinetuneWidget(DockBase):
    """Dock that fine-tunes the packaged LCM on paired layers, then saves or uses the result."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        self.result: Any = None
        self._n_used = 0
        self._build()
        self.watch_layers()

    # ------------------------------------------------------------------ UI
    def _build(self) -> None:
        form = ui.form_layout()
        self.qobm_combo = self.qobm_picker("qOBM phase image of your paired training data.")
        form.addRow("qOBM layer", self.qobm_combo)
        self.dapi_combo = LayerCombo(
            self.viewer, default=lambda: default_dapi(self.viewer.layers, self.qobm_combo.layer())
        )
        self.dapi_combo.setToolTip("Measured DAPI of the same field, pixel-aligned, same shape.")
        form.addRow("Paired DAPI", self.dapi_combo)

        self.val_check = ui.check_box(
            "Separate validation pair",
            "Validate on another field; otherwise a held-out fraction of the pair is used.",
        )
        form.addRow(self.val_check)
        self.val_qobm_combo = LayerCombo(self.viewer, allow_none=True)
        self.val_dapi_combo = LayerCombo(self.viewer, allow_none=True)
        form.addRow("Validation qOBM", self.val_qobm_combo)
        form.addRow("Validation DAPI", self.val_dapi_combo)
        self.val_fraction_spin = ui.float_box(
            0.05, 0.5, 0.2, step=0.05, tip="Share of the pair held out for validation."
        )
        form.addRow("Held-out fraction", self.val_fraction_spin)

        self.model_combo = QComboBox()
        self.model_combo.addItem("LCM (packaged)", "lcm")
        self.model_combo.addItem("Checkpoint file…", BROWSE)
        self.model_combo.activated.connect(self._on_model_activated)
        self._model_index = 0
        form.addRow("Start from", self.model_combo)

        self.steps_spin = ui.spin_box(1, 100_000, 300)
        form.addRow("Steps", self.steps_spin)
        self.lr_spin = ui.float_box(1e-6, 1e-2, 2e-4, step=5e-5, decimals=6)
        form.addRow("Learning rate", self.lr_spin)
        self.patch_spin = ui.spin_box(32, 1024, 128, step=32, suffix=" px")
        form.addRow("Patch size", self.patch_spin)
        self.device_combo = QComboBox()
        for name in DEVICES:
            self.device_combo.addItem(name, name)
        form.addRow("Device", self.device_combo)
        self.seed_spin = ui.spin_box(0, 2**31 - 1, 0)
        form.addRow("Seed", self.seed_spin)

        self.pair_note = ui.note_label(color="#ff8a65")
        self.start_button = ui.button("Start", self.start)
        self.stop_button = ui.button(
            "Stop",
            self.stop,
            tip="Stop after this step and keep the best weights so far.",
            enabled=False,
        )
        self.status.setText("Pick a qOBM layer and its paired DAPI layer.")
        self.plot = LossPlot()
        self.metrics_table = ui.metrics_table(
            ["before", "after"],
            "Validation metrics of the starting and the fine-tuned model.",
            rows=[t for _, t in SHOWN_METRICS],
        )
        self.save_button = ui.button("Save checkpoint…", self.save, enabled=False)
        self.use_button = ui.button("Use in Stain widget", self.use_in_stain_widget, enabled=False)

        ui.stack(
            self,
            form,
            self.pair_note,
            ui.row((self.start_button, 2), (self.stop_button, 1)),
            self.status,
            self.plot,
            self.metrics_table,
            ui.row(self.save_button, self.use_button),
        )

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

    def layer_combos(self) -> list[LayerCombo]:
        return [self.qobm_combo, self.dapi_combo, self.val_qobm_combo, self.val_dapi_combo]

    def layers_refreshed(self) -> None:
        self._check_pair()

    def _on_model_activated(self, index: int) -> None:
        if self.model_combo.itemData(index) != BROWSE:
            self._model_index = index
            return
        path = self.browse_checkpoint("Start from a checkpoint")
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
        worker = self.start_worker(
            _jobs.finetune_job,
            qobm,
            dapi,
            desc="Fine-tuning",
            total=steps,
            on_yield=self._on_tick,
            on_return=self._on_returned,
            stop_event=stop,
            stop=stop,
            model=self.model_combo.currentData(),
            steps=steps,
            lr=self.lr_spin.value(),
            patch=self.patch_spin.value(),
            val=val,
            val_fraction=self.val_fraction_spin.value(),
            seed=self.seed_spin.value(),
            device=self.device_combo.currentData(),
        )
        self.result = None
        self.plot.clear(steps)
        self.metrics_table.setVisible(False)
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
        self.advance(tick.step, tick.total)
        if not self._job.get("stop") or not self._job["stop"].is_set():
            loss = "" if tick.train_loss is None else f", train loss {tick.train_loss:.4g}"
            val = "" if tick.val_loss is None else f", validation {tick.val_loss:.4g}"
            self.status.setText(f"Step {tick.step}/{tick.total}{loss}{val}")

    def _on_returned(self, result: Any) -> None:
        if self.job_failed(result, "Fine-tuning"):
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

    def worker_done(self) -> None:
        self.stop_button.setEnabled(False)
        self._check_pair()

    def _show_metrics(self, before: dict, after: dict) -> None:
        before, after = before or {}, after or {}
        ui.show_values(
            self.metrics_table, [[before.get(k), after.get(k)] for k, _ in SHOWN_METRICS]
        )

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
