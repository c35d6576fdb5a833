"""Checks of the staining settings that need no model and no torch (only numpy and the JSON
config beside a checkpoint), so `lcm-stain stain` and `lcm-stain watch` refuse a bad argument
within a second, before torch and scipy are imported. `engine` re-exports these names; every entry
point (CLI, `io.stain_files`, `watch.watch_folder`, `engine.iter_stain`) uses this one copy.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

#: Relative pixel-size mismatch below which we do not rescale (1 %).
PIXEL_SIZE_TOLERANCE = 0.01
#: Accepted rescale factors (input µm/px divided by the model's): 1/8 to 8. Beyond them the value is
#: almost certainly wrong (a unit slip such as nm for µm), and would allocate gigabytes or shrink
#: the image to a few pixels.
RESCALE_RANGE = (0.125, 8.0)
#: Seeds torch's generator accepts (a signed or unsigned 64-bit integer).
SEED_RANGE = (-(2**63), 2**64 - 1)
#: The packaged models, by the name `--model` takes.
PACKAGED_NAMES = ("lcm", "pix2pix", "teacher")


def check_params(tile, overlap, samples, seed, pixel_size, steps, guidance=None):
    for name, v, lo in (("tile", tile, 1), ("overlap", overlap, 0), ("samples", samples, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    lo, hi = SEED_RANGE
    if not lo <= int(seed) <= hi - (int(samples) - 1):
        raise ValueError(
            f"seed {seed} is out of range: use an integer from {lo} to {hi} (with samples=K, "
            "seed+K-1 must be in range too), e.g. seed % 2**32"
        )
    if steps is not None and (
        isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1
    ):
        raise ValueError(f"steps must be a positive integer or None (model default), got {steps!r}")
    guidance_number(guidance)  # a number or None; its range is the model's (check_settings)
    if isinstance(pixel_size, str) and pixel_size.strip().lower() == "auto":
        return "auto"  # estimated from the image (pixel_size_estimate) once it is validated
    if pixel_size is not None:
        try:
            ps = float(pixel_size)
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"pixel_size must be a number (µm/px), 'auto' or None, got {pixel_size!r}"
            ) from e
        if not math.isfinite(ps) or ps <= 0:
            raise ValueError(f"pixel_size must be a positive number of µm/px, got {pixel_size!r}")
        return ps
    return None


def rescale_factor(pixel_size, model_pixel_size, source: str = "pixel_size") -> float:
    """Input / model pixel-size ratio (1.0 within 1 % or when either is unknown).

    A ratio outside `RESCALE_RANGE` is refused; `source` says where the value came from (a flag,
    the file's metadata, the layer scale) so the message can name it.
    """
    if pixel_size is None or not model_pixel_size:
        return 1.0
    scale = float(pixel_size) / float(model_pixel_size)
    if abs(scale - 1.0) <= PIXEL_SIZE_TOLERANCE:
        return 1.0
    lo, hi = RESCALE_RANGE
    if not lo <= scale <= hi:
        raise ValueError(
            f"pixel size {float(pixel_size):g} µm/px (from {source}) is {scale:.3g} times the "
            f"model's {float(model_pixel_size):g} µm/px, outside the supported {lo:g}-{hi:g}: "
            "check the value and its unit (µm per pixel, not nm or mm)"
        )
    return scale


def model_config(model) -> dict | None:
    """A model's JSON config, read without loading its weights (a loaded predictor: its
    `config`). None when unknown or unreadable: loading the model reports that."""
    if not isinstance(model, (str, os.PathLike)):
        config = getattr(model, "config", None)
        return config if isinstance(config, dict) else None
    name = str(model).lower()
    if name in PACKAGED_NAMES:
        path = Path(__file__).parent / "weights" / f"{name}.json"
    else:
        path = Path(model).with_suffix(".json")  # checkpoints.config_path
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return config if isinstance(config, dict) else None


def model_pixel_size(model) -> float | None:
    """The µm/px a model was trained at, read from its JSON config without loading it (a loaded
    predictor: its attribute). None when unknown or unreadable: loading the model reports that."""
    if not isinstance(model, (str, os.PathLike)):
        return getattr(model, "pixel_size", None)
    try:
        value = float(model_config(model).get("pixel_size", 0.414))  # schema default
    except (ValueError, TypeError, AttributeError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def guidance_range(config: dict | None) -> dict[str, float] | None:
    """The guidance a model accepts, {"min", "max", "default"} from its config, or None for a
    model without a guidance control (Pix2Pix; an LCM without a guidance input; a teacher
    trained without condition dropout), which accepts only 1 (`check_guidance`)."""
    g = (config or {}).get("guidance") or None
    if not isinstance(g, dict) or config.get("kind") == "pix2pix":
        return None
    if config.get("kind") == "lcm" and g.get("method") != "cfg":
        unet = (config.get("architecture") or {}).get("unet") or {}
        if not (unet.get("kwargs") or {}).get("guidance_embed", False):
            return None  # a consistency model is guided by its guidance input, or by CFG
    try:
        return {k: float(g.get(k, 1.0)) for k in ("min", "max", "default")}
    except (TypeError, ValueError):
        return None  # a malformed config: loading the checkpoint says what is wrong


def guidance_method(config: dict | None) -> str:
    """How a model applies guidance: "embedding" (a guided LCM's input: no extra time) or
    "cfg" (classifier-free: both branches, about twice the network's time), from its config's
    `guidance.method`, else by kind (a teacher: cfg)."""
    g = (config or {}).get("guidance") or {}
    return g.get("method") or ("embedding" if (config or {}).get("kind") == "lcm" else "cfg")


def guidance_number(guidance) -> float | None:
    """`guidance` as a float (None stays None): the check that needs no model."""
    if guidance is None:
        return None
    if isinstance(guidance, bool):
        raise ValueError(f"guidance must be a number, got {guidance!r}")
    try:
        return float(guidance)
    except (TypeError, ValueError):
        raise ValueError(f"guidance must be a number, got {guidance!r}") from None


def check_guidance(guidance, accepted: dict[str, float] | None) -> float | None:
    """The guidance scale to sample with: `guidance` checked against `accepted` (from
    `guidance_range`). Torch-free, so the core, the CLI (before importing torch) and the dock
    share this one check. None = the model's default."""
    w = guidance_number(guidance)
    if w is None:
        return None if accepted is None else accepted["default"]
    if accepted is None:
        if w == 1.0:  # the plain conditional model
            return None
        raise ValueError(
            f"guidance {w:g}: this model has no guidance control (trained without condition "
            "dropout or a guidance input); leave guidance unset or use 1"
        )
    lo, hi = accepted["min"], accepted["max"]
    if not lo <= w <= hi:  # also NaN
        raise ValueError(
            f"guidance must be {lo:g}-{hi:g} for this model (the range it was trained for), "
            f"got {guidance!r}"
        )
    return w


def check_settings(model, tile, overlap, samples, seed, pixel_size, steps, guidance=None) -> None:
    """Every check `stain` makes before it loads the model: the numbers, a `--pixel-size`
    the model's pixel size makes implausible (the message `stain` gives for each file), and a
    `--guidance` outside what the model's config accepts."""
    px = check_params(tile, overlap, samples, seed, pixel_size, steps, guidance)
    if isinstance(px, float):
        rescale_factor(px, model_pixel_size(model), "--pixel-size")
    config = model_config(model) if isinstance(model, (str, os.PathLike)) else None
    if guidance is not None and config is not None:  # unreadable: loading the model says why
        check_guidance(guidance, guidance_range(config))


def check_grid(pred, tile, overlap) -> None:
    """The tile grid `tile`/`overlap` make for a loaded predictor (e.g. an overlap that leaves no
    stride), checked before any output exists. Imports torch (through `tiling`)."""
    from . import tiling

    side = 4 * (int(tile) + int(overlap) + int(pred.multiple))
    tiling.make_grid((side, side), pred.multiple, tile, overlap, tiling.model_context(pred))
