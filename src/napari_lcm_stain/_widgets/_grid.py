"""Side by side: chosen layers in napari's grid mode (one camera, so pan/zoom are linked), and
the viewer's grid, stacking order, visibility, name overlays and colormaps put back afterwards."""

from __future__ import annotations

import math
from typing import Any

from napari.layers import Layer

from ._layers import DAPI_COLORMAP, same_layer


def viewer_grid(viewer: Any) -> Any:
    """napari's grid settings (``viewer.canvas.grid`` since 0.9, ``viewer.grid`` before)."""
    canvas = getattr(viewer, "canvas", None)
    return canvas.grid if canvas is not None and hasattr(canvas, "grid") else viewer.grid


def restore_order(layers: Any, names: list[str]) -> None:
    """Put the named layers back in their saved order (others keep theirs, after them)."""
    present = {ly.name for ly in layers}
    saved = [n for n in names if n in present]
    desired = saved + [ly.name for ly in layers if ly.name not in set(saved)]
    for target, name in enumerate(desired):
        current = layers.index(layers[name])
        if current != target:
            layers.move(current, target)


class SideBySide:
    """Shows layers side by side in the viewer's grid; `restore` undoes every change it made."""

    def __init__(self, viewer: Any) -> None:
        self.viewer = viewer
        self._saved: dict[str, Any] | None = None

    @property
    def active(self) -> bool:
        return self._saved is not None

    def show(self, chosen: list[Layer], truth: Layer | None = None) -> None:
        """Remember the viewer's state (first call only), then show ``chosen`` in the grid."""
        if self._saved is None:
            grid = viewer_grid(self.viewer)
            self._saved = {
                "grid": (grid.enabled, tuple(grid.shape), grid.stride),
                "visible": {ly.name: ly.visible for ly in self.viewer.layers},
                "order": [ly.name for ly in self.viewer.layers],
                "overlay": {},
            }
        self.apply(chosen, truth)

    def apply(self, chosen: list[Layer], truth: Layer | None = None) -> None:
        """Lay ``chosen`` out left to right (2x2 for four); ``truth`` gets the outputs' colormap."""
        saved = self._saved if self._saved is not None else {"overlay": {}}
        layers = self.viewer.layers
        for ly in chosen:  # move to the top in order: index order = grid order, left to right
            layers.move(layers.index(ly), len(layers))
        for ly in layers:
            ly.visible = any(same_layer(ly, c) for c in chosen)
        for ly in chosen:
            saved["overlay"].setdefault(ly.name, ly.name_overlay.visible)
            ly.name_overlay.visible = True
        if truth is not None and any(same_layer(truth, c) for c in chosen):
            # the measured DAPI in the outputs' colormap (its own contrast): compare data, not LUTs
            saved.setdefault("colormap", {}).setdefault(truth.name, truth.colormap)
            truth.colormap = DAPI_COLORMAP
        n = len(chosen)
        grid = viewer_grid(self.viewer)
        grid.stride = 1
        grid.shape = (1, n) if n <= 3 else (2, math.ceil(n / 2))  # 4 -> 2x2 fills the canvas
        grid.enabled = True
        self.viewer.reset_view()

    def restore(self) -> None:
        saved, self._saved = self._saved, None
        if saved is None:
            return
        enabled, shape, stride = saved["grid"]
        grid = viewer_grid(self.viewer)
        grid.stride, grid.shape, grid.enabled = stride, shape, enabled
        restore_order(self.viewer.layers, saved["order"])
        for ly in self.viewer.layers:
            if ly.name in saved["visible"]:
                ly.visible = saved["visible"][ly.name]
            if ly.name in saved["overlay"]:
                ly.name_overlay.visible = saved["overlay"][ly.name]
            if ly.name in saved.get("colormap", {}):
                ly.colormap = saved["colormap"][ly.name]
        self.viewer.reset_view()
