"""npe2 reader and writers: the napari glue around `io.read_image` / `io.write_image`.

Reader: (OME-)TIFF and (OME-)Zarr open lazily as one image layer whose scale and units come from
the file's pixel size (so the Stain dock knows it), with the stain provenance of a file this plugin
wrote kept in ``layer.metadata["provenance"]``. ``get_reader`` returns None for anything it cannot
read (wrong suffix, RGB, corrupt, a folder that is no zarr store), leaving it to other readers.

Writers: an image layer to OME-TIFF or OME-Zarr (float32, written atomically by `io.write_image`)
with the pixel size in the OME metadata and the provenance of a stained layer (model, checkpoint
and its hash, steps, seed, pixel size, version) as JSON in the OME Description / zarr attributes.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import io
from ._version import __version__

#: where `upsert_output` keeps the plugin's bookkeeping on a layer (see `_widgets._layers`)
PLUGIN_KEY = "napari_lcm_stain"
_AXIS_NAMES = {"T": "t", "Z": "z", "C": "c", "Y": "y", "X": "x"}

LayerData = tuple[Any, dict, str]


# ------------------------------------------------------------------------------------------ read


def get_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """npe2 reader: a function for a file this plugin reads well, else None."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None  # stacking many files is napari's job
        path = path[0]
    p = Path(path)
    if p.suffix.lower() not in io.TIFF_SUFFIXES and not io._is_zarr_path(p):
        return None
    try:
        _arr, meta = io.read_image(p)
    except Exception:  # noqa: BLE001 - unreadable here: let another reader try
        return None
    _close(meta)
    if "S" in (meta.get("axes") or ""):
        return None  # RGB(A) samples: napari's own reader shows colour images better
    return read_layers


def read_layers(path: str | list[str]) -> list[LayerData]:
    """Open ``path`` lazily as one image layer with µm scale/units from its pixel size."""
    if isinstance(path, (list, tuple)):
        path = path[0]
    p = Path(path)
    arr, meta = io.read_image(p)
    meta.pop("_handle", None)  # a compressed TIFF's file stays open while its lazy array lives
    data = arr if isinstance(arr, np.ndarray) or hasattr(arr, "chunks") else _lazy(arr)
    nd = len(arr.shape)
    ps = meta.get("pixel_size")
    axes = meta.get("axes") or ""
    kwargs: dict[str, Any] = {
        "name": _layer_name(p),
        "metadata": {"pixel_size": ps, "axes": axes, "path": str(p)},
    }
    if len(axes) == nd:
        kwargs["axis_labels"] = tuple(_AXIS_NAMES.get(a, a.lower()) for a in axes)
    if ps:
        kwargs["scale"] = (1.0,) * (nd - 2) + (float(meta.get("pixel_size_y") or ps), float(ps))
        kwargs["units"] = ("pixel",) * (nd - 2) + ("micrometer", "micrometer")
    prov = read_provenance(p)
    if prov is not None:
        kwargs["metadata"]["provenance"] = prov
    return [(data, kwargs, "image")]


def _close(meta: dict) -> None:
    handle = meta.pop("_handle", None)
    if handle is not None:
        handle.close()


def _lazy(arr: Any) -> Any:
    """A dask array over a lazy reader (one chunk per plane), which napari slices lazily."""
    import dask.array as da

    nd = len(arr.shape)
    chunks = (1,) * (nd - 2) + tuple(arr.shape[-2:])
    return da.from_array(arr, chunks=chunks, meta=np.empty((0,) * nd, dtype=arr.dtype))


def _layer_name(p: Path) -> str:
    return re.sub(r"(\.ome)?\.(tiff?|zarr)$", "", p.name, flags=re.IGNORECASE) or p.name


def read_provenance(path: str | Path) -> dict | None:
    """The stain provenance this plugin wrote into a file (OME Description / zarr attrs), if any."""
    p = Path(path)
    try:
        if io._is_zarr_path(p):
            import zarr

            attrs = dict(zarr.open(str(p), mode="r").attrs).get(PLUGIN_KEY)
            if isinstance(attrs, dict) and "description" in attrs:
                attrs = attrs["description"]  # io.write_image keeps the text as given
            text = attrs if isinstance(attrs, str) else json.dumps(attrs) if attrs else None
        else:
            import tifffile

            with tifffile.TiffFile(p) as tif:
                xml = tif.ome_metadata if tif.is_ome else None
            text = _ome_description(xml) if xml else None
        prov = json.loads(text) if text else None
    except Exception:  # noqa: BLE001 - provenance is optional: a file without it still opens
        return None
    return prov if isinstance(prov, dict) and prov.get("software") == "napari-lcm-stain" else None


def _ome_description(xml: str) -> str | None:
    for el in ET.fromstring(xml).iter():
        if el.tag.endswith("Description") and el.text:
            return el.text
    return None


# ----------------------------------------------------------------------------------------- write


def write_ome_tiff(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 writer: one image layer to OME-TIFF with pixel size and stain provenance."""
    return [str(_write(Path(path), data, meta, "tiff"))]


def write_ome_zarr(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 writer: one image layer to OME-Zarr with pixel size and stain provenance."""
    return [str(_write(Path(path), data, meta, "zarr"))]


def layer_provenance(meta: dict) -> dict:
    """What the writer stores for a layer's state: the stain provenance of one of the plugin's
    outputs (model, checkpoint hash, steps, seed, pixel size), else the layer's pixel size."""
    from ._widgets._layers import pixel_size_of

    md = meta.get("metadata") if isinstance(meta.get("metadata"), dict) else {}
    ours = md.get(PLUGIN_KEY) if isinstance(md.get(PLUGIN_KEY), dict) else {}
    prov = ours.get("provenance") or md.get("provenance")
    prov = dict(prov) if isinstance(prov, dict) else {"software": "napari-lcm-stain"}
    prov.setdefault("version", __version__)
    prov["layer"] = meta.get("name")
    if ours.get("plane"):
        prov["plane"] = list(ours["plane"])
    scale = meta.get("scale") or (1.0,)
    prov["layer_pixel_size"] = pixel_size_of(md, scale, meta.get("units"))
    ps_y = pixel_size_of(md, scale, meta.get("units"), axis=-2)
    if ps_y is not None and ps_y != prov["layer_pixel_size"]:
        prov["layer_pixel_size_y"] = ps_y
    return prov


def _write(path: Path, data: Any, meta: dict, fmt: str) -> Path:
    name = meta.get("name", "layer")
    if meta.get("rgb"):
        raise ValueError(
            f"layer '{name}' is RGB: the LCM Virtual Stain writer saves single-channel images; "
            "save it as .tif/.png with napari's own writer, or split the channels first"
        )
    if meta.get("multiscale"):
        data = data[0]
    ndim = len(np.shape(data))
    if not 2 <= ndim <= 5:
        raise ValueError(
            f"layer '{name}' has {ndim} dimensions: OME-TIFF/OME-Zarr hold 2 to 5 (T, C, Z, Y, X); "
            "save fewer dimensions or use napari's own writer"
        )
    prov = layer_provenance(meta)
    ps = prov["layer_pixel_size"]
    axes = "".join(str(a)[:1].upper() for a in meta.get("axis_labels") or ())
    ps_y = prov.get("layer_pixel_size_y")
    out_meta = {"pixel_size": ps, "pixel_size_y": ps_y, "axes": axes if len(axes) == ndim else None}
    return io.write_image(path, np.asarray(data), out_meta, json.dumps(prov), fmt=fmt)
