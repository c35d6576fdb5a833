"""End-to-end latency of live staining in a real napari viewer: a frame appended to a layer ->
the live DAPI layer updated, for 512² and 2048² frames with the packaged LCM (1 step) on the CPU.

    python experiments/live_latency.py                      # starts its own virtual display if needed
    python experiments/live_latency.py --sizes 512 --repeats 20 --json latency.json
    python experiments/live_latency.py --screenshot docs/images/live_mode.png

Frames are appended one at a time, each after the previous one was shown, so every frame is
stained (no skipping) and the numbers are per-frame latency; the first frame (model loading,
warm-up) is not counted. Prints the median end-to-end latency, the engine's share of it, and
frames/s at that latency. Timings depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from screenshots import PLUGIN, _ensure_display, _save, _wait  # noqa: E402


def _frames(size: int, n: int):
    import numpy as np

    from napari_lcm_stain.simulate import simulate_pair

    base = simulate_pair("brain-20x", size=size, seed=7).qobm.astype(np.float32)
    step = max(1, size // 64)
    return [np.roll(base, (k * step, 2 * k * step), axis=(0, 1)) for k in range(n)]


def measure(viewer, app, widget, size: int, repeats: int, timeout: float, shot: Path | None):
    import numpy as np

    frames = _frames(size, repeats + 1)
    layer = viewer.add_image(frames[0][None], name=f"qOBM phase {size}", scale=(1, 0.414, 0.414))
    widget.layer_combo.set_layer(layer)
    widget.set_live(True)
    live = widget.live
    _wait(app, lambda: not live.stained, timeout, "the first frame (model loading)")
    e2e, engine = [], []
    for k in range(1, repeats + 1):
        layer.data = np.concatenate([layer.data, frames[k][None]])
        _wait(app, lambda k=k: len(live.stained) <= k, timeout, f"frame {k}")
        e2e.append(live.latencies[-1])
        engine.append(live.stain_seconds[-1])
    if shot is not None:
        _save(viewer, shot)
    widget.set_live(False)
    _wait(app, lambda: widget.is_running, timeout, "live staining to stop")
    med = statistics.median(e2e)
    return {
        "load_average_1min": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(),
        "size": size,
        "frames": repeats,
        "skipped": live.skipped,
        "median_latency_ms": round(1000 * med, 1),
        "median_engine_ms": round(1000 * statistics.median(engine), 1),
        "min_latency_ms": round(1000 * min(e2e), 1),
        "max_latency_ms": round(1000 * max(e2e), 1),
        "frames_per_s": round(1.0 / med, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=10, help="frames per size after warm-up")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--screenshot", type=Path, default=None, help="PNG of the first size")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per frame at most")
    args = parser.parse_args(argv)
    display = _ensure_display(1600, 1000)
    try:
        import napari
        import torch
        from qtpy.QtWidgets import QApplication

        viewer = napari.Viewer(show=True, title="napari-lcm-stain: live")
        viewer.window.resize(1600, 1000)
        app = QApplication.instance()
        _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Virtual stain")
        widget.device_combo.setCurrentIndex(widget.device_combo.findData(args.device))
        widget.pix2pix_check.setChecked(False)
        results = []
        for i, size in enumerate(args.sizes):
            shot = args.screenshot if i == 0 else None
            results.append(measure(viewer, app, widget, size, args.repeats, args.timeout, shot))
            r = results[-1]
            print(
                f"{size}x{size}: median {r['median_latency_ms']} ms frame in -> layer updated "
                f"(engine {r['median_engine_ms']} ms; min {r['min_latency_ms']}, max "
                f"{r['max_latency_ms']}; {r['frames_per_s']} frames/s; {r['frames']} frames, "
                f"{r['skipped']} skipped) on {args.device}, {torch.get_num_threads()} threads, "
                f"load average {r['load_average_1min']} on {r['cpu_count']} CPUs",
                flush=True,
            )
        viewer.close()
    finally:
        if display is not None:
            display.stop()
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
