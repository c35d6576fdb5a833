"""The "Virtual stain" dock: qOBM layer in, virtual DAPI layers out.

All computation runs in a napari ``thread_worker`` (`_jobs.stain_job`); this file only reads the
controls, starts/cancels the worker and turns its result into layers. Cancelling drops the result
before any layer is made, so a cancelled or failed run never leaves a half-made layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Layer
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt, QTimer
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
from superqt import QCollapsible

from . import _jobs
from ._layers import (
    DAPI_COLORMAP,
    ROLE_PIX2PIX,
    ROLE_STAIN,
    ROLE_UNCERTAINTY,
    base_data,
    current_plane,
    default_qobm,
    default_truth,
    find_output,
    layer_pixel_size,
    matching_labels,
    same_layer,
    upsert_output,
)
from ._qt_helpers import LayerCombo, fit_table_height

DEVICES = ("auto", "cpu", "cuda", "mps")
_BROWSE = "__browse__"


@dataclass(frozen=True)
class ModelChoice:
    """An entry of the model menu: the label used in layer names and what the engine gets."""

    label: str
    model: Any  # "lcm" | "teacher" | checkpoint path | loaded Predictor
    uses_steps: bool = True


def _stop_worker(holder: dict) -> None:
    """Ask a running worker to stop; connected to ``destroyed`` so closing the viewer stops it."""
    worker = holder.get("worker")
    if worker is not None:
        holder["closing"] = True
        event = holder.get("stop")
        if event is not None:
            event.set()
        worker.quit()


def _restore_order(layers: Any, names: list[str]) -> None:
    """Put the named layers back in their saved order (others keep theirs, after them)."""
    present = {ly.name for ly in layers}
    saved = [n for n in names if n in present]
    desired = saved + [ly.name for ly in layers if ly.name not in set(saved)]
    for target, name in enumerate(desired):
        current = layers.index(layers[name])
        if current != target:
            layers.move(current, target)


def _grid(viewer: Any) -> Any:
    """napari's grid settings (``viewer.canvas.grid`` since 0.9, ``viewer.grid`` before)."""
    canvas = getattr(viewer, "canvas", None)
    return canvas.grid if canvas is not None and hasattr(canvas, "grid") else viewer.grid


