"""Small Qt pieces shared by the docks: a layer picker that follows the viewer, and a loss plot."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from napari.layers import Layer
from qtpy.QtCore import QPointF, QRectF, Qt, Signal
from qtpy.QtGui import QColor, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import QComboBox, QSizePolicy, QTableWidget, QWidget

from ._layers import same_layer, unsuitable_reason

NONE_TEXT = "(none)"


class LayerCombo(QComboBox):
    """Combo box of the viewer's single-channel image layers, kept in sync with the layer list.

    Items are layer names (unique in napari); the selection survives additions, removals and
    renames. ``explain()`` lists the layers it leaves out and why.

    With ``follow_selection``, selecting a layer in napari's layer list (``selection.active``)
    chooses it here too, if ``default`` would pick it, until the user picks a layer in the combo
    by hand. A layer that becomes active only because it was just added does not take over.
    """

    layerChanged = Signal(object)  # the chosen Layer, or None

    def __init__(
        self,
        viewer: Any,
        *,
        allow_none: bool = False,
        default: Callable[[], Layer | None] | None = None,
        follow_selection: bool = False,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self._viewer = viewer
        self._allow_none = allow_none
        self._default = default
        self._explicit = False  # True once the user picked something: stop auto-defaulting
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(12)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.activated.connect(self._on_activated)
        self.currentIndexChanged.connect(lambda _i: self.layerChanged.emit(self.layer()))
        self._just_added: Layer | None = None
        if follow_selection:
            layers = viewer.layers
            layers.events.inserted.connect(self._on_inserted)
            layers.selection.events.active.connect(self._on_active)
            self.destroyed.connect(
                lambda *_a: (
                    layers.events.inserted.disconnect(self._on_inserted),
                    layers.selection.events.active.disconnect(self._on_active),
                )
            )
        self.refresh()

    def _on_inserted(self, event: Any) -> None:
        self._just_added = event.value

    def _on_active(self, *_args: Any) -> None:
        active = self._viewer.layers.selection.active
        if active is None or same_layer(active, self._just_added):
            return  # napari activates a new layer (in several events): not the user's choice
        self._just_added = None
        if self._explicit:
            return
        chosen = self._default() if self._default else active
        if chosen is not None and same_layer(chosen, active):
            self.set_layer(active)

    def _on_activated(self, _index: int) -> None:
        self._explicit = True

    def layer(self) -> Layer | None:
        name = self.currentData()
        if not name:
            return None
        try:
            return self._viewer.layers[name]
        except KeyError:
            return None

    def set_layer(self, layer: Layer | None) -> None:
        index = self.findData(layer.name) if layer is not None else self.findData("")
        if index >= 0:
            self.setCurrentIndex(index)

    def refresh(self) -> None:
        """Rebuild the items from the viewer's layers, keeping the current choice if it still exists."""
        previous = self.currentData()
        names = [ly.name for ly in self._viewer.layers if unsuitable_reason(ly) is None]
        self.blockSignals(True)
        try:
            self.clear()
            if self._allow_none:
                self.addItem(NONE_TEXT, "")
            for name in reversed(names):  # top of the layer list first, as napari shows it
                self.addItem(name, name)
            index = self.findData(previous) if previous is not None else -1
            if index < 0 or (not previous and not self._explicit):
                default = self._default() if self._default else None
                index = self.findData(default.name) if default is not None else -1
            if index < 0:
                index = 0 if self.count() else -1
            self.setCurrentIndex(index)
        finally:
            self.blockSignals(False)
        if self.currentData() != previous:
            self.layerChanged.emit(self.layer())

    def explain(self) -> str:
        """One line per reason a layer is not offered, naming those layers ('' if none)."""
        by_reason: dict[str, list[str]] = {}
        for ly in self._viewer.layers:
            reason = unsuitable_reason(ly)
            if reason and reason != "output of this plugin":
                by_reason.setdefault(reason, []).append(f"'{ly.name}'")
        return "\n".join(f"{', '.join(names)}: {reason}" for reason, names in by_reason.items())


def fit_table_height(table: QTableWidget) -> None:
    """Make a small table exactly as tall as its rows (no empty band under them)."""
    header = table.horizontalHeader()  # its size hint follows new (e.g. two-line) labels at once
    height = max(header.height(), header.sizeHint().height()) + 2 * table.frameWidth()
    height += sum(table.rowHeight(r) for r in range(table.rowCount()))
    table.setFixedHeight(height + 2)


