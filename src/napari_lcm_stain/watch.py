"""Live staining, folder mode: `lcm-stain watch DIR -o OUT` stains each new TIFF in DIR once it is
completely written.

File events come from `watchdog` (created / modified / moved into the folder). A file is staged
when an event names it and is stained once its size and modification time have not changed for
``settle`` seconds, with `io.stain_files` (atomic OME-TIFF/OME-Zarr output with provenance, the
core engine). A file that still cannot be read then (half-written, corrupt) gets a note and is tried
again if it changes later; nothing stops the watch but Ctrl-C, SIGTERM (or ``stop``), which end
cleanly: a file being stained leaves no partial output, and the files still queued are counted,
with the `lcm-stain stain` command that stains them.

The settings are checked before anything starts (`_params.check_settings`, as `stain` does), and
the folder is observed before the model is loaded, so a file that lands during startup is stained
too (and so is every file modified since ``since``, the moment the command began). No napari or
Qt here.
"""

from __future__ import annotations

import argparse
import inspect
import os
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._params import check_settings
from .io import TIFF_SUFFIXES, plan_outputs, stain_files

#: Slack (s) for file systems whose modification times lag the clock a little.
MTIME_SLACK = 0.1


@dataclass
class WatchReport:
    """What a watch did: outputs written, and a note for every file that could not be stained."""

    written: list[Path] = field(default_factory=list)
    notes: dict[Path, str] = field(default_factory=dict)
    queued: list[Path] = field(default_factory=list)  # seen but not yet stained when it stopped
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

    def waiting(self) -> list[Path]:
        """Files still settling (named by an event, not yet stable)."""
        with self._lock:
            return sorted(p for p in self._files if p.exists())


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
    since: float | None = None,
    **stain_kwargs: Any,
) -> WatchReport:
    """Stain every TIFF that appears in ``folder`` into ``output`` until ``stop`` or Ctrl-C.

    ``stain_kwargs`` go to `io.stain_files` (steps, tile, overlap, device, seed, pixel_size,
    out_format, overwrite, texture, guidance) and are checked here first, as `stain` checks them;
    ``existing`` also stains the TIFFs already in the folder, else those modified since ``since``
    (epoch s, e.g. when a command began; default: only files that change once the folder is
    observed, which is before the model is loaded); ``on_written(input, outputs)`` is called
    after each stained file. Ctrl-C returns the report; SIGTERM (`cli.Terminated`, a KeyboardInterrupt
    subclass) is raised again after the summary. Files still queued then are in
    ``report.queued`` and the log gives the `lcm-stain stain` command that stains them.
    """
    folder, output = Path(folder), Path(output)
    settings = _check_watch(folder, output, model, settle, poll, stain_kwargs)
    output.mkdir(parents=True, exist_ok=True)
    staging, report = _Staging(), WatchReport()
    observer = _observer(folder, staging)
    observer.start()  # before the model loads (seconds): a file landing meanwhile is seen
    batch: list[Path] = []
    stopped_by: KeyboardInterrupt | None = None
    try:
        for path in sorted(folder.iterdir()):
            if existing or (since is not None and _modified_since(path, since)):
                staging.add(path)
        predictor = _load(model, settings)
        log(f"watching {folder} for new TIFF files; stained files go to {output} (Ctrl-C stops)")
        while stop is None or not stop.is_set():
            batch = staging.stable(settle)
            while batch:
                path = batch[0]
                written = _stain_one(
                    path, output, report, log, settle, model=predictor, **stain_kwargs
                )
                batch.pop(0)
                if written and on_written is not None:
                    on_written(path, written)
            time.sleep(poll)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM through the CLI
        stopped_by = exc
        log("interrupted: stopping")
    finally:
        observer.stop()
        observer.join(timeout=5)
    report.queued = sorted(set(batch) | set(staging.waiting()))
    log(
        f"stopped: {len(report.written)} file(s) stained, {len(report.notes)} not stained, "
        f"{len(report.queued)} still queued"
    )
    if report.queued:
        log("to stain the queued files:")
        log("  " + stain_command(report.queued, output, model, stain_kwargs))
    if stopped_by is not None and type(stopped_by) is not KeyboardInterrupt:
        raise stopped_by  # SIGTERM: the CLI exits with 143
    return report


