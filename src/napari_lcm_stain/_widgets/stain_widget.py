"""The "Virtual stain" dock: qOBM layer in, virtual DAPI layers out.

All computation runs in a napari ``thread_worker`` (`_jobs.stain_job`); this file only reads the
controls, starts/cancels the worker and turns its result into layers. Cancelling drops the result
before any layer is made, so a cancelled or failed run never leaves a half-made layer. *Live*
(frames as they arrive) and *Watch folder…* are driven by `_live.LiveStain` / `_live.FolderWatch`;
side by side by `_grid.SideBySide`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from napari.layers import Layer
from napari.utils.notifications import show_info, show_warning
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QComboBox, QFileDialog, QFormLayout, QWidget
from superqt import QCollapsible

from . import _base as ui
from . import _jobs
from ._base import BROWSE, DEVICES, DockBase
from ._grid import SideBySide
from ._layers import (
    ROLE_PIX2PIX,
    ROLE_STAIN,
    ROLE_UNCERTAINTY,
    base_data,
    current_plane,
    default_truth,
    find_output,
    layer_pixel_size,
    matching_labels,
    same_layer,
    upsert_output,
)
from ._live import FolderWatch, LiveStain
from ._qt_helpers import LayerCombo, fit_table_height

#: The Guidance box's tooltip (the model's range, default and cost are added to it).
GUIDANCE_TIP = "Lower: faithful and soft; higher: crisper, bolder nuclei."
GUIDANCE_COST = {
    "embedding": "it is an input to the network: no extra time",
    "cfg": "classifier-free: two passes of the network, about twice its time",
}


@dataclass(frozen=True)
class ModelChoice:
    """An entry of the model menu: the label used in layer names and what the engine gets."""

    label: str
    model: Any  # "lcm" | "teacher" | checkpoint path | loaded Predictor
    uses_steps: bool = True


class StainWidget(DockBase):
    """Dock that stains a qOBM layer with the packaged LCM (and Pix2Pix for comparison)."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        self._cache: dict = {}  # loaded predictors, reused across runs
        # layer name -> µm/px the engine estimated for it (layers without a µm scale)
        self._px_estimates: dict[str, float] = {}
        self._grid = SideBySide(self.viewer)
        # "current plane only": the source being followed, the plane shown, the plane running
        self._follow: str | None = None
        self._shown_plane: tuple[int, ...] | None = None
        self._running_plane: tuple[int, ...] | None = None
        self._restart_plane = False
        self._cancelled = False
        self.last_outcome: _jobs.StainOutcome | None = None
        #: what "Compare with Pix2Pix" runs: the packaged baseline, or a Pix2Pix checkpoint path
        self.baseline_model: Any = "pix2pix"
        self._build()
        self._connect_viewer()

    # ------------------------------------------------------------------ UI
    def _build(self) -> None:
        form = ui.form_layout()
        self.layer_combo = self.qobm_picker(
            "Single-channel qOBM phase image to stain. Follows the layer selected in the layer "
            "list until you pick one here.",
            follow_selection=True,
        )
        form.addRow("qOBM layer", self.layer_combo)
        self.layer_note = ui.note_label()
        form.addRow(self.layer_note)

        self.model_combo = QComboBox()
        self.model_combo.addItem("LCM (packaged, 1-4 steps)", ModelChoice("LCM", "lcm"))
        self.model_combo.addItem(
            "Teacher (packaged, slow DDIM)", ModelChoice("Teacher", "teacher", uses_steps=False)
        )
        self.model_combo.addItem("Checkpoint file…", BROWSE)
        self.model_combo.setToolTip("Model for the main output; checkpoints are *.safetensors.")
        self._model_index = 0
        self.model_combo.activated.connect(self._on_model_activated)
        form.addRow("Model", self.model_combo)

        self.steps_spin = ui.spin_box(
            1, 4, 1, tip="LCM sampling steps: 1 is fastest; 2-4 refine details."
        )
        form.addRow("Steps", self.steps_spin)

        self.texture_check = ui.check_box(
            "Texture (grain)",
            "Draw the stain with DAPI-like grain (the shot noise of a measured DAPI image), to "
            "compare it by eye with real DAPI. Off (the default) gives the smooth mean, better "
            "for segmenting, counting and measuring: the grain adds no information. Only models "
            "with a texture decoder have any grain; Pix2Pix ignores it. The layer's provenance "
            "records whether grain was drawn.",
            checked=False,
        )
        form.addRow(self.texture_check)

        self.guidance_spin = ui.float_box(1.0, 1.0, 1.0, step=0.1, tip=GUIDANCE_TIP)
        self.guidance_spin.setEnabled(False)
        form.addRow("Guidance", self.guidance_spin)

        self.pix2pix_check = ui.check_box(
            "Compare with Pix2Pix", "Also run the packaged Pix2Pix baseline.", checked=True
        )
        form.addRow(self.pix2pix_check)

        self.uncertainty_check = ui.check_box(
            "Uncertainty (K samples)",
            "Run the model K times with different noise: the DAPI layer becomes their mean and an "
            "extra layer shows their standard deviation. Costs K times the time.",
        )
        self.samples_spin = ui.spin_box(2, 32, 4)
        self.samples_spin.setPrefix("K = ")
        self.samples_spin.setEnabled(False)
        self.uncertainty_check.toggled.connect(self.samples_spin.setEnabled)
        form.addRow(ui.row(self.uncertainty_check, self.samples_spin))

        self.device_combo = QComboBox()
        self.device_label = ui.note_label()
        for name in DEVICES:
            self.device_combo.addItem(name, name)
            reason = self._device_unavailable(name)
            if reason:
                item = self.device_combo.model().item(self.device_combo.count() - 1)
                item.setEnabled(False)
                item.setToolTip(reason)
        self.device_combo.currentIndexChanged.connect(self._update_device_label)
        form.addRow("Device", ui.row(self.device_combo, (self.device_label, 1)))

        self.plane_check = ui.check_box(
            "Current plane only (follows the slider)",
            "Stain only the plane on screen; moving the dims slider re-stains the new plane.",
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
        self.tile_spin = ui.spin_box(
            64, 4096, 1024, step=64, suffix=" px", tip="Tile side; smaller tiles use less memory."
        )
        adv.addRow("Tile", self.tile_spin)
        self.overlap_spin = ui.spin_box(
            0,
            512,
            32,
            step=8,
            suffix=" px",
            tip="Overlap between tiles, blended smoothly (no seams).",
        )
        adv.addRow("Overlap", self.overlap_spin)
        self.pixel_spin = ui.float_box(
            0.0,
            100.0,
            0.0,
            step=0.01,
            decimals=4,
            tip="Pixel size of the qOBM image. 'auto' uses the layer's µm scale or metadata, else "
            "estimates it from the image (shown here after staining); type a value to override.",
        )
        self.pixel_spin.setSpecialValueText("auto")
        self.pixel_spin.setSuffix(" µm/px")
        adv.addRow("Pixel size", self.pixel_spin)
        self.seed_spin = ui.spin_box(
            0, 2**31 - 1, 0, tip="Noise seed: same seed and device give the same output."
        )
        adv.addRow("Seed", self.seed_spin)
        self.advanced = QCollapsible("Advanced")
        self.advanced.addWidget(advanced)

        self.stain_button = ui.button(
            "Stain layer", self.run, tip="Run the virtual stain (in the background)."
        )
        self.cancel_button = ui.button("Cancel", self.cancel, enabled=False)
        self.live_button = ui.button(
            "Live",
            lambda: None,
            tip="Stain each new frame of the qOBM layer as it arrives (frames appended along its "
            "first axis, or its data replaced), in the background with the model and settings "
            "above. When staining falls behind it jumps to the newest frame.",
        )
        self.live_button.setCheckable(True)
        self.live_button.toggled.connect(self.set_live)
        self.live_label = ui.note_label()
        self.live: LiveStain | None = None
        self.watch_button = ui.button(
            "Watch folder…",
            lambda: None,
            tip="Stain each new TIFF written into a folder, as `lcm-stain watch` does: pick the "
            "folder, then where the stained files go. The newest result is shown as a layer.",
        )
        self.watch_button.setCheckable(True)
        self.watch_button.toggled.connect(self._on_watch_toggled)
        self.folder_watch: FolderWatch | None = None
        self.status.setText("Ready.")

        self.grid_button = ui.button(
            "Side by side",
            lambda: None,
            tip="qOBM | model | Pix2Pix | ground truth in napari's grid (one shared camera).",
        )
        self.grid_button.setCheckable(True)
        self.grid_button.toggled.connect(self.set_side_by_side)

        self.metrics_table = ui.metrics_table(
            ["Pearson", "SSIM", "Recall", "Precision", "F1"],
            "Against the ground-truth DAPI: pixel Pearson/SSIM, and nuclei recall/precision/F1 "
            "(Hungarian matching at IoU >= 0.5).",
        )

        ui.stack(
            self,
            form,
            self.advanced,
            ui.row((self.stain_button, 2), (self.cancel_button, 1)),
            ui.row(self.live_button, self.watch_button, (self.live_label, 1)),
            self.status,
            self.grid_button,
            self.metrics_table,
        )

        self.layer_combo.layerChanged.connect(self._on_source_changed)
        self.model_combo.currentIndexChanged.connect(self._update_steps_enabled)
        self.model_combo.currentIndexChanged.connect(self._update_guidance)
        self._update_guidance()
        self._update_device_label()
        self._on_source_changed(self.layer_combo.layer())

    def _connect_viewer(self) -> None:
        self.watch_layers()
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

    def _update_guidance(self, *_args: Any) -> None:
        """The Guidance box follows the selected model: its trained range and default (read
        from the checkpoint's config, no weights loaded), or disabled at 1 for a model without
        a guidance control (the packaged models today, Pix2Pix)."""
        from napari_lcm_stain._params import guidance_method, guidance_range, model_config

        config = model_config(self.model_choice().model)
        accepted = guidance_range(config)
        box = self.guidance_spin
        box.blockSignals(True)
        self._guidance_default = None if accepted is None else round(accepted["default"], 6)
        if accepted is None:
            box.setRange(1.0, 1.0)
            box.setValue(1.0)
            box.setToolTip(f"{GUIDANCE_TIP}\nThis model has no guidance control.")
        else:
            lo, hi, default = accepted["min"], accepted["max"], accepted["default"]
            box.setRange(lo, hi)
            box.setValue(default)
            cost = GUIDANCE_COST[guidance_method(config)]
            box.setToolTip(
                f"{GUIDANCE_TIP}\nThis model: {lo:g}-{hi:g}, default {default:g}; {cost}."
            )
        box.blockSignals(False)
        box.setEnabled(accepted is not None)

    def guidance(self) -> float | None:
        """The Guidance box's value, or None (the model's default) while it is disabled or at
        that default: the engine then applies the model's own default, and the layer's
        provenance records the value used either way."""
        if not self.guidance_spin.isEnabled():
            return None
        value = round(float(self.guidance_spin.value()), 6)
        return None if value == self._guidance_default else value

    def layer_combos(self) -> list[LayerCombo]:
        return [self.layer_combo, self.truth_combo]

    def layers_refreshed(self) -> None:
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
        est = self._px_estimates.get(layer.name) if layer is not None else None
        if known:
            text = f"auto ({known:.4g} µm/px from the layer)"
        elif est:
            text = f"auto (≈{est:.3g} µm/px, estimated from the image)"
        else:
            text = "auto (estimated from the image)"
        self.pixel_spin.setSpecialValueText(text)
        self.truth_combo.refresh()
        self._update_layer_note()

    def _on_model_activated(self, index: int) -> None:
        if self.model_combo.itemData(index) == BROWSE:
            path = self.browse_checkpoint("Open a stain checkpoint")
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
        self._update_guidance()  # also when a checkpoint replaced one of the same label
        return index

    def model_choice(self) -> ModelChoice:
        choice = self.model_combo.currentData()
        return choice if isinstance(choice, ModelChoice) else ModelChoice("LCM", "lcm")

    def _pixel_size(self, layer: Layer) -> float | str:
        """The box's value, else the layer's µm scale, else this layer's estimate from an earlier
        run (live frames reuse it), else "auto": the engine estimates it from the image."""
        value = self.pixel_spin.value()
        if value > 0:
            return float(value)
        return layer_pixel_size(layer) or self._px_estimates.get(layer.name) or "auto"

    # ------------------------------------------------------------------ running
    def _source_to_stain(self) -> Layer | None:
        """The qOBM layer, or None (with a message) when nothing can start now."""
        if self.is_running:
            show_info("A staining run is already going; cancel it first.")
            return None
        source = self.layer_combo.layer()
        if source is None:
            self._fail(
                "No qOBM layer to stain: add a single-channel image layer "
                "(or File > Open Sample > LCM Virtual Stain)."
            )
        return source

    def _pixel_size_source(self, source: Layer | None) -> str:
        """Where the pixel size comes from, for the engine's message when it is implausible."""
        if self.pixel_spin.value() > 0 or source is None:
            return "the dock's Pixel size box"
        return f"the layer scale of '{source.name}'"

    def _engine_settings(self, source: Layer | None) -> dict[str, Any]:
        pixel_size = self.pixel_spin.value() or None
        return {
            "tile": self.tile_spin.value(),
            "overlap": self.overlap_spin.value(),
            "device": self.device_combo.currentData(),
            "seed": self.seed_spin.value(),
            "pixel_size": self._pixel_size(source) if source is not None else pixel_size,
            "pixel_size_source": self._pixel_size_source(source),
            "texture": self.texture_check.isChecked(),
            "cache": self._cache,
        }

    def _live_settings(self, source: Layer | None) -> dict[str, Any]:
        """Model, steps and engine settings of live staining (one model, no extras). A layer
        with no known pixel size is stained at the model's (or an earlier run's estimate):
        estimating it on every frame would cost latency and could differ between frames."""
        choice = self.model_choice()
        steps = self.steps_spin.value() if choice.uses_steps else None
        settings = {"model": choice.model, "steps": steps, **self._engine_settings(source)}
        settings["guidance"] = self.guidance()
        if settings["pixel_size"] == "auto":
            settings["pixel_size"] = None
        return settings

    def run(self, plane_only: bool | None = None) -> Any:
        """Start staining the chosen layer; returns the worker (None if nothing was started)."""
        source = self._source_to_stain()
        if source is None:
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
        guidance = self.guidance()
        jobs = [_jobs.StainJob(ROLE_STAIN, choice.label, choice.model, steps, samples, guidance)]
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
        where = f" plane {', '.join(map(str, plane))}" if plane else ""
        worker = self.start_worker(
            _jobs.stain_job,
            image,
            jobs,
            desc=f"Staining '{source.name}'{where}",
            on_yield=self._on_progress,
            on_return=self._on_returned,
            on_abort=self._on_aborted,
            truth=truth,
            truth_labels=labels,
            source=source.name,
            **self._engine_settings(source),
        )
        self._cancelled = False
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
        if self.live_button.isChecked():
            self.live_button.setChecked(False)  # stops live staining
            return
        if self.watch_button.isChecked():
            self.stop_watch()
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
        if not self._cancelled:  # before the bar: its events may deliver the final "Done" text
            done = f" {tick.done}/{tick.total} tiles" if tick.total else ""
            self.status.setText(f"{tick.label}…{done}")
        self.advance(tick.done, tick.total, tick.label)

    def _on_returned(self, outcome: Any) -> None:
        if self._cancelled or self.job_failed(outcome, "Staining"):
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
                provenance=outcome.provenance.get((role, label)),
            )
        self.last_outcome = outcome
        if outcome.pixel_size_estimated:  # shown in the Pixel size box; typing a value overrides
            self._px_estimates[info["source"]] = outcome.pixel_size_estimated
            self._on_source_changed(self.layer_combo.layer())
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
            self._grid.apply(self.comparison_layers(), self.truth_combo.layer())

    def _on_aborted(self) -> None:
        if not self.closing:
            self.status.setText("Cancelled; no layer was changed.")

    def worker_done(self) -> None:
        self._set_busy(False)
        for toggle in (self.live_button, self.watch_button):  # a live run ended by itself
            toggle.blockSignals(True)
            toggle.setChecked(False)
            toggle.blockSignals(False)
        if self.live is not None and self.live.source is not None:
            self.live.source = None
            if not self.last_error:
                self.status.setText(f"Live staining stopped. {self.live.summary()}")
        if self._restart_plane:
            self._restart_plane = False
            self._restain_plane()

    # ------------------------------------------------------------------ live staining
    def set_live(self, on: bool) -> Any:
        """Start (returns the worker) or stop live staining of the qOBM layer (see `_live`)."""
        if self.live_button.isChecked() != on:
            self.live_button.setChecked(on)  # re-enters through the toggled signal
            return self._job.get("worker") if on and self.live is not None else None
        if not on:
            if self.live is not None and self.is_running:
                self.status.setText("Stopping live staining after the current frame…")
                self.live.stop()
            return None
        source = self._source_to_stain()
        if source is None:
            self.live_button.blockSignals(True)
            self.live_button.setChecked(False)
            self.live_button.blockSignals(False)
            return None
        self.live = LiveStain(self)
        worker = self.live.start(source, self.model_choice().label, **self._live_settings(source))
        self._cancelled = False
        self.status.setText(f"Live: staining each new frame of '{source.name}'…")
        self.live_label.setText(self.live.summary())
        self._set_busy(True)
        worker.start()
        return worker

    # ------------------------------------------------------------------ folder watch
    def _on_watch_toggled(self, on: bool) -> None:
        if not on:
            self.stop_watch()
            return
        folder = QFileDialog.getExistingDirectory(self, "Folder to watch for new TIFF files")
        output = folder and QFileDialog.getExistingDirectory(self, "Folder for the stained files")
        if not folder or not output or self.start_watch(folder, output) is None:
            self.watch_button.blockSignals(True)
            self.watch_button.setChecked(False)
            self.watch_button.blockSignals(False)

    def start_watch(self, folder: str | Path, output: str | Path) -> Any:
        """Stain each new TIFF in ``folder`` into ``output`` (see `watch`); returns the worker."""
        if self.is_running:
            show_info("A staining run is already going; cancel it first.")
            return None
        self.folder_watch = FolderWatch(self)
        settings = self._live_settings(None)
        settings.pop("pixel_size_source")  # files carry their own pixel size (metadata)
        worker = self.folder_watch.start(Path(folder), Path(output), settings)
        self.watch_button.blockSignals(True)
        self.watch_button.setChecked(True)
        self.watch_button.blockSignals(False)
        self.status.setText(f"Watching {folder} for new TIFF files…")
        self._set_busy(True)
        worker.start()
        return worker

    def stop_watch(self) -> None:
        """Stop the folder watch after the file it is staining."""
        if self.folder_watch is not None and self.is_running:
            self.folder_watch.stop.set()
            self.status.setText("Stopping the folder watch…")

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
        shown = ui.show_values(
            table, [[m.get(k) for k in _jobs.METRIC_KEYS] for m in metrics.values()]
        )
        if metrics and not shown:  # a model's row shows even when all its values are '–'
            table.setVisible(True)
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
            self._grid.show(self.comparison_layers(), self.truth_combo.layer())
        else:
            self._grid.restore()