class StainWidget(QWidget):
    """Dock that stains a qOBM layer with the packaged LCM (and Pix2Pix for comparison)."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self._job: dict[str, Any] = {}  # worker handle, shared with the destroyed-hook
        self._pbar: progress | None = None
        self._cache: dict = {}  # loaded predictors, reused across runs
        self._grid_saved: dict[str, Any] | None = None
        # "current plane only": the source being followed, the plane shown, the plane running
        self._follow: str | None = None
        self._shown_plane: tuple[int, ...] | None = None
        self._running_plane: tuple[int, ...] | None = None
        self._restart_plane = False
        self._cancelled = False
        self.last_outcome: _jobs.StainOutcome | None = None
        self.last_error: str | None = None
        #: what "Compare with Pix2Pix" runs: the packaged baseline, or a Pix2Pix checkpoint path
        self.baseline_model: Any = "pix2pix"
        self._build()
        self._connect_viewer()
        self.destroyed.connect(lambda *_a, h=self._job: _stop_worker(h))

    # ------------------------------------------------------------------ UI
    def _build(self) -> None:
        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)

        self.layer_combo = LayerCombo(
            self.viewer, default=lambda: default_qobm(self.viewer.layers, self._active_layer())
        )
        self.layer_combo.setToolTip("Single-channel qOBM phase image to stain.")
        form.addRow("qOBM layer", self.layer_combo)
        self.layer_note = QLabel()
        self.layer_note.setWordWrap(True)
        self.layer_note.setStyleSheet("color: gray;")
        form.addRow(self.layer_note)

        self.model_combo = QComboBox()
        self.model_combo.addItem("LCM (packaged, 1-4 steps)", ModelChoice("LCM", "lcm"))
        self.model_combo.addItem(
            "Teacher (packaged, slow DDIM)", ModelChoice("Teacher", "teacher", uses_steps=False)
        )
        self.model_combo.addItem("Checkpoint file…", _BROWSE)
        self.model_combo.setToolTip("Model for the main output; checkpoints are *.safetensors.")
        self._model_index = 0
        self.model_combo.activated.connect(self._on_model_activated)
        form.addRow("Model", self.model_combo)

        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 4)
        self.steps_spin.setValue(1)
        self.steps_spin.setToolTip("LCM sampling steps: 1 is fastest; 2-4 refine details.")
        form.addRow("Steps", self.steps_spin)

        self.pix2pix_check = QCheckBox("Compare with Pix2Pix")
        self.pix2pix_check.setChecked(True)
        self.pix2pix_check.setToolTip("Also run the packaged Pix2Pix baseline.")
        form.addRow(self.pix2pix_check)

        self.uncertainty_check = QCheckBox("Uncertainty (K samples)")
        self.uncertainty_check.setToolTip(
            "Run the model K times with different noise: the DAPI layer becomes their mean and an "
            "extra layer shows their standard deviation. Costs K times the time."
        )
        self.samples_spin = QSpinBox()
        self.samples_spin.setRange(2, 32)
        self.samples_spin.setValue(4)
        self.samples_spin.setPrefix("K = ")
        self.samples_spin.setEnabled(False)
        self.uncertainty_check.toggled.connect(self.samples_spin.setEnabled)
        row = QHBoxLayout()
        row.addWidget(self.uncertainty_check)
        row.addWidget(self.samples_spin)
        form.addRow(row)

        self.device_combo = QComboBox()
        self.device_label = QLabel()
        self.device_label.setStyleSheet("color: gray;")
        for name in DEVICES:
            self.device_combo.addItem(name, name)
            reason = self._device_unavailable(name)
            if reason:
                item = self.device_combo.model().item(self.device_combo.count() - 1)
                item.setEnabled(False)
                item.setToolTip(reason)
        self.device_combo.currentIndexChanged.connect(self._update_device_label)
        row = QHBoxLayout()
        row.addWidget(self.device_combo)
        row.addWidget(self.device_label, 1)
        form.addRow("Device", row)

        self.plane_check = QCheckBox("Current plane only (follows the slider)")
        self.plane_check.setToolTip(
            "Stain only the plane on screen; moving the dims slider re-stains the new plane."
        )
        form.addRow(self.plane_check)

        self.truth_combo = LayerCombo(
            self.viewer,
            allow_none=True,
            default=lambda: default_truth(self.viewer.layers, self.layer_combo.layer()),
        )
        self.truth_combo.setToolTip("Measured DAPI of the same field: shows metrics per model.")
        form.addRow("Ground-truth DAPI", self.truth_combo)

        advanced = QWidget()
        adv = QFormLayout(advanced)
        adv.setContentsMargins(0, 0, 0, 0)
        self.tile_spin = QSpinBox()
        self.tile_spin.setRange(64, 4096)
        self.tile_spin.setSingleStep(64)
        self.tile_spin.setValue(1024)
        self.tile_spin.setSuffix(" px")
        self.tile_spin.setToolTip("Tile side; smaller tiles use less memory.")
        adv.addRow("Tile", self.tile_spin)
        self.overlap_spin = QSpinBox()
        self.overlap_spin.setRange(0, 512)
        self.overlap_spin.setSingleStep(8)
        self.overlap_spin.setValue(32)
        self.overlap_spin.setSuffix(" px")
        self.overlap_spin.setToolTip("Overlap between tiles, blended smoothly (no seams).")
        adv.addRow("Overlap", self.overlap_spin)
        self.pixel_spin = QDoubleSpinBox()
        self.pixel_spin.setRange(0.0, 100.0)
        self.pixel_spin.setDecimals(4)
        self.pixel_spin.setSingleStep(0.01)
        self.pixel_spin.setSpecialValueText("auto")
        self.pixel_spin.setSuffix(" µm/px")
        self.pixel_spin.setToolTip(
            "Pixel size of the qOBM image. 'auto' uses the layer's µm scale or metadata, else "
            "assumes the model's training pixel size."
        )
        adv.addRow("Pixel size", self.pixel_spin)
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        self.seed_spin.setToolTip("Noise seed: same seed and device give the same output.")
        adv.addRow("Seed", self.seed_spin)
        self.advanced = QCollapsible("Advanced")
        self.advanced.addWidget(advanced)

        self.stain_button = QPushButton("Stain layer")
        self.stain_button.setToolTip("Run the virtual stain (in the background).")
        self.stain_button.clicked.connect(lambda: self.run())
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons = QHBoxLayout()
        buttons.addWidget(self.stain_button, 2)
        buttons.addWidget(self.cancel_button, 1)

        self.status = QLabel("Ready.")
        self.status.setWordWrap(True)

        self.grid_button = QPushButton("Side by side")
        self.grid_button.setCheckable(True)
        self.grid_button.setToolTip(
            "qOBM | model | Pix2Pix | ground truth in napari's grid (one shared camera)."
        )
        self.grid_button.toggled.connect(self.set_side_by_side)

        self.metrics_table = QTableWidget(0, len(_jobs.METRIC_KEYS))
        self.metrics_table.setHorizontalHeaderLabels(
            ["Pearson", "SSIM", "Recall", "Precision", "F1"]
        )
        self.metrics_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.metrics_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.metrics_table.setToolTip(
            "Against the ground-truth DAPI: pixel Pearson/SSIM, and nuclei recall/precision/F1 "
            "(Hungarian matching at IoU >= 0.5)."
        )
        self.metrics_table.setVisible(False)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.advanced)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        layout.addWidget(self.grid_button)
        layout.addWidget(self.metrics_table)
        layout.addStretch(1)

        self.layer_combo.layerChanged.connect(self._on_source_changed)
        self.model_combo.currentIndexChanged.connect(self._update_steps_enabled)
        self._update_device_label()
        self._on_source_changed(self.layer_combo.layer())

    def _connect_viewer(self) -> None:
        layers = self.viewer.layers
        for ev in (layers.events.inserted, layers.events.removed, layers.events.moved):
            ev.connect(self._on_layers_changed)
        for ly in layers:
            ly.events.name.connect(self._on_layers_changed)
        layers.events.inserted.connect(self._on_layer_inserted)
        self.viewer.dims.events.current_step.connect(self._on_dims_step)
        self._plane_timer = QTimer(self)
        self._plane_timer.setSingleShot(True)
        self._plane_timer.setInterval(150)
        self._plane_timer.timeout.connect(self._restain_plane)

    # ------------------------------------------------------------------ state helpers
    def _active_layer(self) -> Layer | None:
        return self.viewer.layers.selection.active

    @staticmethod
    def _device_unavailable(name: str) -> str | None:
        try:
            from napari_lcm_stain.device import resolve_device

            resolve_device(name)
        except ImportError:
            return None
        except (ValueError, RuntimeError) as exc:
            return str(exc)
        return None

    def _update_device_label(self, *_args: Any) -> None:
        name = self.device_combo.currentData()
        try:
            from napari_lcm_stain.device import describe, resolve_device

            self.device_label.setText(f"→ {describe(resolve_device(name))}")
        except Exception as exc:  # noqa: BLE001 - shown, not raised
            self.device_label.setText(f"unavailable: {exc}")

    def _update_steps_enabled(self, *_args: Any) -> None:
        choice = self.model_combo.currentData()
        self.steps_spin.setEnabled(isinstance(choice, ModelChoice) and choice.uses_steps)

    def _on_layer_inserted(self, event: Any) -> None:
        event.value.events.name.connect(self._on_layers_changed)

    def _on_layers_changed(self, *_args: Any) -> None:
        self.layer_combo.refresh()
        self.truth_combo.refresh()
        self._update_layer_note()

    def _update_layer_note(self) -> None:
        text = self.layer_combo.explain()
        if not self.viewer.layers or self.layer_combo.count() == 0:
            text = (
                "No single-channel image layer yet: open a qOBM image, or File > Open Sample > "
                "LCM Virtual Stain." + (f"\nNot offered:\n{text}" if text else "")
            )
        elif text:
            text = f"Not offered:\n{text}"
        self.layer_note.setText(text)
        self.layer_note.setVisible(bool(text))

    def _on_source_changed(self, layer: Layer | None) -> None:
        self.plane_check.setEnabled(layer is not None and layer.ndim > 2)
        known = layer_pixel_size(layer) if layer is not None else None
        self.pixel_spin.setSpecialValueText(
            f"auto ({known:.4g} µm/px from the layer)" if known else "auto (model's pixel size)"
        )
        self.truth_combo.refresh()
        self._update_layer_note()

    def _on_model_activated(self, index: int) -> None:
        if self.model_combo.itemData(index) == _BROWSE:
            path, _ = QFileDialog.getOpenFileName(
                self, "Open a stain checkpoint", "", "Checkpoints (*.safetensors);;All files (*)"
            )
            if path:
                self.add_model(Path(path).stem, path)
            else:
                self.model_combo.setCurrentIndex(self._model_index)
            return
        self._model_index = index

    def add_model(self, label: str, model: Any, *, uses_steps: bool = True) -> int:
        """Offer a model (checkpoint path or loaded Predictor) in the menu, select it, return index.

        Used by the checkpoint browser and by the Fine-tune dock's "Use in Stain widget".
        """
        for i in range(self.model_combo.count()):
            choice = self.model_combo.itemData(i)
            if isinstance(choice, ModelChoice) and choice.label == label:
                self.model_combo.removeItem(i)
                break
        index = self.model_combo.count() - 1  # before "Checkpoint file…"
        self.model_combo.insertItem(index, label, ModelChoice(label, model, uses_steps))
        self.model_combo.setCurrentIndex(index)
        self._model_index = index
        return index

    def model_choice(self) -> ModelChoice:
        choice = self.model_combo.currentData()
        return choice if isinstance(choice, ModelChoice) else ModelChoice("LCM", "lcm")

    @property
    def is_running(self) -> bool:
        return self._job.get("worker") is not None

    def _pixel_size(self, layer: Layer) -> float | None:
        value = self.pixel_spin.value()
        return float(value) if value > 0 else layer_pixel_size(layer)

    # ------------------------------------------------------------------ running
    def run(self, plane_only: bool | None = None) -> Any:
        """Start staining the chosen layer; returns the worker (None if nothing was started)."""
        if self.is_running:
            show_info("A staining run is already going; cancel it first.")
            return None
        source = self.layer_combo.layer()
        if source is None:
            self._fail(
                "No qOBM layer to stain: add a single-channel image layer "
                "(or File > Open Sample > LCM Virtual Stain)."
            )
            return None
        if plane_only is None:
            plane_only = self.plane_check.isChecked()
        data = base_data(source)
        plane: tuple[int, ...] = ()
        image = data  # lazy (dask/zarr) data stays lazy: the worker reads it, not the UI thread
        if plane_only and source.ndim > 2:
            plane = current_plane(self.viewer, source)
            image = data[plane]
        if isinstance(image, np.ndarray):
            image = image.view()
            image.flags.writeable = False  # the input layer is never modified, by construction

        choice = self.model_choice()
        steps = self.steps_spin.value() if choice.uses_steps else None
        samples = self.samples_spin.value() if self.uncertainty_check.isChecked() else 1
        jobs = [_jobs.StainJob(ROLE_STAIN, choice.label, choice.model, steps, samples)]
        if self.pix2pix_check.isChecked():
            jobs.append(_jobs.StainJob(ROLE_PIX2PIX, "Pix2Pix", self.baseline_model, None, 1))

        truth, labels = self._truth_for(source, data.shape, plane)
        self._run_info = {
            "source": source.name,
            "scale": tuple(source.scale),
            "translate": tuple(source.translate),
            "units": tuple(source.units) if getattr(source, "units", None) else None,
            "plane": plane,
        }
        self._follow = source.name if plane_only and source.ndim > 2 else None
        self._running_plane = plane if self._follow else None
        worker = create_worker(
            _jobs.stain_job,
            image,
            jobs,
            tile=self.tile_spin.value(),
            overlap=self.overlap_spin.value(),
            device=self.device_combo.currentData(),
            seed=self.seed_spin.value(),
            pixel_size=self._pixel_size(source),
            truth=truth,
            truth_labels=labels,
            cache=self._cache,
            _start_thread=False,
        )
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_returned)
        worker.aborted.connect(self._on_aborted)
        worker.finished.connect(self._on_finished)
        self._job["worker"] = worker
        self._cancelled = False
        self.last_error = None
        where = f" plane {', '.join(map(str, plane))}" if plane else ""
        self._pbar = progress(total=0, desc=f"Staining '{source.name}'{where}")
        self.status.setText(f"Staining '{source.name}'{where}…")
        self._set_busy(True)
        worker.start()
        return worker

    def _truth_for(
        self, source: Layer, shape: tuple[int, ...], plane: tuple[int, ...]
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        gt = self.truth_combo.layer()
        if gt is None or same_layer(gt, source):
            return None, None
        gt_data = base_data(gt)
        if tuple(gt_data.shape) != tuple(shape):
            show_warning(
                f"Ground-truth DAPI '{gt.name}' has shape {tuple(gt_data.shape)} but the qOBM "
                f"layer has {tuple(shape)}; metrics skipped. Pick a DAPI layer of the same field."
            )
            return None, None
        truth = gt_data[plane] if plane else gt_data  # read per plane in the worker
        lab_layer = matching_labels(self.viewer.layers, tuple(shape))
        labels = None
        if lab_layer is not None:
            labels = lab_layer.data[plane] if plane else lab_layer.data
        return truth, labels

    def cancel(self) -> None:
        """Stop the running worker after its current tile; nothing is added to the viewer."""
        worker = self._job.get("worker")
        if worker is None:
            return
        self._cancelled = True
        self._restart_plane = False
        self.status.setText("Cancelling after the current tile…")
        self.cancel_button.setEnabled(False)
        worker.quit()

    def _set_busy(self, busy: bool) -> None:
        self.stain_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)

    def _on_progress(self, tick: _jobs.Progress) -> None:
        pbar = self._pbar  # local: progress events may process Qt events (re-entrancy)
        if pbar is None:
            return
        if not self._cancelled:  # before the bar: its events may deliver the final "Done" text
            done = f" {tick.done}/{tick.total} tiles" if tick.total else ""
            self.status.setText(f"{tick.label}…{done}")
        if tick.total and pbar.total != tick.total:
            pbar.total = tick.total
        pbar.set_description(tick.label)
        pbar.update(max(0, tick.done - pbar.n))

    def _on_returned(self, outcome: Any) -> None:
        if self._cancelled or self._job.get("closing"):
            return
        if isinstance(outcome, _jobs.JobFailure):
            self._fail(f"Staining failed: {outcome.message}")
            return
        if not isinstance(outcome, _jobs.StainOutcome):
            self._fail("Staining stopped without a result (see the log for details).")
            return
        info = self._run_info
        order = {ROLE_PIX2PIX: 0, ROLE_UNCERTAINTY: 1, ROLE_STAIN: 2}  # main output ends on top
        for role, label, data in sorted(outcome.outputs, key=lambda o: order.get(o[0], 3)):
            upsert_output(
                self.viewer,
                data,
                source=info["source"],
                role=role,
                label=label,
                scale=info["scale"],
                translate=info["translate"],
                units=info["units"],
                plane=info["plane"],
            )
        self.last_outcome = outcome
        self._shown_plane = info["plane"] if self._follow else None
        self._show_metrics(outcome.metrics)
        devices = ", ".join(outcome.devices) or "?"
        text = f"Done: {len(outcome.outputs)} layer(s) in {outcome.seconds:.1f} s on {devices}."
        if outcome.notes:
            text += "\nNote: " + "; ".join(outcome.notes)
        self.status.setText(text)
        if outcome.ood is not None:  # a note, never a block: the layers are already there
            show_warning(f"'{info['source']}': {outcome.ood['note']}")
        if self.grid_button.isChecked():
            self._apply_grid()

    def _on_aborted(self) -> None:
        if not self._job.get("closing"):
            self.status.setText("Cancelled; no layer was changed.")

    def _on_finished(self) -> None:
        self._job.pop("worker", None)
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        if self._job.get("closing"):
            return
        self._set_busy(False)
        if self._restart_plane:
            self._restart_plane = False
            self._restain_plane()

    def _fail(self, message: str) -> None:
        self.last_error = message
        self.status.setText(message)
        show_error(message)

    # ------------------------------------------------------------------ current plane only
    def _followed_source(self) -> Layer | None:
        source = self.layer_combo.layer()
        if (
            self._follow is None
            or not self.plane_check.isChecked()
            or source is None
            or source.name != self._follow
        ):
            return None
        return source

    def _on_dims_step(self, *_args: Any) -> None:
        if self._followed_source() is not None:
            self._plane_timer.start()  # debounced: dragging the slider starts one run, not many

    def _restain_plane(self) -> None:
        source = self._followed_source()
        if source is None:
            return
        plane = current_plane(self.viewer, source)
        if self.is_running:
            if plane != self._running_plane:
                # a newer plane is wanted: drop the running one, start again once it has stopped
                self._restart_plane = True
                self._cancelled = True
                self._job["worker"].quit()
            return
        if plane != self._shown_plane:
            self.run(plane_only=True)

    # ------------------------------------------------------------------ metrics
    def _show_metrics(self, metrics: dict[str, dict[str, float]]) -> None:
        table = self.metrics_table
        table.setRowCount(len(metrics))
        table.setVerticalHeaderLabels(list(metrics))
        for r, values in enumerate(metrics.values()):
            for c, key in enumerate(_jobs.METRIC_KEYS):
                v = values.get(key)
                text = "–" if v is None or not math.isfinite(v) else f"{v:.3f}"
                item = QTableWidgetItem(text)
                item.setTextAlignment(Qt.AlignmentFlag.AlignCenter)
                table.setItem(r, c, item)
        table.setVisible(bool(metrics))
        if metrics:
            fit_table_height(table)

    # ------------------------------------------------------------------ side by side
    def comparison_layers(self) -> list[Layer]:
        """qOBM | main output | Pix2Pix | ground truth | uncertainty, those that exist."""
        source = self.layer_combo.layer()
        if source is None:
            return []
        label = self.model_choice().label
        found = [
            find_output(self.viewer.layers, source.name, ROLE_STAIN, label),
            find_output(self.viewer.layers, source.name, ROLE_PIX2PIX, "Pix2Pix"),
            self.truth_combo.layer(),
            find_output(self.viewer.layers, source.name, ROLE_UNCERTAINTY, label),
        ]
        out = [source]
        for ly in found:
            if ly is not None and not any(same_layer(ly, o) for o in out):
                out.append(ly)
        return out

    def set_side_by_side(self, on: bool) -> None:
        """Show the comparison in napari's grid mode (one camera, so pan/zoom are linked)."""
        if self.grid_button.isChecked() != on:
            self.grid_button.setChecked(on)  # re-enters through the toggled signal
            return
        if on:
            source = self.layer_combo.layer()
            label = self.model_choice().label
            if (
                source is None
                or find_output(self.viewer.layers, source.name, ROLE_STAIN, label) is None
            ):
                show_info("Stain the layer first: side by side needs its DAPI output.")
                self.grid_button.setChecked(False)
                return
            grid = _grid(self.viewer)
            self._grid_saved = {
                "grid": (grid.enabled, tuple(grid.shape), grid.stride),
                "visible": {ly.name: ly.visible for ly in self.viewer.layers},
                "order": [ly.name for ly in self.viewer.layers],
                "overlay": {},
            }
            self._apply_grid()
        else:
            self._restore_grid()

    def _apply_grid(self) -> None:
        chosen = self.comparison_layers()
        saved = self._grid_saved if self._grid_saved is not None else {"overlay": {}}
        layers = self.viewer.layers
        for ly in chosen:  # move to the top in order: index order = grid order, left to right
            layers.move(layers.index(ly), len(layers))
        for ly in layers:
            ly.visible = any(same_layer(ly, c) for c in chosen)
        for ly in chosen:
            saved["overlay"].setdefault(ly.name, ly.name_overlay.visible)
            ly.name_overlay.visible = True
        truth = self.truth_combo.layer()
        if truth is not None and any(same_layer(truth, c) for c in chosen):
            # the measured DAPI in the outputs' colormap (its own contrast): compare data, not LUTs
            saved.setdefault("colormap", {}).setdefault(truth.name, truth.colormap)
            truth.colormap = DAPI_COLORMAP
        n = len(chosen)
        grid = _grid(self.viewer)
        grid.stride = 1
        grid.shape = (1, n) if n <= 3 else (2, math.ceil(n / 2))  # 4 -> 2x2 fills the canvas
        grid.enabled = True
        self.viewer.reset_view()

    def _restore_grid(self) -> None:
        saved, self._grid_saved = self._grid_saved, None
        if saved is None:
            return
        enabled, shape, stride = saved["grid"]
        grid = _grid(self.viewer)
        grid.stride, grid.shape, grid.enabled = stride, shape, enabled
        _restore_order(self.viewer.layers, saved["order"])
        for ly in self.viewer.layers:
            if ly.name in saved["visible"]:
                ly.visible = saved["visible"][ly.name]
            if ly.name in saved["overlay"]:
                ly.name_overlay.visible = saved["overlay"][ly.name]
            if ly.name in saved.get("colormap", {}):
                ly.colormap = saved["colormap"][ly.name]
        self.viewer.reset_view()
