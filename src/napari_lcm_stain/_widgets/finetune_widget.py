"""The "Fine-tune" dock: adapt the 1-step model to a user's own paired qOBM/DAPI images.

Training data: one layer pair, a list of layer pairs, or a folder of ``NAME_qobm``/``NAME_dapi``
files (found by `finetune.find_pairs` and read by `finetune.read_folder`, as ``lcm-stain
finetune --data`` does). Training runs in a napari ``thread_worker`` (`_jobs.finetune_job` around
`finetune.iter_finetune`); each validation event's metrics fill the table live, beside the loss
plot. Stop sets a `threading.Event` that the trainer checks every step, and the trainer then
returns the best weights so far, so stopping early still gives a usable model.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from napari.layers import Layer
from napari.utils.notifications import show_info
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QLineEdit,
    QListWidget,
    QVBoxLayout,
    QWidget,
)

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
#: The "Training data" choices: (label, key).
SOURCES = (
    ("Layer pair", "layers"),
    ("Several layer pairs", "pairs"),
    ("Folder…", "folder"),
)
PAIR_ARROW = " ↔ "


class FinetuneWidget(DockBase):
    """Dock that fine-tunes the packaged LCM on paired layers, then saves or uses the result."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(napari_viewer, parent)
        self.result: Any = None
        self._n_used = 0
        self._pairs: list[tuple[Layer, Layer]] = []  # "Several layer pairs", in list order
        self._folder: Path | None = None
        self._folder_pairs: list[str] = []  # pair names found in the folder
        self._folder_error: str | None = None
        #: (step, validation metrics) of this run's validation events, in order
        self.live_metrics: list[tuple[int, dict]] = []
        self._build()
        self.watch_layers()

    # ------------------------------------------------------------------ UI
    def _build(self) -> None:
        form = ui.form_layout()
        self.source_combo = QComboBox()
        for label, key in SOURCES:
            self.source_combo.addItem(label, key)
        self.source_combo.setToolTip(
            "Train on one layer pair, on several layer pairs (added to a list), or on a folder "
            "of NAME_qobm / NAME_dapi image files."
        )
        form.addRow("Training data", self.source_combo)
        self.qobm_combo = self.qobm_picker("qOBM phase image of your paired training data.")
        form.addRow("qOBM layer", self.qobm_combo)
        self.dapi_combo = LayerCombo(
            self.viewer, default=lambda: default_dapi(self.viewer.layers, self.qobm_combo.layer())
        )
        self.dapi_combo.setToolTip("Measured DAPI of the same field, pixel-aligned, same shape.")
        form.addRow("Paired DAPI", self.dapi_combo)
        form.addRow(self._build_pair_list())
        form.addRow(self._build_folder_box())

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
        self.status.setText("Choose the training data, then click Start.")
        self.plot = LossPlot()
        self.metrics_table = ui.metrics_table(
            ["before", "now", "best"],
            "Validation metrics: of the starting model, of the latest validation, and of the "
            "weights kept so far (the fine-tuned model once training ends).",
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
        self.source_combo.currentIndexChanged.connect(self._on_source_changed)
        self._on_val_toggled(False)
        self._on_source_changed()

    def _build_pair_list(self) -> QWidget:
        self.pairs_box = QWidget()
        self.pair_list = QListWidget()
        self.pair_list.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.pair_list.setToolTip(
            "The training pairs; with two or more, '(validation)' pairs are held out."
        )
        self.pair_list.setMaximumHeight(110)
        self.add_pair_button = ui.button(
            "Add pair", self.add_pair, tip="Add the qOBM and DAPI layers chosen above as a pair."
        )
        self.remove_pair_button = ui.button(
            "Remove", self.remove_pair, tip="Remove the selected pairs."
        )
        layout = QVBoxLayout(self.pairs_box)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.pair_list)
        layout.addLayout(ui.row((self.add_pair_button, 1), (self.remove_pair_button, 1)))
        return self.pairs_box

    def _build_folder_box(self) -> QWidget:
        self.folder_box = QWidget()
        self.folder_edit = QLineEdit()
        self.folder_edit.setReadOnly(True)
        self.folder_edit.setPlaceholderText("folder of NAME_qobm.tif + NAME_dapi.tif pairs")
        self.browse_folder_button = ui.button("Browse…", self.browse_folder)
        self.folder_note = ui.note_label()
        layout = QVBoxLayout(self.folder_box)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(ui.row((self.folder_edit, 1), self.browse_folder_button))
        layout.addWidget(self.folder_note)
        return self.folder_box

    def training_source(self) -> str:
        """'layers' (one layer pair), 'pairs' (the list of layer pairs) or 'folder'."""
        return self.source_combo.currentData()

    def _on_source_changed(self, *_args: Any) -> None:
        source = self.training_source()
        self.pairs_box.setVisible(source == "pairs")
        self.folder_box.setVisible(source == "folder")
        for combo in (self.qobm_combo, self.dapi_combo):
            combo.setEnabled(source != "folder")
        self._check_pair()

    # ------------------------------------------------------------------ several layer pairs
    def add_pair(self) -> bool:
        """Add the chosen qOBM/DAPI layers to the pair list; False (and a message) if they
        cannot be a pair or a layer is in the list already."""
        q, d = self.qobm_combo.layer(), self.dapi_combo.layer()
        problem = (
            "Pick a qOBM layer and its paired DAPI layer (single-channel images)."
            if q is None or d is None
            else _pairs_problem([*self._pairs, (q, d)])
        )
        if problem:
            self._fail(problem)
            return False
        self._pairs.append((q, d))
        self._show_pairs()
        self._check_pair()
        return True

    def remove_pair(self, row: int | None = None) -> None:
        """Remove pair ``row`` (0-based), or the pairs selected in the list."""
        rows = [row] if row is not None else [i.row() for i in self.pair_list.selectedIndexes()]
        for r in sorted(set(rows), reverse=True):
            if 0 <= r < len(self._pairs):
                del self._pairs[r]
        self._show_pairs()
        self._check_pair()

    def pair_names(self) -> list[str]:
        """The pairs of the list as 'qOBM ↔ DAPI' (the names training reports them by)."""
        return [pair_label(q, d) for q, d in self._pairs]

    def _show_pairs(self) -> None:
        held = _held_out(len(self._pairs))
        self.pair_list.clear()
        for i, name in enumerate(self.pair_names()):
            self.pair_list.addItem(name + (" (validation)" if i in held else ""))

    # ------------------------------------------------------------------ folder
    def browse_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder of qOBM/DAPI pairs")
        if folder:
            self.set_folder(folder)

    def set_folder(self, folder: str | Path) -> list[str]:
        """Use the pairs in ``folder`` (`finetune.find_pairs`); returns their names ([] and a
        message in the dock when there are none or the folder has a problem)."""
        self._folder = Path(folder)
        self.folder_edit.setText(str(self._folder))
        self._scan_folder()
        self._check_pair()
        return list(self._folder_pairs)

    def _scan_folder(self) -> None:
        from napari_lcm_stain.finetune import find_pairs

        self._folder_pairs, self._folder_error = [], None
        if self._folder is None:
            self.folder_note.setText("")
            return
        try:
            self._folder_pairs = [name for name, _q, _d in find_pairs(self._folder)]
        except (OSError, ValueError) as exc:
            self._folder_error = _jobs.failure_message(exc)
        held = [self._folder_pairs[i] for i in _held_out(len(self._folder_pairs))]
        n = len(self._folder_pairs)
        self.folder_note.setText(
            f"{n} pair{'s' if n != 1 else ''}: {', '.join(self._folder_pairs)}"
            + (f"; validation: {', '.join(held)}" if held else "")
            if n
            else ""
        )

    def _on_val_toggled(self, on: bool) -> None:
        self.val_qobm_combo.setEnabled(on)
        self.val_dapi_combo.setEnabled(on)
        self.val_fraction_spin.setEnabled(not on)
        self._check_pair()

    def layer_combos(self) -> list[LayerCombo]:
        return [self.qobm_combo, self.dapi_combo, self.val_qobm_combo, self.val_dapi_combo]

    def layers_refreshed(self) -> None:
        # pairs whose layers were deleted leave the list; renamed layers show their new names
        alive = self.viewer.layers
        self._pairs = [
            p for p in self._pairs if all(any(same_layer(ly, a) for a in alive) for ly in p)
        ]
        self._show_pairs()
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
        source = self.training_source()
        training: list[tuple[Layer, Layer]] = []
        if source == "folder":
            if self._folder is None:
                return "Choose a folder of qOBM/DAPI pairs (NAME_qobm.tif + NAME_dapi.tif) with 'Browse…'."
            if self._folder_error:
                return self._folder_error
        elif source == "pairs":
            if not self._pairs:
                return (
                    "Add qOBM/DAPI pairs to the list: pick both layers above and click 'Add pair'."
                )
            problem = _pairs_problem(self._pairs)
            if problem:
                return problem
            training = self._pairs
        else:
            q, d = self.qobm_combo.layer(), self.dapi_combo.layer()
            if q is None or d is None:
                return "Pick a qOBM layer and its paired DAPI layer (single-channel images)."
            if same_layer(q, d):
                return "The qOBM and DAPI layers are the same layer; pick the measured DAPI."
            problem = _shape_problem(q, d, "qOBM", "DAPI")
            if problem:
                return problem
            training = [(q, d)]
        if self.val_check.isChecked():
            vq, vd = self.val_qobm_combo.layer(), self.val_dapi_combo.layer()
            if vq is None or vd is None:
                return "Pick both validation layers, or untick 'Separate validation pair'."
            problem = _shape_problem(vq, vd, "validation qOBM", "validation DAPI")
            if problem:
                return problem
            for ly in (vq, vd):
                if any(same_layer(ly, t) for pair in training for t in pair):
                    return (
                        f"The validation layer '{ly.name}' is also a training layer; validate on "
                        "another field."
                    )
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
        source = self.training_source()
        if source == "folder":
            self._scan_folder()  # the files may have changed since the folder was chosen
        problem = self.pair_problem()
        if problem:
            self._fail(problem)
            return None
        # lazy (dask/zarr) layers and the folder's files are read in the worker, not here
        data: dict[str, Any] = {}
        if source == "folder":
            qobm = dapi = None
            data["data"] = str(self._folder)
            what = f"{len(self._folder_pairs)} pair(s) from {self._folder.name}"
        elif source == "pairs":
            qobm = [base_data(q) for q, _d in self._pairs]
            dapi = [base_data(d) for _q, d in self._pairs]
            data["names"] = self.pair_names()
            what = f"{len(self._pairs)} layer pair(s)"
        else:
            qobm = base_data(self.qobm_combo.layer())
            dapi = base_data(self.dapi_combo.layer())
            what = "one layer pair"
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
            **data,
        )
        self.result = None
        self.live_metrics = []
        self.plot.clear(steps)
        self.metrics_table.setVisible(False)
        self.metrics_table.setHorizontalHeaderLabels(["before", "now", "best"])
        self.status.setText(f"Fine-tuning on {what}… (first steps include loading the model)")
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
        self.plot.set_best(tick.best_step)
        self.advance(tick.step, tick.total)
        if tick.val_metrics is not None:
            self.live_metrics.append((tick.step, tick.val_metrics))
            self._show_metrics(
                tick.metrics_before, tick.val_metrics, tick.best_metrics,
                headers=["before", f"now\nstep {tick.step}", _best_header(tick.best_step)],
            )  # fmt: skip
        if not self._job.get("stop") or not self._job["stop"].is_set():
            loss = "" if tick.train_loss is None else f", train loss {tick.train_loss:.4g}"
            val = "" if tick.val_loss is None else f", validation {tick.val_loss:.4g}"
            kept = f"step {tick.best_step}" if tick.best_step else "the starting model"
            best = f" · best so far: {kept}" if self.live_metrics else ""
            self.status.setText(f"Step {tick.step}/{tick.total}{loss}{val}{best}")

    def _on_returned(self, result: Any) -> None:
        if self.job_failed(result, "Fine-tuning"):
            return
        if result is None:
            self._fail("Fine-tuning stopped before it produced weights.")
            return
        self.result = result
        best = getattr(result, "best_step", None)
        last = self.live_metrics[-1] if self.live_metrics else (None, None)
        self._show_metrics(
            getattr(result, "metrics_before", {}), last[1], getattr(result, "metrics_after", {}),
            headers=[
                "before",
                f"last\nstep {last[0]}" if last[0] else "last",
                "after" + (f"\nstep {best}" if best is not None else ""),
            ],
        )  # fmt: skip
        self.plot.set_best(best)
        stopped = self._job.get("stop") is not None and self._job["stop"].is_set()
        what = "Stopped" if stopped else "Finished"
        text = f"{what}. Best validation at step {best}." if best is not None else f"{what}."
        validation = (getattr(result, "config", None) or {}).get("finetune", {}).get("validation")
        self.status.setText(text + (f" Validation: {validation}." if validation else ""))
        self.save_button.setEnabled(True)
        self.use_button.setEnabled(True)

    def worker_done(self) -> None:
        self.stop_button.setEnabled(False)
        self._check_pair()

    def _show_metrics(self, *columns: dict | None, headers: list[str]) -> None:
        """Fill the table: one column per metrics dict (None: not known yet)."""
        self.metrics_table.setHorizontalHeaderLabels(headers)
        cols = [c or {} for c in columns]
        ui.show_values(self.metrics_table, [[c.get(k) for c in cols] for k, _ in SHOWN_METRICS])

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