class LossPlot(QWidget):
    """Live training curve (train and validation loss against step), drawn with QPainter; a
    dashed line marks the step whose weights are kept so far (`set_best`).

    Drawn directly so the dock needs no plotting library; the y axis switches to log scale once the
    loss spans more than a decade, where training curves are easier to read.
    """

    TRAIN_COLOR = QColor(90, 160, 255)
    VAL_COLOR = QColor(255, 160, 60)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []
        self.total_steps = 0
        self.best_step: int | None = None
        self.setMinimumHeight(170)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)

    def clear(self, total_steps: int = 0) -> None:
        self.train.clear()
        self.val.clear()
        self.total_steps = int(total_steps)
        self.best_step = None
        self.update()

    def set_best(self, step: int | None) -> None:
        """Mark ``step`` as the best so far (None or 0, the starting model: no mark)."""
        step = int(step) if step else None
        if step != self.best_step:
            self.best_step = step
            self.update()

    def add(self, step: int, train_loss: float | None, val_loss: float | None = None) -> None:
        if train_loss is not None and math.isfinite(train_loss):
            self.train.append((int(step), float(train_loss)))
        if val_loss is not None and math.isfinite(val_loss):
            self.val.append((int(step), float(val_loss)))
        self.update()

    def _y_range(self) -> tuple[float, float, bool]:
        values = [v for _, v in self.train] + [v for _, v in self.val]
        lo, hi = min(values), max(values)
        log = lo > 0 and hi / lo > 10.0
        if log:
            return math.log10(lo), math.log10(hi), True
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5 * abs(lo or 1.0), hi + 0.5 * abs(hi or 1.0)
        return lo, hi, False

    def paintEvent(self, _event: Any) -> None:  # noqa: N802 (Qt API)
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        pal = self.palette()
        fg = pal.color(pal.ColorRole.WindowText)
        p.fillRect(self.rect(), pal.color(pal.ColorRole.Base))
        fm = p.fontMetrics()
        left, right = fm.horizontalAdvance("0.0000") + 10, 10
        top, bottom = fm.height() + 8, fm.height() + 10
        plot = QRectF(left, top, self.width() - left - right, self.height() - top - bottom)
        p.setPen(QPen(fg, 1))
        p.drawRect(plot)
        p.drawText(
            QPointF(plot.center().x() - fm.horizontalAdvance("step") / 2, self.height() - 3), "step"
        )
        if not self.train and not self.val:
            p.drawText(plot, Qt.AlignmentFlag.AlignCenter, "loss appears here during training")
            p.end()
            return
        lo, hi, log = self._y_range()
        x_max = max([self.total_steps] + [s for s, _ in self.train] + [s for s, _ in self.val])
        x_max = max(x_max, 1)

        def to_xy(step: int, value: float) -> QPointF:
            v = math.log10(value) if log else value
            fx = step / x_max
            fy = (v - lo) / (hi - lo) if hi > lo else 0.5
            return QPointF(plot.left() + fx * plot.width(), plot.bottom() - fy * plot.height())

        def fmt(v: float) -> str:
            return f"{10**v:.3g}" if log else f"{v:.3g}"

        p.drawText(QPointF(2, plot.top() + fm.ascent() / 2), fmt(hi))
        p.drawText(QPointF(2, plot.bottom()), fmt(lo))
        p.drawText(
            QPointF(plot.right() - fm.horizontalAdvance(str(x_max)), self.height() - 3), str(x_max)
        )
        for series, color, label, dx in (
            (self.train, self.TRAIN_COLOR, "train", 0),
            (self.val, self.VAL_COLOR, "validation", 70),
        ):
            p.setPen(QPen(color, 2))
            p.drawLine(QPointF(left + dx, top / 2), QPointF(left + dx + 16, top / 2))
            p.setPen(QPen(fg, 1))
            p.drawText(QPointF(left + dx + 20, top / 2 + fm.ascent() / 3), label)
            if not series:
                continue
            path = QPainterPath(to_xy(*series[0]))
            for point in series[1:]:
                path.lineTo(to_xy(*point))
            p.setPen(QPen(color, 2))
            p.drawPath(path)
            if len(series) < 60:
                for point in series:
                    p.drawEllipse(to_xy(*point), 2.0, 2.0)
        if self.best_step:
            x = to_xy(self.best_step, 10**lo if log else lo).x()
            p.setPen(QPen(self.VAL_COLOR, 1, Qt.PenStyle.DashLine))
            p.drawLine(QPointF(x, plot.top()), QPointF(x, plot.bottom()))
            p.drawText(QPointF(x + 3, plot.bottom() - 3), "best")
        if log:
            p.setPen(QPen(fg, 1))
            p.drawText(
                QPointF(
                    plot.right() - fm.horizontalAdvance("log scale") - 4,
                    plot.top() + fm.ascent() + 2,
                ),
                "log scale",
            )
        p.end()
