"""The one input normalisation: phase plane -> what the networks were trained on.

Every path that feeds a network (engine tiles, training fields, fine-tuning pairs, validation)
calls `plane_stats` once per whole plane and `apply` per tile or crop, with the checkpoint's
`normalization` config, so inference always matches training (VisCy's lesson: store it with the
model).

Two types:
- ``"robust"`` (current): per plane, centre = median and spread = `mad_scale`·MAD of the plane
  smoothed by a 1.5-px Gaussian (so noise does not inflate it), both from the whole plane before
  tiling so tiles agree.
  The result is invariant to any affine change ``a·x + b`` (a > 0) of the phase values: radians
  vs nm of optical path, another regulariser or section thickness, integer camera units. The
  median/MAD pair, unlike mean/std or a 99.8th percentile, barely moves with the amount of
  strongly scattering content (red cells, lipid), which varies field to field.
- ``"fixed"`` (checkpoints before robust normalisation): one training-set mean and std for every
  image. Kept so old checkpoints load and behave exactly as before.

Both clip to ±`clip` (10) after scaling.
"""

from __future__ import annotations

import math

import numpy as np

#: Robust statistics are computed on at most this many pixels (a regular, deterministic stride).
MAX_STAT_PIXELS = 4_000_000
#: 1.4826·MAD is the standard deviation of a normal distribution with that MAD.
MAD_TO_STD = 1.4826


#: The spread is measured on the plane smoothed by this Gaussian (px): camera and shot noise then
#: barely inflate it (on the instrument suite's low-light variant the MAD of the raw plane grew
#: with the noise and scaled the nuclei down), while a linear filter keeps the affine invariance.
SMOOTH_SIGMA_PX = 1.5


def robust_config(
    clip: float = 10.0, mad_scale: float = MAD_TO_STD, smooth_sigma_px: float = SMOOTH_SIGMA_PX
) -> dict:
    """The `normalization` entry new checkpoints carry. scale = `mad_scale`·MAD: 1.4826 (a
    Gaussian's std) for models trained with it; weights trained with the fixed normalisation are
    given the training set's std/MAD instead (`experiments/robust_norm_for_fixed.py`)."""
    return {
        "type": "robust",
        "center": "median",
        "spread": "mad",
        "mad_scale": float(mad_scale),
        "smooth_sigma_px": float(smooth_sigma_px),
        "clip": float(clip),
        "max_stat_pixels": MAX_STAT_PIXELS,
        "output": "DAPI 0-1",
    }


def fixed_config(mean: float, std: float, clip: float = 10.0) -> dict:
    return {
        "type": "fixed",
        "qobm_mean": float(mean),
        "qobm_std": float(std),
        "clip": float(clip),
        "output": "DAPI 0-1",
    }


def _subsample(plane) -> tuple[np.ndarray, int]:
    h, w = plane.shape[-2:]
    step = max(1, math.ceil(math.sqrt(h * w / MAX_STAT_PIXELS)))
    return np.asarray(plane[..., ::step, ::step], dtype=np.float64), step


def plane_stats(config: dict | None, plane) -> dict:
    """Centre and scale for one whole plane (2-D; numpy, dask or zarr) under `config`.

    A plane with no spread at all (constant) gets scale 1, so it normalises to zeros; callers
    that want to tell the user check `stats["constant"]`.
    """
    config = config or {}
    kind = config.get("type", "fixed")
    if kind == "fixed":
        return {
            "center": float(config.get("qobm_mean", 0.0)),
            "scale": float(config.get("qobm_std", 1.0)),
            "constant": False,
        }
    if kind != "robust":
        raise ValueError(f"unknown normalization type {kind!r} (expected 'robust' or 'fixed')")
    x, step = _subsample(plane)
    finite = np.isfinite(x)
    if not finite.any():
        raise ValueError("the plane has no finite pixels (all NaN/Inf): nothing to normalise")
    center = float(np.median(x[finite]))
    sigma = float(config.get("smooth_sigma_px", 0.0)) / step
    if sigma > 0:
        from scipy.ndimage import gaussian_filter

        s = gaussian_filter(np.where(finite, x, center), sigma, mode="reflect")[finite]
    else:
        s = x[finite]
    mid = float(np.median(s))
    scale = float(config.get("mad_scale", MAD_TO_STD)) * float(np.median(np.abs(s - mid)))
    if not scale > 0:  # more than half the pixels share one value (e.g. a padded or masked field)
        scale = float(np.std(x[finite]))
    constant = not scale > 0
    return {"center": center, "scale": scale if not constant else 1.0, "constant": constant}


def apply(x, stats: dict, clip: float = 10.0) -> np.ndarray:
    """(x - centre) / scale, clipped to ±clip, as a new float32 array (the input is not touched)."""
    a = np.asarray(x)
    if a.dtype == np.float64 and a.size and float(np.nanmax(np.abs(a))) > 1e30:
        # beyond float32's range: scale in float64 before the cast
        return np.clip((a - stats["center"]) / stats["scale"], -clip, clip).astype(np.float32)
    y = (a.astype(np.float32) - np.float32(stats["center"])) / np.float32(stats["scale"])
    return np.clip(y, -clip, clip, out=y)


def normalize(config: dict | None, x) -> np.ndarray:
    """Normalise one whole plane or a stack of planes (each plane with its own statistics)."""
    config = config or {}
    clip = float(config.get("clip", 10.0))
    a = np.asarray(x)
    if a.ndim <= 2:
        return apply(a, plane_stats(config, a), clip)
    flat = a.reshape(-1, *a.shape[-2:])
    out = np.stack([apply(p, plane_stats(config, p), clip) for p in flat])
    return out.reshape(a.shape)
