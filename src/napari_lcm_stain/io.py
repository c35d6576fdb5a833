"""TIFF / OME-TIFF / (OME-)Zarr in and out, and `stain_files` behind `lcm-stain stain`.

Inputs are opened lazily (memory-mapped TIFF or zarr) and outputs are pre-allocated on disk
(memory-mapped OME-TIFF or zarr) and filled plane by plane, so an 8192² frame or a long stack
never has to exist twice in memory. Every output appears atomically: it is written under a
temporary name beside the target and renamed with `os.replace` when complete.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import glob
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from xml.sax.saxutils import escape as xml_escape

import numpy as np

from ._drain import drain
from ._version import __version__

TIFF_SUFFIXES = (".tif", ".tiff")
ZARR_SUFFIXES = (".zarr",)
_UNIT_TO_UM = {
    "µm": 1.0, "um": 1.0, "micron": 1.0, "micrometer": 1.0, "\\u00b5m": 1.0, "μm": 1.0,
    "nm": 1e-3, "nanometer": 1e-3, "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "centimeter": 1e4,
    "m": 1e6, "meter": 1e6,
}  # fmt: skip
#: Names that are files of another kind: `-o result.png` is a mistake, not a folder to create.
_OTHER_FILE_SUFFIXES = (
    ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".jp2", ".npy", ".npz", ".h5", ".hdf5",
    ".czi", ".nd2", ".lif", ".lsm", ".ims", ".vsi", ".svs", ".mrc", ".txt", ".csv", ".json",
    ".pdf", ".safetensors",
)  # fmt: skip
_DEFAULT_AXES = {2: "YX", 3: "ZYX", 4: "TZYX", 5: "TCZYX"}
#: Placeholder OME Description, replaced by the provenance once staining has finished.
_PENDING = "napari-lcm-stain: staining in progress"


# ----------------------------------------------------------------------------------------- read


def _unit_scale(unit: str | None) -> float | None:
    if unit is None:
        return 1.0
    return _UNIT_TO_UM.get(str(unit).strip().lower().replace("\u00b5", "µ"), None)


def _positive(raw) -> float | None:
    """`raw` as a positive finite number (a number written as text too), else None."""
    if isinstance(raw, bool):
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _ome_pixel_size(xml: str, notes: list[str] | None = None) -> tuple[float | None, float | None]:
    """(PhysicalSizeX, PhysicalSizeY) in µm; None where absent or unusable (a value that is not a
    positive number is treated as unknown, with a note in `notes`)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None, None
    for el in root.iter():
        if el.tag.endswith("Pixels") and "PhysicalSizeX" in el.attrib:
            return _ome_size(el.attrib, "X", notes), _ome_size(el.attrib, "Y", notes)
    return None, None


def _ome_size(attrib: dict, ax: str, notes: list[str] | None) -> float | None:
    if f"PhysicalSize{ax}" not in attrib:
        return None
    scale = _unit_scale(attrib.get(f"PhysicalSize{ax}Unit", "µm"))
    if scale is None:
        return None
    raw = attrib[f"PhysicalSize{ax}"]
    value = _positive(raw)
    if value is None:
        if notes is not None:
            notes.append(
                f"OME PhysicalSize{ax} {raw!r} is not a positive number: pixel size treated "
                "as unknown (give --pixel-size)"
            )
        return None
    return value * scale


def _tiff_pixel_size(tif, notes: list[str] | None = None) -> tuple[float | None, float | None]:
    """(X, Y) µm/px from OME PhysicalSizeX/Y, else ImageJ unit + X/YResolution, else a cm
    ResolutionUnit; (None, None) when unknown."""
    if tif.is_ome and tif.ome_metadata:
        x, y = _ome_pixel_size(tif.ome_metadata, notes)
        if x:
            return x, y
    page = tif.pages.first
    ij = tif.imagej_metadata or {}
    resunit = page.tags.get("ResolutionUnit")
    if "unit" in ij:
        scale = _unit_scale(ij["unit"])
    elif resunit is not None and int(resunit.value) == 3:  # centimeter
        scale = 1e4
    else:
        return None, None  # inch/none: usually a screen 72 dpi default, not a calibration
    x, y = (_resolution(page, f"{ax}Resolution") for ax in "XY")
    if not scale or x is None:
        return None, None
    return x * scale, None if y is None else y * scale


def _resolution(page, name: str) -> float | None:
    """Units per pixel from an X/YResolution tag (pixels per unit), None if absent or zero."""
    tag = page.tags.get(name)
    if tag is None:
        return None
    num, den = tag.value
    return den / num if num else None


def _data_end(series) -> tuple[int, int, str]:
    """(end of the pixel data its header promises, file size, file name) of the page of
    `series` whose data reach furthest past the end of its file; (0, 0, "") when all fit."""
    worst = (0, 0, "")
    for page in series.pages:
        if page is None:
            continue
        fh = page.parent.filehandle
        ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
        end = max(ends, default=0)
        if end - fh.size > worst[0] - worst[1]:
            worst = (end, fh.size, fh.name)
    return worst


def _promised_shape(tif) -> tuple[int, ...] | None:
    """The shape tifffile's own metadata (a file it wrote) gives its first series, if any: pages
    lost from a damaged file would otherwise leave a shorter series without a word."""
    md = tif.shaped_metadata[0] if tif.is_shaped and tif.shaped_metadata else None
    shape = md.get("shape") if isinstance(md, dict) else None
    if isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape):
        return tuple(shape)
    return None


def _unreadable(path: Path, e: BaseException) -> ValueError:
    return ValueError(
        f"cannot read {path}: the file is corrupt, truncated or not a TIFF "
        f"({type(e).__name__}: {e}); re-export or re-copy it"
    )


