"""Layer bookkeeping shared by the docks: which layers can be stained, how outputs are named and
replaced, and where the plane on screen is.

Outputs carry ``layer.metadata["napari_lcm_stain"]`` so the plugin recognises its own layers even
after a user renames them, and never mistakes one for an input.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
from napari.layers import Image, Labels, Layer
from napari.utils.colormaps import Colormap

PLUGIN_KEY = "napari_lcm_stain"

#: DAPI layers are 0-1 with most nuclei below ~0.8: this keeps them bright without clipping much.
DAPI_CONTRAST = (0.0, 0.8)

#: Black -> DAPI blue -> pale cyan. Pure 'blue' is too dark on napari's dark canvas (luminance
#: ~0.07); passing through a lighter blue keeps dim nuclei visible and bright ones distinct.
DAPI_COLORMAP = Colormap(
    colors=[[0.0, 0.0, 0.0, 1.0], [0.12, 0.38, 1.0, 1.0], [0.72, 0.92, 1.0, 1.0]],
    controls=[0.0, 0.6, 1.0],
    name="dapi_blue",
    display_name="DAPI blue",
)

ROLE_STAIN = "stain"
ROLE_PIX2PIX = "pix2pix"
ROLE_UNCERTAINTY = "uncertainty"
ROLE_LIVE = "live"  # live staining: the newest stained frame
ROLE_LIVE_STACK = "live stack"  # live staining: the stained frames in order

_QOBM_HINT = re.compile(r"qobm|phase|oblique|label.?free", re.IGNORECASE)
_DAPI_HINT = re.compile(r"dapi|hoechst|nuclear stain|fluor", re.IGNORECASE)
_TRUTH_HINT = re.compile(r"ground.?truth|\bgt\b|target|measured", re.IGNORECASE)


def same_layer(a: Any, b: Any) -> bool:
    """Identity that sees through napari's PublicOnlyProxy (docks get a proxied viewer)."""
    return getattr(a, "__wrapped__", a) is getattr(b, "__wrapped__", b)


def plugin_info(layer: Layer) -> dict[str, Any] | None:
    """The plugin's metadata on one of its output layers, or None for any other layer."""
    info = layer.metadata.get(PLUGIN_KEY) if isinstance(layer.metadata, dict) else None
    return info if isinstance(info, dict) else None


def is_plugin_output(layer: Layer) -> bool:
    return plugin_info(layer) is not None


def unsuitable_reason(layer: Layer) -> str | None:
    """Why a layer cannot be a qOBM/DAPI input (None when it can); shown to the user verbatim."""
    if not isinstance(layer, Image):
        kind = type(layer).__name__
        return f"{kind} layer, not an image"
    if layer.rgb:
        return "RGB(A) image; split the channels first (right-click the layer > Split RGB)"
    if is_plugin_output(layer):
        return "output of this plugin"
    data = layer.data[0] if layer.multiscale else layer.data
    if len(data.shape) < 2 or min(data.shape[-2:]) < 1:
        return f"shape {tuple(data.shape)} has no 2D plane"
    return None


def image_layers(layers: Iterable[Layer]) -> list[Image]:
    """Single-channel image layers that are not our outputs, in layer-list order."""
    return [ly for ly in layers if unsuitable_reason(ly) is None]


def qobm_score(layer: Layer) -> int:
    """How plausible a layer is as qOBM input: name hints, and DAPI-looking names count against."""
    score = 0
    if _QOBM_HINT.search(layer.name):
        score += 2
    if _DAPI_HINT.search(layer.name):
        score -= 3
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    if np.issubdtype(np.dtype(data.dtype), np.floating):
        score += 1  # reconstructed phase is float radians; raw fluorescence is usually uint16
    return score


def default_qobm(layers: Iterable[Layer], selected: Layer | None) -> Layer | None:
    """The selected layer if it fits, else the most plausible qOBM layer (never one of our outputs).

    A selected layer named like DAPI does not "fit": it is the stain, not the phase image.
    """
    candidates = image_layers(layers)
    if (
        selected is not None
        and any(same_layer(selected, c) for c in candidates)
        and not _DAPI_HINT.search(selected.name)
    ):
        return selected
    if not candidates:
        return None
    # max() keeps the first of equal scores: the bottom-most layer, usually the one opened first.
    return max(candidates, key=qobm_score)


def default_truth(layers: Iterable[Layer], exclude: Layer | None = None) -> Layer | None:
    """A measured DAPI layer, if one is named so (e.g. 'DAPI (ground truth)'); else None."""
    for ly in image_layers(layers):
        if (
            not same_layer(ly, exclude)
            and _DAPI_HINT.search(ly.name)
            and _TRUTH_HINT.search(ly.name)
        ):
            return ly
    return None


def default_dapi(layers: Iterable[Layer], exclude: Layer | None = None) -> Layer | None:
    """A DAPI-named image layer (for the fine-tune pair), preferring ground-truth names."""
    truth = default_truth(layers, exclude)
    if truth is not None:
        return truth
    for ly in image_layers(layers):
        if not same_layer(ly, exclude) and _DAPI_HINT.search(ly.name):
            return ly
    return None


def matching_labels(layers: Iterable[Layer], shape: tuple[int, ...]) -> Labels | None:
    """A nuclei labels layer of the given shape (e.g. the sample's 'nuclei (ground truth)')."""
    best = None
    for ly in layers:
        if isinstance(ly, Labels) and tuple(ly.data.shape) == tuple(shape):
            if re.search(r"nucle", ly.name, re.IGNORECASE):
                return ly
            best = best or ly
    return best