def pair_label(qobm: Layer, dapi: Layer) -> str:
    return f"{qobm.name}{PAIR_ARROW}{dapi.name}"


def _best_header(step: int | None) -> str:
    return "best\nstart" if not step else f"best\nstep {step}"


def _held_out(n: int) -> list[int]:
    """Which of ``n`` pairs the trainer holds out for validation (shown in the dock)."""
    from napari_lcm_stain.finetune import held_out_pairs

    return held_out_pairs(n)


def _pairs_problem(pairs: list[tuple[Layer, Layer]]) -> str | None:
    """Why these layer pairs cannot train together: a pair of one layer, a layer in two pairs,
    or a pair of two shapes (None when they can; pairs may differ in size)."""
    from napari_lcm_stain.finetune import check_distinct_pairs

    try:  # the check `finetune` and `train --data` make on files, here on layers
        check_distinct_pairs(
            pairs,
            kind="layer",
            key=lambda ly: id(getattr(ly, "__wrapped__", ly)),
            name=lambda ly: ly.name,
        )
    except ValueError as e:
        return str(e)
    for i, (q, d) in enumerate(pairs, start=1):
        problem = _shape_problem(q, d, "qOBM", "DAPI")
        if problem:
            return f"Pair {i} ({pair_label(q, d)}): {problem}"
    return None


def _shape_problem(a: Layer, b: Layer, name_a: str, name_b: str) -> str | None:
    sa, sb = tuple(base_data(a).shape), tuple(base_data(b).shape)
    if sa != sb:
        return (
            f"{name_a} '{a.name}' is {sa} but {name_b} '{b.name}' is {sb}: the pair must have the "
            "same shape (pixel-aligned images of one field)."
        )
    return None
