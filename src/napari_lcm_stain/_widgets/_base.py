"""What both docks share: the worker lifecycle (start, progress bar, finish, error notification,
stop when the dock is closed), keeping layer pickers in sync with the layer list, the checkpoint
file dialog, the metrics table, and small builders for the usual controls.

A dock subclasses `DockBase`, builds its controls, calls `watch_layers()`, and starts background
work with `start_worker(...)`; it overrides `layer_combos()`, `layers_refreshed()` and
`worker_done()` where it needs to.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLayout,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from . import _jobs
from ._layers import default_qobm
from ._qt_helpers import LayerCombo, fit_table_height

DEVICES = ("auto", "cpu", "cuda", "mps")
#: item data of the "Checkpoint file…" entry of a model menu
BROWSE = "__browse__"
CHECKPOINT_FILTER = "Checkpoints (*.safetensors);;All files (*)"


def stop_worker(holder: dict) -> None:
    """Ask a running worker to stop; connected to ``destroyed`` so closing the viewer stops it."""
    worker = holder.get("worker")
    if worker is not None:
        holder["closing"] = True
        event = holder.get("stop")
        if event is not None:
            event.set()
        worker.quit()


# ----------------------------------------------------------------------------------- builders


def spin_box(
    lo: int, hi: int, value: int, *, step: int = 1, suffix: str = "", tip: str = ""
) -> QSpinBox:
    box = QSpinBox()
    box.setRange(lo, hi)
    box.setSingleStep(step)
    box.setValue(value)
    box.setSuffix(suffix)
    box.setToolTip(tip)
    return box


def float_box(
    lo: float, hi: float, value: float, *, step: float, decimals: int = 2, tip: str = ""
) -> QDoubleSpinBox:
    box = QDoubleSpinBox()
    box.setDecimals(decimals)
    box.setRange(lo, hi)
    box.setSingleStep(step)
    box.setValue(value)
    box.setToolTip(tip)
    return box


def check_box(text: str, tip: str = "", checked: bool = False) -> QCheckBox:
    box = QCheckBox(text)
    box.setChecked(checked)
    box.setToolTip(tip)
    return box


def button(
    text: str, slot: Callable[[], Any], *, tip: str = "", enabled: bool = True
) -> QPushButton:
    b = QPushButton(text)
    b.setToolTip(tip)
    b.setEnabled(enabled)
    b.clicked.connect(lambda *_a: slot())
    return b


def row(*items: QWidget | tuple[QWidget, int]) -> QHBoxLayout:
    """Widgets side by side; ``(widget, stretch)`` gives one a share of the width."""
    layout = QHBoxLayout()
    for item in items:
        widget, stretch = item if isinstance(item, tuple) else (item, 0)
        layout.addWidget(widget, stretch)
    return layout


def stack(widget: QWidget, *items: QWidget | QLayout) -> QVBoxLayout:
    """Lay ``items`` out top to bottom in ``widget``, with the spare height below them."""
    layout = QVBoxLayout(widget)
    for item in items:
        if isinstance(item, QLayout):
            layout.addLayout(item)
        else:
            layout.addWidget(item)
    layout.addStretch(1)
    return layout


def note_label(text: str = "", color: str = "gray") -> QLabel:
    label = QLabel(text)
    label.setWordWrap(True)
    label.setStyleSheet(f"color: {color};")
    return label


def form_layout() -> QFormLayout:
    form = QFormLayout()
    form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
    return form


def metrics_table(columns: list[str], tip: str, rows: list[str] | None = None) -> QTableWidget:
    """A read-only table of numbers, hidden until `show_values` fills it."""
    table = QTableWidget(len(rows or ()), len(columns))
    table.setHorizontalHeaderLabels(columns)
    if rows:
        table.setVerticalHeaderLabels(rows)
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
    table.setToolTip(tip)
    table.setVisible(False)
    return table


def show_values(table: QTableWidget, values: list[list[Any]]) -> bool:
    """Fill the table (3 decimals, '–' for missing/non-finite); show it if any value is a number."""
    shown = False
    for r, cells in enumerate(values):
        for c, v in enumerate(cells):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            item = QTableWidgetItem(f"{v:.3f}" if ok else "–")
            item.setTextAlignment(Qt.AlignmentFlag.AlignCenter)
            table.setItem(r, c, item)
            shown = shown or ok
    table.setVisible(shown)
    if shown:
        fit_table_height(table)
    return shown


# ---------------------------------------------------------------------------------- the base


class DockBase(QWidget):
    """A dock of this plugin: one background job at a time, and layer pickers kept up to date."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self._job: dict[str, Any] = {}  # worker handle, shared with the destroyed-hook
        self._pbar: progress | None = None
        self.last_error: str | None = None
        self.status = QLabel()  # one status line; failures are shown here and notified
        self.status.setWordWrap(True)

    # ------------------------------------------------------------------ layer list
    def watch_layers(self) -> None:
        """Refresh the pickers when layers come, go, move or are renamed; stop work on close."""
        layers = self.viewer.layers
        for ev in (layers.events.inserted, layers.events.removed, layers.events.moved):
            ev.connect(self._on_layers_changed)
        layers.events.inserted.connect(self._on_layer_inserted)
        for ly in layers:
            ly.events.name.connect(self._on_layers_changed)
        self.destroyed.connect(lambda *_a, h=self._job: stop_worker(h))

    def layer_combos(self) -> list[LayerCombo]:
        """The dock's layer pickers, refreshed in this order."""
        return []

    def layers_refreshed(self) -> None:
        """Hook: the pickers were just refreshed."""

    def _on_layer_inserted(self, event: Any) -> None:
        event.value.events.name.connect(self._on_layers_changed)

    def _on_layers_changed(self, *_args: Any) -> None:
        for combo in self.layer_combos():
            combo.refresh()
        self.layers_refreshed()

    def qobm_picker(self, tip: str, *, follow_selection: bool = False) -> LayerCombo:
        """The qOBM layer picker: defaults to the selected layer, else the most qOBM-like name."""
        combo = LayerCombo(
            self.viewer,
            default=lambda: default_qobm(self.viewer.layers, self.viewer.layers.selection.active),
            follow_selection=follow_selection,
        )
        combo.setToolTip(tip)
        return combo

    # ------------------------------------------------------------------ files
    def browse_checkpoint(self, title: str) -> str | None:
        path, _ = QFileDialog.getOpenFileName(self, title, "", CHECKPOINT_FILTER)
        return path or None

    # ------------------------------------------------------------------ the worker
    @property
    def is_running(self) -> bool:
        return self._job.get("worker") is not None

    @property
    def closing(self) -> bool:
        return bool(self._job.get("closing"))

    def start_worker(
        self,
        func: Callable[..., Any],
        *args: Any,
        desc: str,
        total: int = 0,
        on_yield: Callable[[Any], None],
        on_return: Callable[[Any], None],
        on_abort: Callable[[], None] | None = None,
        stop_event: Any = None,
        **kwargs: Any,
    ) -> Any:
        """Create the worker for ``func(*args, **kwargs)`` and its progress bar; the caller
        updates its controls, then calls ``worker.start()``. ``stop_event`` (a threading.Event
        the job checks) is set when the dock is closed."""
        worker = create_worker(func, *args, _start_thread=False, **kwargs)
        worker.yielded.connect(on_yield)
        worker.returned.connect(on_return)
        if on_abort is not None:
            worker.aborted.connect(on_abort)
        worker.finished.connect(self._on_worker_finished)
        self._job.update(worker=worker, stop=stop_event)
        self.last_error = None
        self._pbar = progress(total=total, desc=desc)
        return worker

    def start_stoppable(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`start_worker` for a job that runs until told: ``func(*args, stop, ...)`` gets a
        threading.Event, returned with the worker, that asks it to finish."""
        stop = threading.Event()
        return self.start_worker(func, *args, stop, stop_event=stop, **kwargs), stop

    def advance(self, done: int, total: int, desc: str | None = None) -> None:
        """Move the progress bar to ``done`` of ``total``."""
        pbar = self._pbar  # local: progress events may process Qt events (re-entrancy)
        if pbar is None:
            return
        if total and pbar.total != total:
            pbar.total = total
        if desc is not None:
            pbar.set_description(desc)
        pbar.update(max(0, done - pbar.n))

    def job_failed(self, result: Any, what: str) -> bool:
        """True when the result is to be dropped: a failure (reported) or the dock is closing."""
        if self.closing:
            return True
        if isinstance(result, _jobs.JobFailure):
            self._fail(f"{what} failed: {result.message}")
            return True
        return False

    def _on_worker_finished(self) -> None:
        self._job.pop("worker", None)
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        if not self.closing:
            self.worker_done()

    def worker_done(self) -> None:
        """Hook: the worker has finished (after its result was handled); reset the controls."""

    def _fail(self, message: str) -> None:
        self.last_error = message
        self.status.setText(message)
        show_error(message)
