"""Pixel size of a qOBM phase image without metadata, estimated from the image itself.

The model is trained at one pixel size and the engine rescales every input to it, so an image
whose pixel size is unknown is stained at the wrong scale (nuclei half their size at 2× coarser
sampling). Like cellpose's size model, which estimates object diameter from the image and
rescales before segmenting, this estimator reads the scale from what the image shows: nuclei are
5–15 µm and the optics pass a band in cycles/µm, so the shape of the radially averaged power
spectrum in cycles/px moves with µm/px. A small network regresses log(µm/px) on that shape (and
a blob-scale profile); it is fitted on simulated fields of every instrument, tissue layout and
pixel size the simulator draws (``training/pixel_size.py``, stored as JSON in
``weights/pixel_size_estimator.json`` with its measured error); it is affine-invariant like the
input normalisation. No torch, Qt or napari.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np

__all__ = [
    "ESTIMATOR_FILE",
    "estimate_pixel_size",
    "features",
    "load_estimator",
    "predict_log_px",
]

ESTIMATOR_FILE = Path(__file__).parent / "weights" / "pixel_size_estimator.json"
#: Largest centre crop the features see (px per side): enough fields and nuclei, bounded cost.
CROP = 512
#: Radial frequency bins (cycles/px), log-spaced.
_FREQ_EDGES = np.geomspace(1 / 96, 0.5, 25)
#: Gaussian scales (px) of the blob-scale profile (scale-normalised LoG energy).
_LOG_SIGMAS = np.geomspace(1.0, 24.0, 12)


def _plane(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image, dtype=np.float64)
    while a.ndim > 2:  # a stack: its middle plane
        a = a[a.shape[0] // 2]
    if a.ndim != 2 or min(a.shape) < 32:
        raise ValueError(
            f"the pixel-size estimator needs a 2-D plane of at least 32×32 px, got shape "
            f"{np.shape(image)}: pass the pixel size instead"
        )
    h, w = a.shape
    ch, cw = min(h, CROP), min(w, CROP)
    a = a[(h - ch) // 2 : (h - ch) // 2 + ch, (w - cw) // 2 : (w - cw) // 2 + cw]
    finite = np.isfinite(a)
    if not finite.any():
        raise ValueError("the pixel-size estimator found no finite pixels to read a scale from")
    if not finite.all():  # NaN/Inf pixels: the plane's finite median, as the engine does
        a = np.where(finite, a, np.median(a[finite]))
    # the OOD score's affine-invariant normalisation (the features are invariant to the spread
    # anyway: log spectra and blob energies with their means removed)
    from .ood import _normalise

    return _normalise(a)


def features(image: np.ndarray) -> np.ndarray:
    """Scale-revealing, affine-invariant features of a phase plane: the shape (log, mean
    removed) of its radially averaged power spectrum, and of its blob energy across scales."""
    from scipy import ndimage

    a = _plane(image)
    h, w = a.shape
    win = np.outer(np.hanning(h), np.hanning(w))
    p = np.abs(np.fft.rfft2((a - a.mean()) * win)) ** 2
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.hypot(fx, fy).ravel()
    idx = np.digitize(f, _FREQ_EDGES) - 1
    ok = (idx >= 0) & (idx < len(_FREQ_EDGES) - 1)
    sums = np.bincount(idx[ok], weights=p.ravel()[ok], minlength=len(_FREQ_EDGES) - 1)
    counts = np.bincount(idx[ok], minlength=len(_FREQ_EDGES) - 1)
    spec = np.log10(sums / np.maximum(counts, 1) + 1e-12)
    have = counts > 0  # a small plane leaves its lowest bins empty: interpolate in log f
    centres = np.log(np.sqrt(_FREQ_EDGES[:-1] * _FREQ_EDGES[1:]))
    spec = np.interp(centres, centres[have], spec[have])
    spec = spec - spec.mean()
    blob = np.array(
        [
            np.mean((s * s * ndimage.gaussian_laplace(a, s, mode="reflect")) ** 2)
            for s in _LOG_SIGMAS
        ]
    )
    blob = np.log10(blob + 1e-12)
    blob = blob - blob.mean()
    return np.concatenate([spec, blob])


@functools.lru_cache(maxsize=2)
def load_estimator(path: str | Path = ESTIMATOR_FILE) -> dict:
    """The fitted estimator (JSON: feature mean/std, the network's weights, the µm/px range it
    was fitted on and its measured error)."""
    cfg = json.loads(Path(path).read_text())
    for k in ("mean", "std", "w1", "b1", "w2"):
        cfg[k] = np.asarray(cfg[k], dtype=np.float64)
    n = len(cfg["mean"])
    if (
        len(cfg["std"]) != n
        or cfg["w1"].shape != (n, len(cfg["b1"]))
        or len(cfg["w2"]) != len(cfg["b1"])
    ):
        raise ValueError(f"{path}: the estimator's array shapes do not fit together")
    return cfg


def predict_log_px(cfg: dict, feats: np.ndarray) -> np.ndarray:
    """log(µm/px) for feature rows (one hidden tanh layer)."""
    z = (np.atleast_2d(feats) - np.asarray(cfg["mean"])) / np.asarray(cfg["std"])
    h = np.tanh(z @ np.asarray(cfg["w1"]) + np.asarray(cfg["b1"]))
    return h @ np.asarray(cfg["w2"]) + float(cfg["b2"])


def estimate_pixel_size(image: np.ndarray, path: str | Path = ESTIMATOR_FILE) -> float:
    """Estimated µm/px of a qOBM phase plane (a stack: its middle plane), clipped to the range
    the estimator was fitted on."""
    cfg = load_estimator(str(path))
    log_px = float(predict_log_px(cfg, features(image))[0])
    lo, hi = cfg["range_um"]
    return float(np.clip(math.exp(log_px), lo, hi))
