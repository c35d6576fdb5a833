"""Live staining, layer mode: stain frames as an acquisition adds them to a layer.

The dock's *Live* toggle makes a `LiveStain` watch the qOBM layer's ``data`` event. When the layer
grows along its first axis (frames appended) the newest frame is handed to the background worker
(`_jobs.live_job`, which stains with the core engine); when the data is replaced without growing, the
frame that changed is the whole image (2-D) or the plane the dims slider shows. A one-slot mailbox
(`_jobs.LatestFrame`) means a worker that falls behind jumps to the newest frame; the frames it
never stains are counted as skipped. Results go into two output layers: ``· DAPI live (…)`` (the
newest stained frame) and ``· DAPI live stack (…)`` (the stained frames in order, the last
`STACK_MAX`). `FolderWatch` is the dock's *Watch folder…*: `watch.watch_folder` in a worker.
This module only translates layer events into those calls and results into layers.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from napari.layers import Layer

from .._reader_writer import read_layers
from . import _jobs
from ._layers import ROLE_LIVE, ROLE_LIVE_STACK, base_data, current_plane, upsert_output

#: stained frames kept in the live stack layer (older ones drop out) ...
STACK_MAX = 100
#: ... and at most this many bytes of them (32 frames of 2048² px)
STACK_BYTES = 512 * 2**20
#: frames/s and latency are over this many most recent frames
WINDOW = 10


class _Line(Protocol):
    def setText(self, text: str) -> None: ...


class LiveHost(Protocol):
    """What `LiveStain` and `FolderWatch` need from the dock that owns them (the Stain dock is
    one; this module does not import it): the viewer, two text lines, and its worker plumbing
    (`_base.DockBase.start_stoppable` / `job_failed` / `closing`)."""

    viewer: Any
    live_label: _Line  # frames/s and latency, or the folder watch's messages
    status: _Line  # the dock's status line

    @property
    def closing(self) -> bool: ...

    def start_stoppable(
        self, func: Any, *args: Any, **kwargs: Any
    ) -> tuple[Any, threading.Event]: ...

    def job_failed(self, result: Any, what: str) -> bool: ...


class LiveStain:
    """One live session on one source layer (start / stop), with its statistics."""

    def __init__(self, dock: LiveHost) -> None:
        self.dock = dock
        self.viewer = dock.viewer
        self.source: Layer | None = None
        self.mailbox = _jobs.LatestFrame()
        self.stained: list[tuple[int, int]] = []  # frame keys, in the order they were stained
        self.gaps = 0  # frames appended together with a newer one: never handed over
        self.latencies: deque[float] = deque(maxlen=WINDOW)  # frame in -> layer updated (s)
        self.stain_seconds: deque[float] = deque(maxlen=WINDOW)  # the engine's part of it
        self._done_at: deque[float] = deque(maxlen=WINDOW)
        self._n_frames = 0
        self._revision = 0
        self._stack: np.ndarray | None = None
        self._stack_n = 0
        self._label = ""
        self._geometry: dict[str, Any] = {}
        self._stop = threading.Event()

    # ------------------------------------------------------------------ statistics
    @property
    def skipped(self) -> int:
        return self.gaps + self.mailbox.skipped

    @property
    def fps(self) -> float | None:
        if len(self._done_at) < 2:
            return None
        span = self._done_at[-1] - self._done_at[0]
        return (len(self._done_at) - 1) / span if span > 0 else None

    @property
    def latency(self) -> float | None:
        """Median end-to-end latency (s) of the recent frames."""
        return statistics.median(self.latencies) if self.latencies else None

    def summary(self) -> str:
        fps = f"{self.fps:.1f} frames/s" if self.fps else "– frames/s"
        lat = f"latency {1000 * self.latency:.0f} ms" if self.latency is not None else "latency –"
        return f"Live: {len(self.stained)} stained, {self.skipped} skipped · {fps} · {lat}"

    # ------------------------------------------------------------------ start / stop
    def start(self, source: Layer, label: str, **job_kwargs: Any) -> Any:
        """Watch ``source``; stain its newest frame now and every new one after; returns the worker."""
        self.source, self._label = source, label
        nd = source.ndim
        scale, translate = tuple(source.scale), tuple(source.translate)
        units = tuple(source.units) if getattr(source, "units", None) else None
        frame_nd = max(2, nd - 1)
        self._geometry = {
            "source": source.name,
            "frame": (
                scale[-frame_nd:],
                translate[-frame_nd:],
                units[-frame_nd:] if units else None,
            ),
            "stack": (
                (1.0,) + scale[-frame_nd:],
                (0.0,) + translate[-frame_nd:],
                ("pixel",) + units[-frame_nd:] if units else None,
            ),
        }
        worker, self._stop = self.dock.start_stoppable(
            _jobs.live_job,
            self.mailbox,
            desc=f"Live staining '{source.name}'",
            on_yield=self._on_result,
            on_return=self._on_return,
            source=source.name,
            **job_kwargs,
        )
        source.events.data.connect(self._on_data)
        self._n_frames = base_data(source).shape[0] if nd > 2 else 0
        if nd <= 2 or self._n_frames > 0:  # an empty stack waits for its first frame
            self._offer(self._newest(grew=nd > 2), time.perf_counter())
        return worker

    def stop(self) -> None:
        """Stop watching; the worker ends after the frame it is staining."""
        if self.source is not None:
            self.source.events.data.disconnect(self._on_data)
        self._stop.set()

    # ------------------------------------------------------------------ frames in
    def _newest(self, grew: bool) -> tuple[tuple[int, int], Any]:
        """Key and pixels of the frame to stain now (see the module doc)."""
        source = self.source
        data = base_data(source)
        if source.ndim <= 2:
            self._revision += 1
            return (0, self._revision), data
        n = data.shape[0]
        if grew:
            return (n - 1, 0), data[n - 1]
        index = current_plane(self.viewer, source)[0]
        self._revision += 1
        return (index, self._revision), data[index]

    def _on_data(self, _event: Any = None) -> None:
        arrived = time.perf_counter()
        source = self.source
        if source is None:
            return
        grew = False
        if source.ndim > 2:
            n = base_data(source).shape[0]
            if n == 0:
                return
            if n > self._n_frames + 1:
                self.gaps += n - self._n_frames - 1  # appended together with a newer frame
            grew = n > self._n_frames
            self._n_frames = n
        self._offer(self._newest(grew), arrived)

    def _offer(self, newest: tuple[tuple[int, int], Any], arrived: float) -> None:
        key, data = newest
        frame = np.array(data, copy=True)  # the acquisition may reuse its buffer
        frame.flags.writeable = False
        self.mailbox.put(_jobs.LiveFrame(key, frame, arrived))

    # ------------------------------------------------------------------ results out
    def _on_result(self, result: _jobs.LiveResult) -> None:
        if self.dock.closing or self.source is None:
            return
        first = not self.stained
        if first:  # the stack layer goes in first, so the newest frame's layer is on top of it
            self._show(ROLE_LIVE_STACK, self._push(result.dapi), result)
        self._show(ROLE_LIVE, result.dapi, result, plane=(result.frame.key[0],))
        now = time.perf_counter()
        self.latencies.append(now - result.frame.arrived)
        self.stain_seconds.append(result.seconds)
        self._done_at.append(now)
        self.stained.append(result.frame.key)
        if not first:
            self._show(ROLE_LIVE_STACK, self._push(result.dapi), result)
        self.dock.live_label.setText(self.summary())

    def _show(self, role: str, data: np.ndarray, result: _jobs.LiveResult, **kwargs: Any) -> None:
        g = self._geometry
        scale, translate, units = g["stack" if role == ROLE_LIVE_STACK else "frame"]
        upsert_output(
            self.viewer,
            data,
            source=g["source"],
            role=role,
            label=self._label,
            scale=scale,
            translate=translate,
            units=units,
            provenance=result.provenance,
            **kwargs,
        )

    def _push(self, dapi: np.ndarray) -> np.ndarray:
        """Append to the stack of stained frames (capacity doubles; the oldest drop at STACK_MAX)."""
        stack = self._stack
        cap = max(1, min(STACK_MAX, STACK_BYTES // max(1, dapi.nbytes)))
        if stack is None or stack.shape[1:] != dapi.shape:
            stack, self._stack_n = np.empty((min(4, cap), *dapi.shape), np.float32), 0
        if self._stack_n == len(stack):
            if len(stack) < cap:
                bigger = np.empty((min(2 * len(stack), cap), *dapi.shape), np.float32)
                bigger[: self._stack_n] = stack[: self._stack_n]
                stack = bigger
            else:
                stack[:-1] = stack[1:]
                self._stack_n -= 1
        stack[self._stack_n] = dapi
        self._stack_n += 1
        self._stack = stack
        return stack[: self._stack_n]

    def _on_return(self, result: Any) -> None:
        if self.dock.job_failed(result, "Live staining"):
            self.stop()


class FolderWatch:
    """The dock's *Watch folder…*: `watch.watch_folder` in a worker (`_jobs.watch_job`); its
    messages go to the line beside the toggle and the newest stained file into a layer."""

    def __init__(self, dock: LiveHost) -> None:
        self.dock = dock
        self.name = ""
        self.stop = threading.Event()
        #: stained files written so far, in order
        self.outputs: list[Path] = []

    def start(self, folder: Path, output: Path, settings: dict[str, Any]) -> Any:
        self.name = folder.name
        handlers = {"on_yield": self._on_event, "on_return": self._on_return}
        job = (_jobs.watch_job, folder, output)
        worker, self.stop = self.dock.start_stoppable(
            *job, desc=f"Watching {folder}", **handlers, **settings
        )
        return worker

    def _on_event(self, event: Any) -> None:
        if isinstance(event, str):
            self.dock.live_label.setText(event)
            return
        _src, outputs = event
        [(data, kwargs, _kind)] = read_layers(str(outputs[0]))
        nd = np.ndim(data)
        upsert_output(
            self.dock.viewer,
            np.asarray(data),
            source=self.name,
            role=ROLE_LIVE,
            label="watch",
            scale=kwargs.get("scale", (1.0,) * nd),
            translate=(0.0,) * nd,
            units=kwargs.get("units"),
            provenance=kwargs["metadata"].get("provenance"),
        )
        self.outputs.append(Path(outputs[0]))

    def _on_return(self, report: Any) -> None:
        if self.dock.job_failed(report, "Watching the folder") or report is None:
            return
        self.dock.status.setText(
            f"Folder watch stopped: {len(report.written)} file(s) stained, "
            f"{len(report.notes)} not stained."
        )
