"""Screenshots of the real napari viewer for the docs: the Stain dock, the side-by-side grid, and
the Fine-tune dock with its loss plot.

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshots.py
    python scripts/screenshots.py              # starts its own virtual display if none is set

Writes docs/images/stain_widget.png, side_by_side.png and finetune_dock.png (atomically). It drives
the docks exactly as a user would: open the sample, click "Stain layer", click "Side by side",
fine-tune for a few steps. Numbers shown in the pictures come from that run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "napari-lcm-stain"


def _ensure_display(width: int, height: int):
    """Start Xvfb through pyvirtualdisplay when there is no display (pytest-xvfb does the same)."""
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return None
    try:
        from pyvirtualdisplay import Display
    except ImportError:
        sys.exit("no display: run under xvfb-run, or pip install pyvirtualdisplay")
    display = Display(visible=False, size=(width, height), color_depth=24)
    display.start()
    return display


def _wait(app, busy, timeout: float, what: str) -> None:
    t0 = time.perf_counter()
    while busy():
        app.processEvents()
        time.sleep(0.02)
        if time.perf_counter() - t0 > timeout:
            sys.exit(f"timed out after {timeout:.0f} s waiting for {what}")
    for _ in range(20):  # let the canvas and docks repaint
        app.processEvents()
        time.sleep(0.01)


def _save(viewer, path: Path) -> None:
    import imageio.v3 as iio

    image = viewer.screenshot(canvas_only=False, flash=False)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    iio.imwrite(tmp, image, extension=".png")
    os.replace(tmp, path)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--size", default="1600x1000", help="window size, WxH")
    parser.add_argument("--model", default=None, help="LCM checkpoint instead of the packaged one")
    parser.add_argument("--pix2pix", default=None, help="Pix2Pix checkpoint instead of packaged")
    parser.add_argument("--finetune-steps", type=int, default=60)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per stage")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    args.out.mkdir(parents=True, exist_ok=True)

    display = _ensure_display(width, height)
    try:
        import napari
        from qtpy.QtWidgets import QApplication

        viewer = napari.Viewer(show=True, title="napari-lcm-stain")
        viewer.window.resize(width, height)
        app = QApplication.instance()

        viewer.open_sample(PLUGIN, "qobm_field")
        viewer.layers["nuclei (ground truth)"].visible = False
        viewer.layers["DAPI (ground truth)"].visible = False
        _dock, stain = viewer.window.add_plugin_dock_widget(PLUGIN, "Virtual stain")
        if args.model:
            stain.add_model("LCM", args.model)
        if args.pix2pix:
            stain.baseline_model = args.pix2pix
        stain.advanced.expand(animate=False)
        stain.run()
        _wait(app, lambda: stain.is_running, args.timeout, "staining")
        if stain.last_error:
            sys.exit(f"staining failed: {stain.last_error}")
        viewer.layers.selection.active = viewer.layers["qOBM phase"]
        viewer.reset_view()
        _wait(app, lambda: False, 1, "repaint")
        _save(viewer, args.out / "stain_widget.png")

        stain.advanced.collapse(animate=False)
        stain.grid_button.setChecked(True)
        _wait(app, lambda: False, 1, "repaint")
        _save(viewer, args.out / "side_by_side.png")
        stain.grid_button.setChecked(False)

        for layer in viewer.layers:  # the canvas shows the training pair during fine-tuning
            layer.visible = layer.name in ("qOBM phase", "DAPI (ground truth)")
        _fdock, ft = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune", tabify=True)
        _fdock.raise_()
        ft.qobm_combo.set_layer(viewer.layers["qOBM phase"])
        ft.dapi_combo.set_layer(viewer.layers["DAPI (ground truth)"])
        if args.model:
            ft.model_combo.insertItem(0, Path(args.model).name, args.model)
            ft.model_combo.setCurrentIndex(0)
        ft.steps_spin.setValue(args.finetune_steps)
        ft.patch_spin.setValue(128)
        ft.start()
        _wait(app, lambda: ft.is_running, args.timeout, "fine-tuning")
        if ft.last_error:
            sys.exit(f"fine-tuning failed: {ft.last_error}")
        _save(viewer, args.out / "finetune_dock.png")
        viewer.close()
    finally:
        if display is not None:
            display.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