class _CheckedArray:
    """Lazy TIFF data whose decode errors (corrupt / truncated strips) name the file."""

    def __init__(self, arr, path: Path):
        self._arr, self._path = arr, path
        self.shape, self.dtype, self.ndim = arr.shape, arr.dtype, arr.ndim

    def __getitem__(self, key):
        try:
            return self._arr[key]
        except Exception as e:
            raise _unreadable(self._path, e) from e

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[...], dtype=dtype)


def _read_tiff(path: Path):
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, shape = series.axes, tuple(series.shape)
            notes: list[str] = []
            ps, ps_y = _tiff_pixel_size(tif, notes)
            end, size, name = _data_end(series)
            promised = _promised_shape(tif)
            rgb = series.keyframe.photometric == tifffile.PHOTOMETRIC.RGB
    except Exception as e:  # tifffile raises many kinds (IndexError, struct.error, ...)
        raise _unreadable(path, e) from e
    if end > size:
        where = path if name == path.name else f"{path} (its part {name})"
        raise ValueError(
            f"cannot read {where}: the file is truncated ({size} bytes, but its header places "
            f"pixel data up to byte {end}); copy it again or re-export it"
        )
    if promised is not None and math.prod(promised) != math.prod(shape):
        raise ValueError(
            f"cannot read {path}: the file is truncated or damaged (its metadata promises shape "
            f"{promised}, but only {shape} can be read); copy it again or re-export it"
        )
    try:  # uncompressed, contiguous: a read-only memory map is lazy and free
        arr = tifffile.memmap(path, mode="r")
        if tuple(arr.shape) != shape:
            raise ValueError("memmap shape differs from the series shape")
        handle = None
    except ValueError:  # compressed / tiled: read through the zarr interface, chunk by chunk
        import zarr

        handle = tifffile.TiffFile(path)
        arr = _CheckedArray(zarr.open(handle.series[0].aszarr(), mode="r"), path)
    return arr, {
        "pixel_size": ps,
        "pixel_size_y": ps_y,
        "axes": axes,
        "_rgb": rgb,
        "path": str(path),
        "format": "tiff",
        "notes": notes,
        "_handle": handle,
    }


def _ngff_attrs(attrs: dict):
    """The first OME-NGFF `multiscales` entry (as found: `_read_ngff` checks it), or None."""
    ome = attrs.get("ome")
    ms = attrs.get("multiscales") or (ome.get("multiscales") if isinstance(ome, dict) else None)
    if not ms:
        return None
    return ms[0] if isinstance(ms, list) else ms


def _bad_zarr(path: Path, what: str) -> ValueError:
    return ValueError(f"cannot read {path}: {what}; fix its metadata (.zattrs) or export it again")


def _read_ngff(path: Path, node, ms) -> tuple:
    """(array, axes, X and Y µm/px) of an OME-NGFF group's full-resolution dataset."""
    import zarr

    datasets = ms.get("datasets") if isinstance(ms, dict) else None
    if not (isinstance(datasets, list) and datasets and isinstance(datasets[0], dict)):
        raise _bad_zarr(
            path, "its OME-NGFF 'multiscales' metadata has no 'datasets' (the arrays it lists)"
        )
    ds = datasets[0]
    arr = node.get(str(ds.get("path")))
    if not isinstance(arr, zarr.Array):
        raise _bad_zarr(path, f"its 'multiscales' dataset path {ds.get('path')!r} is not an array")
    ax = ms.get("axes") if isinstance(ms.get("axes"), list) else []
    names = [a.get("name", "?") if isinstance(a, dict) else str(a) for a in ax]
    axes = "".join(str(n)[:1].upper() for n in names) if len(names) == arr.ndim else None
    ps = ps_y = None
    transforms = ds.get("coordinateTransformations")
    for tr in transforms if isinstance(transforms, list) else []:
        if not (isinstance(tr, dict) and tr.get("type") == "scale"):
            continue
        scale = tr.get("scale")
        values = [_positive(v) for v in scale] if isinstance(scale, list) else []
        if len(values) != arr.ndim or None in values:
            raise _bad_zarr(
                path, f"its scale {scale!r} is not a list of {arr.ndim} positive numbers, one "
                "per axis",
            )  # fmt: skip
        um = [_unit_scale(a["unit"]) if isinstance(a, dict) and a.get("unit") else None for a in ax]
        if um and um[-1]:
            ps = values[-1] * um[-1]
        if len(um) >= 2 and len(values) >= 2 and um[-2]:
            ps_y = values[-2] * um[-2]
    return arr, axes, ps, ps_y


def _read_zarr(path: Path):
    import zarr

    node = zarr.open(str(path), mode="r")
    ps = ps_y = axes = None
    attrs = dict(node.attrs)
    if isinstance(node, zarr.Group):
        ms = _ngff_attrs(attrs)
        if ms:
            arr, axes, ps, ps_y = _read_ngff(path, node, ms)
        else:
            arrays = list(node.array_keys())
            if len(arrays) != 1:
                raise ValueError(
                    f"{path} is a zarr group without OME-NGFF 'multiscales' metadata and with "
                    f"{len(arrays)} arrays: point to the array itself (e.g. {path}/<name>)"
                )
            arr = node[arrays[0]]
    else:
        arr = node
        if "pixel_size" in attrs:
            ps = _positive(attrs["pixel_size"])
            if ps is None:
                raise _bad_zarr(
                    path, f"its pixel_size {attrs['pixel_size']!r} is not a positive number (µm/px)"
                )
        axes = attrs.get("axes") if isinstance(attrs.get("axes"), str) else None
    return arr, {
        "pixel_size": ps,
        "pixel_size_y": ps_y,
        "axes": axes,
        "path": str(path),
        "format": "zarr",
        "_handle": None,
    }


