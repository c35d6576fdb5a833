"""Live staining, folder mode: `lcm-stain watch DIR -o OUT` stains each new TIFF in DIR once it is
completely written.

File events come from `watchdog` (created / modified / moved into the folder). A file is staged
when an event names it and is stained once its size and modification time have not changed for
``settle`` seconds, with `io.stain_files` (atomic OME-TIFF/OME-Zarr output with provenance, the
core engine). A file that still cannot be read then (half-written, corrupt) gets a note and is tried
again if it changes later; nothing stops the watch but Ctrl-C (or ``stop``), which ends cleanly:
a file being stained leaves no partial output. No napari or Qt here.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .io import TIFF_SUFFIXES, stain_files


@dataclass
class WatchReport:
    """What a watch did: outputs written, and a note for every file that could not be stained."""

    written: list[Path] = field(default_factory=list)
    notes: dict[Path, str] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)  # file complete -> output written (s)


def _is_candidate(path: Path) -> bool:
    return path.suffix.lower() in TIFF_SUFFIXES and not path.name.startswith(".")


class _Staging:
    """Files named by file events, with the (size, mtime) last seen and since when it holds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[Path, tuple[tuple[int, int] | None, float]] = {}

    def add(self, path: Path) -> None:
        if _is_candidate(path):
            with self._lock:
                self._files[path] = (None, time.monotonic())

    def stable(self, settle: float) -> list[Path]:
        """Files whose size and mtime have not changed for ``settle`` s (taken off the list)."""
        now, ready = time.monotonic(), []
        with self._lock:
            for path, (seen, since) in list(self._files.items()):
                try:
                    st = path.stat()
                except OSError:  # gone again (renamed, deleted)
                    del self._files[path]
                    continue
                sig = (st.st_size, st.st_mtime_ns)
                if sig != seen:
                    self._files[path] = (sig, now)
                elif st.st_size > 0 and now - since >= settle:
                    ready.append(path)
                    del self._files[path]
        return sorted(ready)


def _observer(folder: Path, staging: _Staging) -> Any:
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers import Observer

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event: Any) -> None:
            if event.is_directory or event.event_type not in ("created", "modified", "moved"):
                return
            path = getattr(event, "dest_path", "") or event.src_path
            staging.add(Path(path if isinstance(path, str) else path.decode()))

    observer = Observer()
    observer.schedule(Handler(), str(folder), recursive=False)
    return observer


def watch_folder(
    folder: Path,
    output: Path,
    *,
    model: Any = "lcm",
    existing: bool = False,
    settle: float = 1.0,
    poll: float = 0.1,
    stop: threading.Event | None = None,
    log: Callable[[str], None] = print,
    on_written: Callable[[Path, list[Path]], None] | None = None,
    **stain_kwargs: Any,
) -> WatchReport:
    """Stain every TIFF that appears in ``folder`` into ``output`` until ``stop`` or Ctrl-C.

    ``stain_kwargs`` go to `io.stain_files` (steps, tile, overlap, device, seed, pixel_size,
    out_format, overwrite, texture); ``existing`` also stains the TIFFs already in the folder;
    ``on_written(input, outputs)`` is called after each stained file.
    """
    from .engine import get_predictor

    folder, output = Path(folder), Path(output)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"watch folder {folder} not found: create it or pass an existing folder"
        )
    if output.exists() and output.resolve() == folder.resolve():
        raise ValueError(
            f"output folder {output} is the watched folder: choose another -o "
            "(outputs would be stained again)"
        )
    if settle < 0 or poll <= 0:
        raise ValueError(f"settle must be >= 0 and poll > 0 seconds, got {settle} and {poll}")
    output.mkdir(parents=True, exist_ok=True)
    steps, device = stain_kwargs.get("steps"), stain_kwargs.get("device", "auto")
    texture = stain_kwargs.get("texture", False)
    predictor = get_predictor(model, steps, device, texture=texture)  # once, before the first file
    staging, report = _Staging(), WatchReport()
    observer = _observer(folder, staging)
    observer.start()
    if existing:
        for path in sorted(folder.iterdir()):
            staging.add(path)
    log(f"watching {folder} for new TIFF files; stained files go to {output} (Ctrl-C stops)")
    try:
        while stop is None or not stop.is_set():
            for path in staging.stable(settle):
                written = _stain_one(
                    path, output, report, log, settle, model=predictor, **stain_kwargs
                )
                if written and on_written is not None:
                    on_written(path, written)
            time.sleep(poll)
    except KeyboardInterrupt:
        log("interrupted: stopping")
    finally:
        observer.stop()
        observer.join(timeout=5)
    log(f"stopped: {len(report.written)} file(s) stained, {len(report.notes)} not stained")
    return report


def _stain_one(
    path: Path, output: Path, report: WatchReport, log: Callable[[str], None], settle: float, **kw
) -> list[Path]:
    complete = time.perf_counter() - settle  # the file stopped changing ``settle`` s ago
    try:
        written = stain_files([path], output, quiet=True, **kw)
    except (ValueError, TypeError, OSError) as exc:  # unreadable, half-written, exists, disk full
        note = f"{path.name}: not stained: {exc}"
        report.notes[path] = note
        log(f"note: {note} (tried again if the file changes)")
        return []
    report.notes.pop(path, None)
    report.written += written
    report.latencies.append(time.perf_counter() - complete)
    names = ", ".join(str(w) for w in written)
    log(f"wrote {names} ({report.latencies[-1]:.2f} s after {path.name} was complete)")
    return written


#: `--texture` of `lcm-stain stain` and `lcm-stain watch`.
TEXTURE_HELP = (
    "draw the stain with DAPI-like grain (models with a texture decoder; to compare by eye with "
    "real DAPI) instead of the smooth mean, which is better for segmenting, counting and "
    "measuring; models without one (Pix2Pix, older checkpoints) are not affected (default: smooth)"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `lcm-stain watch` options (kept here so the CLI stays one call per subcommand)."""
    p.add_argument("folder", help="folder the acquisition writes TIFF files into")
    p.add_argument("-o", "--output", required=True, help="folder for the stained files")
    for flag, kind, default, text in (
        ("--model", str, "lcm", "lcm | pix2pix | teacher | path to a checkpoint"),
        ("--steps", int, None, "sampling steps (LCM 1-4)"),
        ("--tile", int, 1024, "tile side in px"),
        ("--overlap", int, 32, "tile overlap in px"),
        ("--pixel-size", float, None, "input µm/px (else from metadata)"),
        ("--seed", int, 0, "noise seed"),
        ("--settle", float, 1.0, "seconds a file must stay unchanged before it is stained"),
    ):
        p.add_argument(flag, type=kind, default=default, help=f"{text} (default: %(default)s)")
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda", "mps"],
        default="auto",
        help="where to run: auto (a GPU if there is one, else the CPU) (default: %(default)s)",
    )
    p.add_argument(
        "--format",
        choices=["auto", "tiff", "zarr"],
        default="auto",
        help="output format; auto follows the input (default: %(default)s)",
    )
    p.add_argument("--texture", action="store_true", help=TEXTURE_HELP)
    p.add_argument("--existing", action="store_true", help="also stain the TIFFs already there")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def run_from_args(a: argparse.Namespace) -> int:
    names = ("model", "steps", "tile", "overlap", "device", "seed", "pixel_size", "overwrite")
    options = {name: getattr(a, name) for name in names + ("existing", "settle")}
    options["texture"] = a.texture
    watch_folder(Path(a.folder), Path(a.output), out_format=a.format, **options)
    return 0
