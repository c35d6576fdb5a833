"""TIFF / OME-TIFF / (OME-)Zarr in and out, and `stain_files` behind `lcm-stain stain`.

Inputs are opened lazily (memory-mapped TIFF or zarr) and outputs are pre-allocated on disk
(memory-mapped OME-TIFF or zarr) and filled plane by plane, so an 8192² frame or a long stack
never has to exist twice in memory. Every output appears atomically: it is written under a
temporary name beside the target and renamed with `os.replace` when complete.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import time
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
_DEFAULT_AXES = {2: "YX", 3: "ZYX", 4: "TZYX", 5: "TCZYX"}
#: Placeholder OME Description, replaced by the provenance once staining has finished.
_PENDING = "napari-lcm-stain: staining in progress"


# ----------------------------------------------------------------------------------------- read


def _unit_scale(unit: str | None) -> float | None:
    if unit is None:
        return 1.0
    return _UNIT_TO_UM.get(str(unit).strip().lower().replace("\u00b5", "µ"), None)


def _ome_pixel_size(xml: str) -> float | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.endswith("Pixels") and "PhysicalSizeX" in el.attrib:
            scale = _unit_scale(el.attrib.get("PhysicalSizeXUnit", "µm"))
            if scale is None:
                return None
            return float(el.attrib["PhysicalSizeX"]) * scale
    return None


def _tiff_pixel_size(tif) -> float | None:
    """µm/px from OME PhysicalSizeX, else ImageJ unit + XResolution, else a cm ResolutionUnit."""
    if tif.is_ome and tif.ome_metadata:
        ps = _ome_pixel_size(tif.ome_metadata)
        if ps:
            return ps
    page = tif.pages.first
    tag = page.tags.get("XResolution")
    if tag is None:
        return None
    num, den = tag.value
    if not num:
        return None
    per_unit = den / num  # units per pixel
    ij = tif.imagej_metadata or {}
    if "unit" in ij:
        scale = _unit_scale(ij["unit"])
        return per_unit * scale if scale else None
    resunit = page.tags.get("ResolutionUnit")
    if resunit is not None and int(resunit.value) == 3:  # centimeter
        return per_unit * 1e4
    return None  # inch/none: usually a screen 72 dpi default, not a microscope calibration


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
            ps = _tiff_pixel_size(tif)
    except Exception as e:  # tifffile raises many kinds (IndexError, struct.error, ...)
        raise _unreadable(path, e) from e
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
        "axes": axes,
        "path": str(path),
        "format": "tiff",
        "_handle": handle,
    }


def _ngff_attrs(attrs: dict) -> dict | None:
    ms = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    return ms[0] if ms else None


def _read_zarr(path: Path):
    import zarr

    node = zarr.open(str(path), mode="r")
    ps, axes = None, None
    attrs = dict(node.attrs)
    if isinstance(node, zarr.Group):
        ms = _ngff_attrs(attrs)
        if ms:
            ds = ms["datasets"][0]
            arr = node[ds["path"]]
            names = [a["name"] if isinstance(a, dict) else str(a) for a in ms.get("axes", [])]
            if len(names) == arr.ndim:
                axes = "".join(n[0].upper() for n in names)
            for tr in ds.get("coordinateTransformations", []):
                if tr.get("type") == "scale":
                    ax = ms.get("axes", [])
                    unit = ax[-1].get("unit") if ax and isinstance(ax[-1], dict) else None
                    scale = _unit_scale(unit) if unit else None
                    if scale:
                        ps = float(tr["scale"][-1]) * scale
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
            ps = float(attrs["pixel_size"])
        axes = attrs.get("axes")
    return arr, {
        "pixel_size": ps,
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
    ps = metadata.get("pixel_size")
    if ps:
        md.update(PhysicalSizeX=float(ps), PhysicalSizeY=float(ps))
        md.update(PhysicalSizeXUnit="µm", PhysicalSizeYUnit="µm")
    if description:
        md["Description"] = description
    return md


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _replace(tmp: Path, path: Path) -> None:
    """os.replace for files and directories (an existing directory is swapped out first)."""
    if path.is_dir():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)  # never leave the target missing
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.unlink()


class OutputImage:
    """A pre-allocated float32 output on disk (OME-TIFF memmap or OME-Zarr), renamed on commit."""

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
                import tifffile

                self.array = tifffile.memmap(
                    self.tmp,
                    shape=shape,
                    dtype=np.float32,
                    ome=True,
                    metadata=_ome_metadata(shape, metadata, description),
                )
            else:
                self.array = _create_ome_zarr(self.tmp, shape, metadata, description, chunk)
        except BaseException:
            _remove(self.tmp)  # e.g. disk full: no half-created temp file left behind
            raise

    def commit(self) -> Path:
        if self.fmt == "tiff":
            self.array.flush()
        del self.array
        _replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.array = None
        _remove(self.tmp)


def _create_ome_zarr(path: Path, shape, metadata, description, chunk):
    import zarr

    metadata = metadata or {}
    axes = _ome_axes(metadata.get("axes"), len(shape)).lower()
    ps = metadata.get("pixel_size")
    kind = {"t": "time", "c": "channel"}
    ax = []
    for a in axes:
        d = {"name": a, "type": kind.get(a, "space")}
        if a in "yx" and ps:
            d["unit"] = "micrometer"
        ax.append(d)
    scale = [1.0] * (len(shape) - 2) + ([float(ps)] * 2 if ps else [1.0, 1.0])
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


def write_image(path, array, metadata=None, description=None, fmt=None) -> Path:
    """Write float32 OME-TIFF (or OME-Zarr for a .zarr path) atomically, metadata copied."""
    path = Path(path)
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


def _expand_inputs(inputs) -> list[Path]:
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[Path] = []
    for item in inputs:
        s = str(item)
        if any(c in s for c in "*?["):
            hits = sorted(Path(h) for h in glob.glob(s))
            if not hits:
                raise FileNotFoundError(f"no files match {s!r}")
            files += [h for h in hits if _is_zarr_path(h) or h.suffix.lower() in TIFF_SUFFIXES]
            continue
        p = Path(s)
        if not p.exists():
            raise FileNotFoundError(f"input not found: {p}")
        if p.is_dir() and not _is_zarr_path(p):
            found = sorted(
                c for c in p.iterdir() if _is_zarr_path(c) or c.suffix.lower() in TIFF_SUFFIXES
            )
            if not found:
                raise FileNotFoundError(f"no .tif/.tiff/.zarr images in folder {p}")
            files += found
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
    return plan


def _provenance(info: dict, source: Path, kind: str, samples: int) -> str:
    prov = {
        "software": "napari-lcm-stain",
        "version": __version__,
        "content": kind,
        "source": str(source),
        **{k: info.get(k) for k in ("model", "steps", "seed", "samples", "tile", "overlap")},
        **{k: info.get(k) for k in ("pixel_size", "model_pixel_size", "rescale", "warnings")},
    }
    if kind == "std":
        prov["note"] = f"per-pixel standard deviation of {samples} one-step samples (ddof=1)"
    return json.dumps(prov)


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
) -> list[Path]:
    """Stain files / folders / globs; write OME-TIFF or OME-Zarr (+ `_std` with samples > 1).

    All outputs are checked before any work starts: an output that is an input is refused, an
    existing output needs `overwrite=True`.
    """
    from .engine import get_predictor, iter_stain, validate_image

    files = _expand_inputs(inputs)
    plan = plan_outputs(files, Path(output), out_format)
    for o, _fmt in plan:
        targets = [o] + ([_std_path(o)] if samples > 1 else [])
        for t in targets:
            if any(_same_file(t, i) for i in files):
                raise ValueError(f"output {t} is one of the inputs: choose another -o")
            if t.exists() and not overwrite:
                raise FileExistsError(
                    f"{t} exists: pass --overwrite to replace it, or choose another -o"
                )
    Path(plan[0][0]).parent.mkdir(parents=True, exist_ok=True)
    pred = None if scheduler is not None else get_predictor(model, steps, device)
    written: list[Path] = []
    for n, (f, (o, fmt)) in enumerate(zip(files, plan), 1):
        arr, meta = read_image(f)
        handle = meta.pop("_handle", None)
        try:
            validate_image(arr)  # e.g. an RGB TIFF: the engine's message, before any output
            ps = pixel_size if pixel_size is not None else meta.get("pixel_size")
            shape = tuple(int(s) for s in arr.shape)
            out_meta = {"pixel_size": meta.get("pixel_size") or ps, "axes": meta.get("axes")}
            mean_o = OutputImage(o, shape, out_meta, _PENDING, fmt)
            std_o = None
            bar = progress or (ProgressBar(f"[{n}/{len(files)}] {f.name}") if not quiet else None)
            try:
                if samples > 1:  # inside the try: a failure here must not leak mean_o's temp
                    std_o = OutputImage(_std_path(o), shape, out_meta, _PENDING, fmt)
                gen = iter_stain(
                    arr,
                    pred if pred is not None else model,
                    steps,
                    tile,
                    overlap,
                    device,
                    seed,
                    ps,
                    samples,
                    out=mean_o.array,
                    out_std=None if std_o is None else std_o.array,
                    scheduler=scheduler,
                )
                result = drain(gen, None if bar is None else lambda ev, b=bar: b(*ev))
                _set_description(mean_o, _provenance(result.info, f, "mean", samples))
                written.append(mean_o.commit())
                if std_o is not None:
                    _set_description(std_o, _provenance(result.info, f, "std", samples))
                    written.append(std_o.commit())
            except BaseException:
                if hasattr(bar, "end"):
                    bar.end()
                mean_o.abort()
                if std_o is not None:
                    std_o.abort()
                raise
            if not quiet:
                print(
                    f"wrote {o} ({result.info['model']}, {result.info['planes']} plane(s), "
                    f"{result.info['seconds']:.1f} s)"
                )
                for w in result.info["warnings"]:
                    print(f"  note: {w}")
        finally:
            if handle is not None:
                handle.close()
    return written


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