def _is_zarr_path(p: Path) -> bool:
    return p.suffix.lower() in ZARR_SUFFIXES or (
        p.is_dir() and any((p / n).exists() for n in (".zarray", ".zgroup", "zarr.json"))
    )


def read_image(path):
    """Open a TIFF / OME-TIFF / zarr / OME-Zarr image lazily.

    Returns `(array, metadata)`: metadata has `pixel_size` (µm/px or None), `axes` (e.g. "ZYX"),
    `path` and `format`.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"input not found: {p}")
    if _is_zarr_path(p):
        arr, meta = _read_zarr(p)
    elif p.suffix.lower() in TIFF_SUFFIXES:
        arr, meta = _read_tiff(p)
    else:
        raise ValueError(f"cannot read {p}: expected a .tif/.tiff (OME-)TIFF or a .zarr store")
    axes = meta.get("axes")
    meta.setdefault("notes", [])
    rgb = meta.pop("_rgb", False)
    why = None
    if axes and len(axes) == arr.ndim and not axes.endswith("YX") and arr.shape[-1] not in (3, 4):
        why = (
            f"{p} has axes {axes} (shape {tuple(arr.shape)}): its last axis "
            f"({axes[-1]}, {arr.shape[-1]} per pixel) is not a plane axis, and a qOBM phase image "
            "has one sample per pixel; save each channel as its own image (e.g. img[..., 0])"
        )
    elif axes and len(axes) == arr.ndim and "S" in axes[:-2]:  # planar configuration
        n = arr.shape[axes.index("S")]
        kind = "an RGB image" if rgb else f"an image with {n} samples per pixel"
        why = (
            f"{p} is {kind} stored as separate colour planes (axes {axes}, shape "
            f"{tuple(arr.shape)}): qOBM phase is one channel; convert it first (e.g. "
            "skimage.color.rgb2gray(img, channel_axis=0)) or save one plane (img[0])"
        )
    if why is not None:
        if meta.get("_handle") is not None:
            meta["_handle"].close()
        raise ValueError(why)
    if not axes or len(axes) != arr.ndim:
        meta["axes"] = _DEFAULT_AXES.get(arr.ndim)
    return arr, meta


# ---------------------------------------------------------------------------------------- write


def _ome_axes(axes: str | None, ndim: int) -> str:
    """Input axes if OME-TIFF can store them (T/Z/C + YX), else a default for the rank."""
    if axes and len(axes) == ndim and axes.endswith("YX") and set(axes[:-2]) <= set("TZC"):
        if len(set(axes)) == len(axes):
            return axes
    return _DEFAULT_AXES[ndim]


def _ome_metadata(shape, metadata: dict | None, description: str | None) -> dict:
    metadata = metadata or {}
    md = {"axes": _ome_axes(metadata.get("axes"), len(shape))}
    ps, ps_y = _out_pixel_sizes(metadata)
    if ps:
        md.update(PhysicalSizeX=ps, PhysicalSizeY=ps_y)
        md.update(PhysicalSizeXUnit="µm", PhysicalSizeYUnit="µm")
    if description:
        md["Description"] = description
    return md


def _out_pixel_sizes(metadata: dict) -> tuple[float | None, float | None]:
    """(X, Y) µm/px to write: `pixel_size`, and `pixel_size_y` where given (else square)."""
    ps = metadata.get("pixel_size")
    if not ps:
        return None, None
    return float(ps), float(metadata.get("pixel_size_y") or ps)


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _backup_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.old-{os.getpid()}")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif os.path.lexists(p):
        p.unlink()


#: Names a zarr store keeps its metadata in; chunk keys (`0.0`, `0/1`, v3 `c/`) of an array root.
_ZARR_META = (".zgroup", ".zattrs", ".zarray", ".zmetadata", "zarr.json")
_CHUNK_KEY = re.compile(r"c|\d+(\.\d+)*")


def _zarr_node(folder: Path) -> str | None:
    """'array' or 'group' for a zarr v2/v3 node folder, else None."""
    if (folder / ".zarray").is_file():
        return "array"
    if (folder / ".zgroup").is_file():
        return "group"
    try:
        node = json.loads((folder / "zarr.json").read_text(encoding="utf-8")).get("node_type")
    except (OSError, ValueError, AttributeError):
        return None
    return node if node in ("array", "group") else None


def _foreign_entries(folder: Path) -> list[str]:
    """Entries of a zarr folder that are not zarr data (a user's notes.txt): never deleted."""
    array = _zarr_node(folder) == "array"
    other = []
    for c in sorted(folder.iterdir(), key=lambda c: c.name):
        if c.name in _ZARR_META or (array and _CHUNK_KEY.fullmatch(c.name)):
            continue
        if c.is_dir() and not c.is_symlink() and _zarr_node(c) is not None:
            continue  # an array or group of the store
        other.append(c.name)
    return other


def _written_by_us(folder: Path) -> bool:
    for name in (".zattrs", "zarr.json"):
        try:
            attrs = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if name == "zarr.json" and isinstance(attrs, dict):
            attrs = attrs.get("attributes")
        if isinstance(attrs, dict) and "napari_lcm_stain" in attrs:
            return True
    return False


def check_replaceable(path, overwrite: bool = False) -> None:
    """Refuse an output that would destroy what is not ours to replace.

    A file named `*.zarr`, a folder that is not a zarr store (or is the target of an OME-TIFF)
    are never replaced. A zarr store that this plugin did not write, or that holds other files
    (a user's notes.txt), is replaced only with `overwrite`, and then only its zarr data: the
    other files are moved into the new store. An existing file or our own store passes here
    (`stain_files` still asks for `overwrite` for those).
    """
    path = Path(path)
    zarr_target = path.suffix.lower() in ZARR_SUFFIXES
    if not os.path.lexists(path) or (path.is_file() and not zarr_target):
        return
    if not path.is_dir():
        raise ValueError(
            f"{path} is a file, not an OME-Zarr folder: it is never replaced (not even with "
            "--overwrite); remove it yourself or choose another name"
        )
    if not any(path.iterdir()):
        return  # an empty folder: nothing to lose
    if not zarr_target or _zarr_node(path) is None:
        kind = "not a zarr store" if zarr_target else "a folder, not an OME-TIFF file"
        raise ValueError(
            f"{path} is {kind}: it is never replaced (not even with --overwrite); choose "
            "another name"
        )
    other = _foreign_entries(path)
    if overwrite:
        return
    if other:
        shown = ", ".join(other[:3]) + (", …" if len(other) > 3 else "")
        raise ValueError(
            f"{path} holds files that are not zarr data ({shown}): pass --overwrite "
            "(overwrite=True) to replace only its zarr data (those files are kept), or choose "
            "another name"
        )
    if not _written_by_us(path):
        raise ValueError(
            f"{path} is a zarr store that napari-lcm-stain did not write: pass --overwrite "
            "(overwrite=True) to replace it, or choose another name"
        )


def _carry_over(old: Path, new: Path) -> None:
    """Move the non-zarr files of a replaced store `old` into the new one, then delete `old`.

    A file that cannot be moved is never deleted: `old` is kept as NAME.previous-N, with a warning.
    """
    left = []
    for name in _foreign_entries(old):
        try:
            os.replace(old / name, new / name)
        except OSError:
            left.append(name)
    if not left:
        _remove(old)
        return
    n = 1
    while os.path.lexists(new.with_name(f"{new.name}.previous-{n}")):
        n += 1
    keep = new.with_name(f"{new.name}.previous-{n}")
    os.replace(old, keep)
    warnings.warn(f"could not move {', '.join(left)} into {new}: kept in {keep}", stacklevel=3)


def _pid_alive(pid: int) -> bool:
    """True unless `pid` is certainly not running (on Windows always True: never guess)."""
    if pid == os.getpid() or os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, someone else's
        return True
    return True


def remove_stale_temps(targets) -> list[Path]:
    """Delete `.NAME.tmp-PID` files of dead PIDs beside each target (left by a killed run).

    A `.NAME.old-PID` backup of a dead run is deleted when NAME exists, and put back as NAME when
    it does not (the run died between moving the old output aside and renaming the new one in).
    """
    removed = []
    for t in targets:
        t = Path(t)
        if not t.parent.is_dir():
            continue
        for kind in ("tmp", "old"):
            for c in t.parent.glob(f".{glob.escape(t.name)}.{kind}-*"):
                pid = c.name.rsplit("-", 1)[1]
                if not pid.isdigit() or _pid_alive(int(pid)):
                    continue
                if kind == "old" and not os.path.lexists(t):
                    os.replace(c, t)
                    continue
                _remove(c)
                removed.append(c)
    return removed


def _reserve(path: Path, offset: int, nbytes: int) -> None:
    """Allocate the data region of a new file now, so a full disk is an OSError (ENOSPC) here.

    A sparse file filled through mmap would instead die with SIGBUS on the first page the disk
    cannot hold.
    """
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), offset, nbytes)
            return
        except AttributeError:  # no posix_fallocate (macOS, Windows): write the zeros
            pass
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
        f.seek(offset)
        chunk = bytes(min(nbytes, 1 << 24))
        left = nbytes
        while left > 0:
            left -= f.write(chunk[: min(left, len(chunk))])
        f.flush()
        os.fsync(f.fileno())