def base_data(layer: Layer) -> Any:
    """Full-resolution data of a layer (level 0 of a multiscale pyramid)."""
    return layer.data[0] if layer.multiscale else layer.data


def layer_pixel_size(layer: Layer) -> float | None:
    """µm per pixel of a layer if known: metadata 'pixel_size(_um)', else a length-unit scale."""
    return pixel_size_of(layer.metadata, layer.scale, getattr(layer, "units", None))


#: µm per unit of the length units a layer's scale may carry
_UM_PER_UNIT = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3}


def pixel_size_of(metadata: Any, scale: Any, units: Any, axis: int = -1) -> float | None:
    """µm per pixel along `axis` (-1: X, -2: Y) from a layer's scale and units, else metadata.

    The scale in a length unit comes first: it is what napari shows and the user corrects, while
    metadata 'pixel_size(_um)' (from the file) may be stale. A scale in 'pixel' units (napari's
    default) says nothing, so without metadata None lets the model assume its training pixel size.
    """
    if units and len(units) >= -axis and len(scale) >= -axis:
        factor = _UM_PER_UNIT.get(str(units[axis]).lower())
        value = float(scale[axis]) * factor if factor is not None else math.nan
        if math.isfinite(value) and value > 0:
            return value
    md = metadata if isinstance(metadata, dict) else {}
    keys = ("pixel_size_y",) if axis == -2 else ()
    for key in (*keys, "pixel_size", "pixel_size_um"):
        meta = md.get(key)
        if isinstance(meta, (int, float)) and not isinstance(meta, bool):
            if np.isfinite(meta) and meta > 0:
                return float(meta)
    return None


def current_plane(viewer: Any, layer: Layer) -> tuple[int, ...]:
    """Indices along the layer's leading (non-YX) axes of the plane the dims slider shows."""
    ndim = layer.ndim
    if ndim <= 2:
        return ()
    point = np.asarray(viewer.dims.point, dtype=float)[-ndim:]
    data_pos = np.asarray(layer.world_to_data(point), dtype=float)
    shape = base_data(layer).shape
    return tuple(int(np.clip(np.round(data_pos[i]), 0, shape[i] - 1)) for i in range(ndim - 2))


def output_name(source: str, role: str, label: str) -> str:
    if role == ROLE_PIX2PIX:
        return f"{source} · DAPI (Pix2Pix)"
    if role == ROLE_UNCERTAINTY:
        return f"{source} · uncertainty" + ("" if label == "LCM" else f" ({label})")
    if role in (ROLE_LIVE, ROLE_LIVE_STACK):
        return f"{source} · DAPI {role} ({label})"
    return f"{source} · DAPI ({label})"


def find_output(layers: Iterable[Layer], source: str, role: str, label: str) -> Layer | None:
    """Our output for (source, role, model label), found by metadata first, then by name."""
    layers = list(layers)
    for ly in layers:
        info = plugin_info(ly)
        if (
            info
            and info.get("source") == source
            and info.get("role") == role
            and info.get("label") == label
        ):
            return ly
    name = output_name(source, role, label)
    for ly in layers:
        if ly.name == name and is_plugin_output(ly):
            return ly
    return None


def upsert_output(
    viewer: Any,
    data: np.ndarray,
    *,
    source: str,
    role: str,
    label: str,
    scale: tuple[float, ...],
    translate: tuple[float, ...],
    units: tuple[Any, ...] | None,
    plane: tuple[int, ...] = (),
    provenance: dict | None = None,
) -> Image:
    """Add an output layer, or replace the data of the plugin's previous one in place.

    Updating in place keeps the user's layer position, visibility and contrast tweaks.
    """
    nd = data.ndim
    scale, translate = tuple(scale)[-nd:], tuple(translate)[-nd:]
    units = tuple(units)[-nd:] if units else None
    meta = {"source": source, "role": role, "label": label, "plane": list(plane)}
    if provenance:
        meta["provenance"] = provenance
    if role == ROLE_UNCERTAINTY:
        hi = float(np.percentile(data, 99.5)) if data.size else 0.0
        style = {"colormap": "magma", "contrast_limits": (0.0, max(hi, 1e-3))}
    else:
        style = {"colormap": DAPI_COLORMAP, "contrast_limits": DAPI_CONTRAST}
    existing = find_output(viewer.layers, source, role, label)
    if existing is not None and existing.ndim == nd:
        existing.data = data
        existing.scale = scale
        existing.translate = translate
        existing.metadata[PLUGIN_KEY] = meta
        if role == ROLE_UNCERTAINTY:
            existing.contrast_limits = style["contrast_limits"]
        return existing
    kwargs: dict[str, Any] = {
        "name": output_name(source, role, label),
        "scale": scale,
        "translate": translate,
        "metadata": {PLUGIN_KEY: meta},
        "blending": "translucent",
        **style,
    }
    if units:
        kwargs["units"] = units
    if existing is not None:  # dimensionality changed (whole stack <-> one plane): re-create
        index = viewer.layers.index(existing)
        viewer.layers.remove(existing)
        layer = Image(data, **kwargs)
        viewer.layers.insert(index, layer)
        return layer
    return viewer.add_image(data, **kwargs)