def _check_watch(
    folder: Path, output: Path, model: Any, settle: float, poll: float, stain_kwargs: dict
) -> dict[str, Any]:
    """Everything `stain` would refuse for every file, refused once at startup (before torch is
    imported): the folders, unknown options, and the settings (`_params.check_settings`).
    Returns the settings with `stain_files`' defaults filled in."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"watch folder {folder} not found: create it or pass an existing folder"
        )
    if output.exists() and output.resolve() == folder.resolve():
        raise ValueError(
            f"output folder {output} is the watched folder: choose another -o "
            "(outputs would be stained again)"
        )
    if not (settle >= 0 and poll > 0):  # NaN too
        raise ValueError(f"settle must be >= 0 and poll > 0 seconds, got {settle} and {poll}")
    signature = inspect.signature(stain_files)
    for name in ("inputs", "output", "model", "quiet", "progress", "pattern", "scheduler"):
        if name in stain_kwargs:
            raise TypeError(f"watch_folder does not take {name}=")
    bound = signature.bind([], output, model=model, **stain_kwargs)  # unknown names: TypeError
    bound.apply_defaults()
    kw = bound.arguments
    probe = folder / "probe.tif"
    [(target, _fmt)] = plan_outputs([probe], output, kw["out_format"])  # e.g. --format
    if target.parent != output:
        raise ValueError(
            f"-o {output} names a file: watch writes NAME_dapi.ome.tif per input into a folder"
        )
    check_settings(
        model, kw["tile"], kw["overlap"], kw["samples"], kw["seed"], kw["pixel_size"], kw["steps"],
        kw["guidance"],
    )  # fmt: skip
    return kw


def _load(model: Any, kw: dict[str, Any]) -> Any:
    """The predictor, loaded once before the first file, and the tile grid it makes (the check
    `stain` makes after loading)."""
    from ._params import check_grid
    from ._threads import use_passive_wait

    use_passive_wait()  # before torch loads: OpenMP threads sleep, not spin (docs/engine.md)
    from .engine import get_predictor

    predictor = get_predictor(
        model, kw["steps"], kw["device"], texture=kw["texture"], guidance=kw["guidance"]
    )
    check_grid(predictor, kw["tile"], kw["overlap"])
    return predictor


def _modified_since(path: Path, since: float) -> bool:
    try:
        return path.stat().st_mtime >= float(since) - MTIME_SLACK
    except OSError:
        return False


#: `lcm-stain stain` flags for `stain_files` keywords, in the order `stain_command` writes them.
_FLAGS = {
    "steps": "--steps", "tile": "--tile", "overlap": "--overlap", "device": "--device",
    "pixel_size": "--pixel-size", "seed": "--seed", "guidance": "--guidance",
    "out_format": "--format",
}  # fmt: skip


def stain_command(files: list[Path], output: Path, model: Any, stain_kwargs: dict) -> str:
    """The `lcm-stain stain` command line that stains ``files`` as this watch would have."""
    name = str(model) if isinstance(model, (str, os.PathLike)) else "MODEL"
    argv = ["lcm-stain", "stain", *map(str, files), "-o", str(output), "--model", name]
    for key, flag in _FLAGS.items():
        value = stain_kwargs.get(key)
        if value is not None and value != "auto":
            argv += [flag, str(value)]
    argv += [f"--{key}" for key in ("texture", "overwrite") if stain_kwargs.get(key)]
    return shlex.join(argv)


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


#: `--guidance` of `lcm-stain stain` and `lcm-stain watch`.
GUIDANCE_HELP = (
    "guidance scale, for models trained for it (a guided LCM; a teacher trained with condition "
    "dropout): lower gives a faithful, softer stain, higher crisper, bolder nuclei; it costs "
    "nothing for a guided LCM. The range depends on the model (recorded in its checkpoint; a "
    "value outside it is refused with that range); models without guidance, such as Pix2Pix, "
    "accept only 1 (default: the model's own, recorded with each output)"
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
    p.add_argument("--guidance", type=float, default=None, metavar="G", help=GUIDANCE_HELP)
    p.add_argument("--existing", action="store_true", help="also stain the TIFFs already there")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def run_from_args(a: argparse.Namespace) -> int:
    since = time.time()  # files modified from now on are stained even before the watch starts
    names = ("model", "steps", "tile", "overlap", "device", "seed", "pixel_size", "overwrite")
    extra = ("existing", "settle", "texture", "guidance")
    options = {name: getattr(a, name) for name in names + extra}
    watch_folder(Path(a.folder), Path(a.output), out_format=a.format, since=since, **options)
    return 0