def _create_tiff(path: Path, shape, metadata, description) -> np.memmap:
    import tifffile

    offset, _first_page_bytes = tifffile.imwrite(
        path,
        data=None,
        shape=shape,
        dtype=np.float32,
        align=tifffile.TIFF.ALLOCATIONGRANULARITY,
        returnoffset=True,
        ome=True,
        metadata=_ome_metadata(shape, metadata, description),
    )
    _reserve(path, offset, int(np.prod(shape)) * 4)  # the pages are contiguous (as memmap needs)
    return np.memmap(path, np.float32, "r+", offset, shape)


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT / SIGTERM back until the block has finished, then deliver the first one.

    Python runs signal handlers in the main thread only, so (unlike `pthread_sigmask`, which the
    kernel bypasses by delivering to another thread, e.g. one of torch's) swapping the handlers
    there defers them reliably. Elsewhere this is a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    sigs = [signal.SIGINT] + ([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])
    old = {s: signal.getsignal(s) for s in sigs}
    old = {s: h for s, h in old.items() if h is not None}  # None: set outside Python, leave it
    for s in old:
        signal.signal(s, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if got:
            signal.raise_signal(got[0])


def commit_together(outputs) -> list[Path]:
    """Rename finished outputs into place all together or not at all.

    Signals wait until the renames are done; if a rename fails, the outputs already renamed are
    taken back and the previous files are restored (the temp files are left for `abort`).
    """
    outputs = list(outputs)
    for o in outputs:
        o.finish()
    backups: dict[int, Path] = {}
    done: list[int] = []
    with _signals_deferred():
        try:
            for i, o in enumerate(outputs):
                last = i == len(outputs) - 1
                if o.path.is_dir() and not o.path.is_symlink():
                    backups[i] = _backup_path(o.path)  # a directory cannot be replaced in one go
                    _remove(backups[i])
                    os.replace(o.path, backups[i])
                elif not last and o.path.is_file():
                    backups[i] = _backup_path(o.path)  # a hard link: the old file stays in place
                    _remove(backups[i])
                    _link_or_copy(o.path, backups[i])
                os.replace(o.tmp, o.path)
                done.append(i)
        except BaseException:
            for i, o in enumerate(outputs):
                if i in done:
                    os.replace(o.path, o.tmp)
                if i in backups and os.path.lexists(backups[i]):
                    if os.path.lexists(o.path):  # never renamed: the old file is still in place
                        _remove(backups[i])
                    else:
                        os.replace(backups[i], o.path)
            raise
        for i, b in backups.items():
            if b.is_dir() and not b.is_symlink():
                _carry_over(b, outputs[i].path)  # a user's files in a replaced OME-Zarr
            else:
                _remove(b)
    return [o.path for o in outputs]


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


class OutputImage:
    """A pre-allocated float32 output on disk (OME-TIFF memmap or OME-Zarr), renamed on commit.

    The TIFF's data region is allocated when it is created, so a full disk fails here with
    `[Errno 28]`, not later inside the memory map.
    """

    def __init__(self, path, shape, metadata=None, description=None, fmt="tiff", chunk=1024):
        self.path = Path(path)
        self.tmp = _tmp_path(self.path)
        self.fmt = fmt
        _remove(self.tmp)
        shape = tuple(int(s) for s in shape)
        if fmt not in ("tiff", "zarr"):
            raise ValueError(f"output format must be 'tiff' or 'zarr', got {fmt!r}")
        try:
            if fmt == "tiff":
                self.array = _create_tiff(self.tmp, shape, metadata, description)
            else:
                self.array = _create_ome_zarr(self.tmp, shape, metadata, description, chunk)
        except BaseException:
            self.array = None
            _remove(self.tmp)  # e.g. disk full: no half-created temp file left behind
            raise

    def finish(self) -> None:
        """Flush the data and let go of the memory map (before the rename)."""
        if self.fmt == "tiff" and self.array is not None:
            self.array.flush()
        self.array = None

    def commit(self) -> Path:
        try:
            return commit_together([self])[0]
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        self.array = None
        _remove(self.tmp)


def _create_ome_zarr(path: Path, shape, metadata, description, chunk):
    import zarr

    metadata = metadata or {}
    axes = _ome_axes(metadata.get("axes"), len(shape)).lower()
    ps, ps_y = _out_pixel_sizes(metadata)
    kind = {"t": "time", "c": "channel"}
    ax = []
    for a in axes:
        d = {"name": a, "type": kind.get(a, "space")}
        if a in "yx" and ps:
            d["unit"] = "micrometer"
        ax.append(d)
    scale = [1.0] * (len(shape) - 2) + ([ps_y, ps] if ps else [1.0, 1.0])
    g = zarr.open_group(str(path), mode="w", zarr_format=2)
    chunks = (1,) * (len(shape) - 2) + (min(chunk, shape[-2]), min(chunk, shape[-1]))
    arr = g.create_array("0", shape=shape, chunks=chunks, dtype="float32", fill_value=0.0)
    g.attrs.update(
        {
            "multiscales": [
                {
                    "version": "0.4",
                    "name": path.name,
                    "axes": ax,
                    "datasets": [
                        {
                            "path": "0",
                            "coordinateTransformations": [{"type": "scale", "scale": scale}],
                        }
                    ],
                }
            ],
            "napari_lcm_stain": {"description": description or ""},
        }
    )
    return arr


def write_image(path, array, metadata=None, description=None, fmt=None, overwrite=False) -> Path:
    """Write float32 OME-TIFF (or OME-Zarr for a .zarr path) atomically, metadata copied.

    An existing file, or an OME-Zarr this plugin wrote, is replaced; other folders are refused
    unless `overwrite` (see `check_replaceable`).
    """
    path = Path(path)
    check_replaceable(path, overwrite)
    fmt = fmt or ("zarr" if path.suffix.lower() in ZARR_SUFFIXES else "tiff")
    arr = np.asarray(array, dtype=np.float32)
    if fmt == "tiff":
        import tifffile

        tmp = _tmp_path(path)
        try:
            tifffile.imwrite(
                tmp, arr, ome=True, metadata=_ome_metadata(arr.shape, metadata, description)
            )
            os.replace(tmp, path)
        finally:
            _remove(tmp)
        return path
    out = OutputImage(path, arr.shape, metadata, description, fmt)
    try:
        out.array[...] = arr
    except BaseException:
        out.abort()
        raise
    return out.commit()


# ---------------------------------------------------------------------------------- stain_files


class ProgressBar:
    """A one-line text progress bar on stderr (throttled), for the CLI."""

    def __init__(self, label: str, stream=None, width: int = 30, interval: float = 0.2):
        self.label, self.width, self.interval = label, width, interval
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self._last = -1.0
        self._open = False  # a bar line is drawn without its newline

    def end(self) -> None:
        """Finish a half-drawn bar line, so an error message starts on its own line."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done < total and now - self._last < self.interval:
            return
        self._last = now
        frac = done / total if total else 1.0
        bar = "#" * int(frac * self.width)
        el = now - self.t0
        eta = f" eta {el / frac - el:5.0f}s" if 0 < frac < 1 else ""
        self.stream.write(
            f"\r{self.label} [{bar:<{self.width}}] {100 * frac:3.0f}% {done}/{total} tiles {el:6.1f}s{eta}"
        )
        self._open = done < total
        if not self._open:
            self.stream.write("\n")
        self.stream.flush()


#: Name words of files a folder holds beside its qOBM images: DAPI, labels, our own outputs.
_SKIP_WORDS = {
    "dapi", "nuclei", "nucleus", "label", "labels", "mask", "masks", "seg", "segmentation",
    "distractors", "gt", "groundtruth",
}  # fmt: skip


def _skip_reason(p: Path) -> str | None:
    """Why a file found in a folder is not a qOBM image to stain (None: stain it)."""
    words = set(re.split(r"[^a-z0-9]+", _stem(p).lower()))
    if words & _SKIP_WORDS:
        return "named like a DAPI, label or lcm-stain output image"
    try:
        arr, meta = read_image(p)
    except (OSError, ValueError):
        return None  # unreadable: staining it reports the problem with the file's name
    handle = meta.pop("_handle", None)
    try:
        if np.dtype(arr.dtype).kind not in "biu" or arr.ndim < 2:
            return None
        first = np.asarray(arr[(0,) * (arr.ndim - 2)])
        if first.size and first.min() >= 0 and np.mean(first == 0) >= 0.2:
            return "an integer label image (mostly 0, non-negative)"
        return None
    except (OSError, ValueError):
        return None
    finally:
        if handle is not None:
            handle.close()


def _is_image_path(p: Path) -> bool:
    return _is_zarr_path(p) or p.suffix.lower() in TIFF_SUFFIXES


def _folder_images(folder: Path, pattern: str | None, notes: list[str]) -> list[Path]:
    """A folder's images, by `pattern` (a glob on names) or without DAPI / label / output files."""
    found = sorted(c for c in folder.iterdir() if _is_image_path(c))
    if pattern is not None:
        hits = [c for c in found if fnmatch.fnmatch(c.name, pattern)]
        if not hits:
            raise FileNotFoundError(
                f"no .tif/.tiff/.zarr images in folder {folder} match {pattern!r}"
            )
        return hits
    keep = []
    for c in found:
        why = _skip_reason(c)
        if why is None:
            keep.append(c)
        else:
            notes.append(f"skipped {c}: {why}; choose files with --pattern")
    if found and not keep:
        raise FileNotFoundError(
            f"no qOBM images in folder {folder}: its {len(found)} image(s) look like DAPI, label "
            "or output images; name the files, or choose them with --pattern"
        )
    if not found:
        raise FileNotFoundError(f"no .tif/.tiff/.zarr images in folder {folder}")
    return keep


def _expand_inputs(
    inputs, pattern: str | None = None, notes: list[str] | None = None
) -> list[Path]:
    """Files from paths, folders and globs. A path that exists is taken as it is, even when its
    name has glob characters (`scan[1].tif`); skipped folder entries are noted in `notes`."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    notes = [] if notes is None else notes
    files: list[Path] = []
    for item in inputs:
        s = str(item)
        p = Path(s)
        if not p.exists() and any(c in s for c in "*?["):
            hits = sorted(Path(h) for h in glob.glob(s))
            if not hits:
                raise FileNotFoundError(f"no files match {s!r}")
            files += [h for h in hits if _is_image_path(h)]
            continue
        if not p.exists():
            raise FileNotFoundError(f"input not found: {p}")
        if p.is_dir() and not _is_zarr_path(p):
            files += _folder_images(p, pattern, notes)
        else:
            files.append(p)
    seen, out = set(), []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            out.append(f)
    if not out:
        raise FileNotFoundError("no .tif/.tiff/.zarr inputs found")
    return out


def _stem(p: Path) -> str:
    name = p.name
    for suf in (".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".zarr"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return p.stem


def _is_file_target(p: Path) -> bool:
    return p.suffix.lower() in TIFF_SUFFIXES + ZARR_SUFFIXES


def _std_path(p: Path) -> Path:
    name = p.name
    for suf in (".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".zarr"):
        if name.lower().endswith(suf):
            return p.with_name(name[: -len(suf)] + "_std" + name[-len(suf) :])
    return p.with_name(name + "_std")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def plan_outputs(
    files: list[Path], output: Path, out_format: str = "auto"
) -> list[tuple[Path, str]]:
    """Output path and format ('tiff' | 'zarr') for each input."""
    if out_format not in ("auto", "tiff", "zarr"):
        raise ValueError(f"format must be auto, tiff or zarr, got {out_format!r}")
    output = Path(output)
    if output.suffix.lower() in _OTHER_FILE_SUFFIXES and not output.is_dir():
        raise ValueError(
            f"cannot write {output.name}: lcm-stain stain writes OME-TIFF or OME-Zarr; name the "
            f"output {_stem(output)}.ome.tif (or .ome.zarr), or give a folder"
        )
    if _is_file_target(output) and (not output.is_dir() or _is_zarr_path(output)):
        if len(files) > 1:
            raise ValueError(
                f"{len(files)} inputs cannot all be written to one file {output}: give a folder with -o"
            )
        fmt = "zarr" if output.suffix.lower() in ZARR_SUFFIXES else "tiff"
        if out_format != "auto" and out_format != fmt:
            raise ValueError(
                f"--format {out_format} conflicts with the output name {output.name}: "
                f"use a {'.zarr' if out_format == 'zarr' else '.ome.tif'} name or drop --format"
            )
        return [(output, fmt)]
    plan = []
    for f in files:
        fmt = out_format
        if fmt == "auto":
            fmt = "zarr" if _is_zarr_path(f) else "tiff"
        ext = ".ome.zarr" if fmt == "zarr" else ".ome.tif"
        plan.append((output / f"{_stem(f)}_dapi{ext}", fmt))
    first: dict[Path, Path] = {}
    for f, (o, _fmt) in zip(files, plan):
        if o in first:
            raise ValueError(
                f"inputs {first[o]} and {f} would both be written to {o}: stain them into "
                "separate -o folders, or rename one"
            )
        first[o] = f
    return plan


def _provenance(info: dict, source: Path, kind: str, samples: int) -> str:
    prov = {
        "software": "napari-lcm-stain",
        "version": __version__,
        "content": kind,
        "source": str(source),
        **{k: info.get(k) for k in ("model", "checkpoint", "steps", "seed", "samples", "tile")},
        "texture": info.get("texture"),
        "guidance": info.get("guidance"),
        "overlap": info.get("overlap"),
        **{k: info.get(k) for k in ("pixel_size", "model_pixel_size", "rescale", "warnings")},
        "pixel_size_estimated": info.get("pixel_size_estimated"),
    }
    if kind == "std":
        prov["note"] = f"per-pixel standard deviation of {samples} one-step samples (ddof=1)"
    return json.dumps(prov)


class BatchError(ValueError):
    """Some inputs of a batch failed (the others were written): `failed` holds (path, error)."""

    def __init__(self, failed: list[tuple[Path, BaseException]], written: list[Path], total: int):
        self.failed, self.written = failed, written
        names = "; ".join(f"{f}: {e}" for f, e in failed)
        super().__init__(
            f"{len(failed)} of {total} inputs failed (the other outputs were written): {names}"
        )


def _model_label(model, info: dict, pred) -> str:
    """'LCM-1' for a packaged model; 'fine-tuned LCM-1 from ft.safetensors' for a checkpoint."""
    name = info.get("model", "model")
    if _checkpoint(model):
        tuned = "fine-tuned " if "finetune" in (getattr(pred, "config", None) or {}) else ""
        return f"{tuned}{name} from {Path(model).name}"
    return name


def _checkpoint(model) -> str | None:
    """The checkpoint file `model` names (None for a packaged name or a loaded predictor)."""
    if isinstance(model, (str, os.PathLike)) and str(model).lower() not in (
        "lcm", "pix2pix", "teacher",
    ):  # fmt: skip
        return str(Path(model).resolve())
    return None


def _targets(plan, samples: int) -> list[Path]:
    return [t for o, _fmt in plan for t in [o] + ([_std_path(o)] if samples > 1 else [])]


def _check_targets(targets: list[Path], files: list[Path], overwrite: bool) -> None:
    for t in targets:
        if any(_same_file(t, i) for i in files):
            raise ValueError(f"output {t} is one of the inputs: choose another -o")
        check_replaceable(t, overwrite)
        if t.exists() and not overwrite:
            raise FileExistsError(
                f"{t} exists: pass --overwrite to replace it, or choose another -o"
            )


def stain_files(
    inputs,
    output,
    model="lcm",
    steps=None,
    tile=512,
    overlap=32,
    device="auto",
    pixel_size=None,
    samples=1,
    seed=0,
    overwrite=False,
    out_format="auto",
    scheduler=None,
    progress: Callable[[int, int], None] | None = None,
    quiet: bool = False,
    pattern: str | None = None,
    texture: bool = False,
    guidance: float | None = None,
) -> list[Path]:
    """Stain files / folders / globs; write OME-TIFF or OME-Zarr (+ `_std` with samples > 1).

    Everything is checked before anything is created: the outputs (an output that is an input is
    refused, two inputs may not share an output, an existing output needs `overwrite=True`) and
    the settings (tile, model, device). Folders skip DAPI / label / output images unless
    `pattern` (a glob on file names) picks the files. In a batch, an input that fails is named
    and skipped; a `BatchError` listing the failures is raised at the end. `texture`: True
    draws a texture decoder's grain (default: the smooth mean; see `engine.iter_stain`).
    `guidance`: the guidance scale of a model trained for it (None: the model's default; checked
    against the range in the model's config before torch is imported; see `engine.iter_stain`).
    """
    from ._params import check_grid, check_settings

    clock = time.perf_counter()
    say = (lambda msg: None) if quiet else print
    notes: list[str] = []
    files = _expand_inputs(inputs, pattern, notes)
    plan = plan_outputs(files, Path(output), out_format)
    targets = _targets(plan, samples)
    for t in remove_stale_temps(targets):  # first: a restored previous output needs --overwrite
        notes.append(f"removed {t}, a temporary file left by a stopped run")
    _check_targets(targets, files, overwrite)
    check_settings(model, tile, overlap, samples, seed, pixel_size, steps, guidance)  # before torch
    from .engine import get_predictor

    pred = None
    if scheduler is None:
        pred = get_predictor(model, steps, device, texture=texture, guidance=guidance)
    if pred is not None:  # e.g. an overlap that leaves no stride: before any output exists
        check_grid(pred, tile, overlap)
    for note in notes:
        say(f"note: {note}")
    Path(plan[0][0]).parent.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    failed: list[tuple[Path, BaseException]] = []
    for n, (f, (o, fmt)) in enumerate(zip(files, plan), 1):
        bar = progress or (ProgressBar(f"[{n}/{len(files)}] {f.name}") if not quiet else None)
        try:
            paths, info = _stain_one(
                f, o, fmt, pred if pred is not None else model, bar,
                steps=steps, tile=tile, overlap=overlap, device=device, seed=seed,
                pixel_size=pixel_size, samples=samples, scheduler=scheduler,
                checkpoint=_checkpoint(model), texture=texture, guidance=guidance,
            )  # fmt: skip
        except (ValueError, TypeError) as e:
            if len(files) == 1:
                raise
            failed.append((f, e))
            if not quiet:
                print(f"lcm-stain stain: skipped {f}: {e}", file=sys.stderr, flush=True)
            continue
        written += paths
        now = time.perf_counter()
        label = _model_label(model, info, pred)
        say(
            f"wrote {', '.join(str(w) for w in paths)} ({label}, {info['planes']} plane(s), "
            f"{now - clock:.1f} s)"
        )
        clock = now
        for w in info["warnings"]:
            say(f"  note: {w}")
    if failed:
        raise BatchError(failed, written, len(files))
    return written


def _stain_one(f: Path, o: Path, fmt: str, model, bar, *, pixel_size, samples, **kw):
    """Stain one file into `o` (and its `_std`); both outputs are committed together or neither."""
    from .engine import estimate_input_pixel_size, iter_stain, rescale_factor, validate_image

    arr, meta = read_image(f)
    handle = meta.pop("_handle", None)
    outs: list[OutputImage] = []
    caught: list[warnings.WarningMessage] = []
    info: dict = {}
    try:
        validate_image(arr)  # e.g. an RGB TIFF: the engine's message, before any output
        if pixel_size is not None:
            ps, source = pixel_size, "--pixel-size"
        else:
            ps, source = meta.get("pixel_size"), f"the metadata of {f.name}"
            arr = _square_pixels(arr, meta, f.name)
            if ps is None:  # no metadata: read the scale from the image (a note says so)
                try:
                    ps, note = estimate_input_pixel_size(arr)
                    source = f"the pixel-size estimator ({f.name} has no pixel size)"
                    meta["notes"].append(note)
                except ValueError:  # nothing to read a scale from: the engine says why
                    ps = None
        rescale_factor(ps, getattr(model, "pixel_size", None), source)  # before any output
        shape = tuple(int(s) for s in arr.shape)
        out_meta = {"pixel_size": ps, "axes": meta.get("axes")}  # square pixels now
        try:
            outs.append(OutputImage(o, shape, out_meta, _PENDING, fmt))
            if samples > 1:
                outs.append(OutputImage(_std_path(o), shape, out_meta, _PENDING, fmt))
            gen = iter_stain(
                arr, model, kw["steps"], kw["tile"], kw["overlap"], kw["device"], kw["seed"],
                ps, samples, out=outs[0].array, out_std=outs[1].array if samples > 1 else None,
                scheduler=kw["scheduler"], pixel_size_source=source, texture=kw["texture"],
                guidance=kw["guidance"],
            )  # fmt: skip
            # the engine's warnings are printed once, as notes under the "wrote" line
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = drain(gen, None if bar is None else lambda ev, b=bar: b(*ev))
            warned = meta["notes"] + result.info["warnings"]
            info = {**result.info, "warnings": warned, "checkpoint": kw["checkpoint"]}
            for out, kind in zip(outs, ("mean", "std")):
                _set_description(out, _provenance(info, f, kind, samples))
            return commit_together(outs), info
        except BaseException:
            if hasattr(bar, "end"):
                bar.end()
            for out in outs:
                out.abort()
            raise
    finally:
        if handle is not None:
            handle.close()
        for w in caught:  # other warnings (not our notes) still reach the user
            if str(w.message) not in info.get("warnings", []):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


class _SquarePixels:
    """A lazy view of an image whose pixels are `factor` times as tall as wide, its Y axis
    resampled (plane by plane, as planes are read) so that its pixels are square."""

    def __init__(self, arr, factor: float):
        self._arr = arr
        h, w = (int(s) for s in arr.shape[-2:])
        self.shape = tuple(int(s) for s in arr.shape[:-2]) + (max(1, round(h * factor)), w)
        self.dtype, self.ndim = np.dtype(np.float32), len(self.shape)

    def __getitem__(self, key):
        from .engine import _resize

        key = () if key is Ellipsis else key if isinstance(key, tuple) else (key,)
        lead = self.ndim - 2
        if len(key) > lead or not all(isinstance(k, (int, np.integer)) for k in key):
            return self[()][key]  # rarely used: any other index resamples every plane first
        block = np.asarray(self._arr[key] if key else self._arr[...], dtype=np.float32)
        out = np.empty(block.shape[:-2] + self.shape[-2:], np.float32)
        for i in np.ndindex(*block.shape[:-2]):
            out[i] = _resize(block[i], self.shape[-2:])
        return out

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[()], dtype=dtype)


def _square_pixels(arr, meta: dict, name: str):
    """`arr`, or a view of it with square pixels of the X size when the file's Y pixel size
    differs (> 1 %); a note says so. An implausible ratio (beyond the rescale range) is refused.
    """
    from .engine import PIXEL_SIZE_TOLERANCE, RESCALE_RANGE

    x, y = meta.get("pixel_size"), meta.get("pixel_size_y")
    if not x or not y or abs(y / x - 1.0) <= PIXEL_SIZE_TOLERANCE:
        return arr
    factor = y / x
    lo, hi = RESCALE_RANGE
    if not lo <= factor <= hi:
        raise ValueError(
            f"{name} has pixels of Y {y:g} by X {x:g} µm ({factor:.3g} times as tall as wide), "
            f"outside the supported {lo:g}-{hi:g}: check its pixel sizes and their units, or give "
            "--pixel-size"
        )
    view = _SquarePixels(arr, factor)
    (h, w), (h2, _w) = arr.shape[-2:], view.shape[-2:]
    meta["notes"].append(
        f"{name} has non-square pixels (Y {y:g} µm/px, X {x:g} µm/px): resampled {h}x{w} px to "
        f"{h2}x{w} px of square {x:g} µm pixels before staining; the output is on this square grid"
    )
    return view


def _set_description(out: OutputImage, description: str) -> None:
    """Store provenance once it is known (after staining): OME Description / zarr attribute."""
    if out.fmt == "zarr":
        import zarr

        g = zarr.open_group(str(out.tmp), mode="r+")
        g.attrs["napari_lcm_stain"] = json.loads(description)
        return
    import tifffile

    out.array.flush()
    with tifffile.TiffFile(out.tmp) as tif:
        xml = tif.ome_metadata
    old = f"<Description>{_PENDING}</Description>"
    if old not in xml:  # pragma: no cover - tifffile changed its OME writer
        raise RuntimeError("OME-XML placeholder description not found")
    new = f"<Description>{xml_escape(description)}</Description>"
    tifffile.tiffcomment(out.tmp, comment=xml.replace(old, new).encode("utf-8"))
