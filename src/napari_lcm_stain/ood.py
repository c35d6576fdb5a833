"""Out-of-distribution score: "this does not look like the phase images the model was trained on".

Cheap (one FFT of at most 1024² px), never blocks, and invariant to an affine change of the phase
values: every feature is computed after the robust per-image normalisation
``(x - median) / (1.4826 · MAD)``, so radians, nm of optical path, or camera counts score alike.

Features (all about the *shape* of the data, none about its units):

- ``skew``: quantile skewness ``(q95 + q5 - 2 q50) / (q95 - q5)``. qOBM phase is relative and
  roughly symmetric; fluorescence and brightfield intensities are one-sided.
- ``asym``: ``log((q99.5 - q50) / (q50 - q0.5))``, a long bright tail (fluorescence) or a long
  dark one (absorption).
- ``tails``: ``log((q99.5 - q0.5) / (q75 - q25))``, tail weight relative to the core.
- ``flat``: fraction of neighbouring pixels with exactly equal values (label images, masks,
  saturated or heavily quantised data are piecewise constant).
- ``band0``, ``band1``, ``band3``, ``band4``: log10 of the radially averaged power in fixed
  *physical* frequency bands (0.02–0.05, 0.05–0.12, 0.3–0.6, 0.6–1.2 cycles/µm, at the pixel size
  given, else the model's), relative to the 0.12–0.3 cycles/µm band (``band2``).
  qOBM phase is high-pass (background subtracted) and band-limited by the optics; fluorescence or
  brightfield has strong low-frequency power, white noise has a flat spectrum, and a wrong pixel
  size shifts the whole spectrum along the frequency axis.
``band4`` is computed but not scored (``FEATURES``): like the lag-1 autocorrelation that
the first reference (0.0.4) also scored, it describes the noise level and the optical cut-off, which vary between
instruments the model still handles.

Each feature becomes a robust z-score ``(value - median) / spread`` against simulated training-like
fields (``weights/ood_reference.json``, made by ``scripts/ood_reference.py``); the score is the
larger of two root-mean-square z-scores, over the value features (skew, asym, tails, flat) and
over the spatial ones (the scored bands), and the image is flagged when it exceeds the reference's
threshold. The (at most two) features with the largest |z| are reported as reasons in words.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np

REFERENCE_PATH = Path(__file__).parent / "weights" / "ood_reference.json"
#: µm/px of the 20x model and of its reference fields (the JSON's ``pixel_size`` overrides it).
DEFAULT_PIXEL_SIZE = 0.414
#: Largest crop (per side) the features are computed on: a deterministic central crop.
MAX_SIDE = 1024
#: Smallest plane (per side) that is scored.
MIN_SIDE = 32
#: Physical frequency band edges, cycles/µm (the optics of the 20x model cut off near 1.1).
BAND_EDGES = (0.02, 0.05, 0.12, 0.3, 0.6, 1.2)
#: The band whose power the others are compared with (sampled by any pixel size up to 1.6 µm).
ANCHOR_BAND = 2
#: Bands must lie below this fraction of an up-sampled input's Nyquist frequency (anti-aliasing
#: filters attenuate the last fifth).
NYQUIST_FRACTION = 0.8
#: Normalised values are clipped here before spectra and correlations (as the model's input is).
CLIP = 10.0
#: A feature is named as a reason when its |z| exceeds this.
REASON_Z = 3.0
#: The features the reference records and the score uses. `features` also computes ``band4``
#: (0.6–1.2 cycles/µm); it and the lag-1 autocorrelation (no longer computed) measure the camera's noise and the optics' cut-off,
#: which differ between instruments whose phase the model still stains (low light, another NA);
#: scored, they flagged 8/8 low-light and 7/8 gradient-reconstruction suite fields, and without
#: them every clearly wrong input is still flagged (docs/metrics.md).
FEATURES = ("skew", "asym", "tails", "flat") + tuple(
    f"band{i}" for i in range(len(BAND_EDGES) - 2) if i != ANCHOR_BAND
)

#: The score is the larger of the groups' root-mean-square z-scores, so that a shift in the value
#: distribution is not diluted by normal spatial statistics, and the other way round.
GROUPS = {
    "values": ("skew", "asym", "tails", "flat"),
    "spatial": tuple(f for f in FEATURES if f.startswith("band")),
}

# Words for each feature: (too high, too low).
_WORDS = {
    "skew": (
        "values are skewed towards bright (one-sided like fluorescence or brightfield)",
        "values are skewed towards dark (one-sided like inverted intensity)",
    ),
    "asym": (
        "the bright tail is much longer than the dark tail (like fluorescence)",
        "the dark tail is much longer than the bright tail (like absorption or brightfield)",
    ),
    "tails": ("many extreme values (heavy tails)", "few extreme values (clipped or saturated)"),
    "flat": (
        "many neighbouring pixels are exactly equal (label image, mask or coarsely quantised)",
        "fewer equal neighbours than expected",
    ),
}
for _i, (_lo, _hi) in enumerate(zip(BAND_EDGES[:-1], BAND_EDGES[1:], strict=True)):
    _band = f"power at {_lo:g}–{_hi:g} cycles/µm than qOBM phase has"
    _hint = " (wrong pixel size?)"
    if _i == 0:
        _hint = " (an intensity image, or uneven background?)"
    elif _i > ANCHOR_BAND:  # fine-scale power: white noise has it too
        _hint = " (noise, or coarser pixels than assumed?)"
    _WORDS[f"band{_i}"] = (f"more {_band}{_hint}", f"less {_band} (wrong pixel size?)")


def _crop(plane: np.ndarray) -> np.ndarray:
    """A deterministic central crop of at most MAX_SIDE per side."""
    h, w = plane.shape
    y0, x0 = max(0, (h - MAX_SIDE) // 2), max(0, (w - MAX_SIDE) // 2)
    return plane[y0 : y0 + min(h, MAX_SIDE), x0 : x0 + min(w, MAX_SIDE)]


def _normalise(x: np.ndarray) -> np.ndarray:
    """(x - median) / (1.4826 MAD); the std, then 1, stand in when MAD is 0."""
    med = float(np.median(x))
    dev = np.abs(x - med)
    spread = 1.4826 * float(np.median(dev))
    if not spread > 0:
        spread = float(dev.mean()) or 1.0
    return (x - med) / spread


def _band_powers(z: np.ndarray, pixel_size: float, k_max: float = math.inf) -> np.ndarray:
    """log10 mean power per band (Hann-windowed periodogram) minus that of the anchor band.

    Bands reaching above ``k_max`` (cycles/µm; below the input's own Nyquist frequency when it
    was up-sampled) were never measured and are NaN.
    """
    from scipy import fft

    h, w = z.shape
    win = np.outer(np.hanning(h), np.hanning(w))
    p = np.abs(fft.rfft2((z - z.mean()) * win)) ** 2
    k = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]) / pixel_size
    logp = np.full(len(BAND_EDGES) - 1, np.nan)
    for i, (lo, hi) in enumerate(zip(BAND_EDGES[:-1], BAND_EDGES[1:], strict=True)):
        m = (k >= lo) & (k < hi)
        if hi <= k_max * 1.001 and m.sum() >= 4:
            logp[i] = math.log10(max(float(p[m].mean()), 1e-30))
    return logp - logp[ANCHOR_BAND]


def features(
    plane, pixel_size: float | None = None, reference_pixel_size: float = DEFAULT_PIXEL_SIZE
) -> dict[str, float]:
    """The feature values of one 2-D plane (NaN where a feature cannot be computed).

    ``pixel_size``: µm/px of ``plane`` (None: ``reference_pixel_size``); spectra and correlations
    are computed after resampling to ``reference_pixel_size``, the reference fields' pixel size.
    """
    ref_px = float(reference_pixel_size)
    px = float(pixel_size) if pixel_size else ref_px
    x = np.asarray(_crop(np.asarray(plane)), dtype=np.float64)
    finite = np.isfinite(x)
    if not finite.all():
        x = np.where(finite, x, np.median(x[finite]) if finite.any() else 0.0)
    flat = float(
        (np.count_nonzero(np.diff(x, axis=0) == 0) + np.count_nonzero(np.diff(x, axis=1) == 0))
        / max(1, (x.shape[0] - 1) * x.shape[1] + x.shape[0] * (x.shape[1] - 1))
    )
    z = _normalise(x)
    q = np.percentile(z, [0.5, 5, 25, 50, 75, 95, 99.5])
    core = q[4] - q[2]
    span = q[5] - q[1]
    skew = float((q[5] + q[1] - 2 * q[3]) / span) if span > 0 else 0.0
    tails = float(np.log((q[6] - q[0]) / core)) if core > 0 and q[6] > q[0] else float("nan")
    zc = np.clip(z, -CLIP, CLIP)
    k_max = math.inf
    if abs(px / ref_px - 1.0) > 0.01:  # spectra and correlations at the model's pixel size
        from skimage.transform import rescale

        zc = rescale(zc, px / ref_px, order=1, mode="reflect", anti_aliasing=px < ref_px)
        if px > ref_px:  # up-sampled: nothing near or above the input's Nyquist was measured
            k_max = NYQUIST_FRACTION * 0.5 / px
    zc = zc - zc.mean()
    if float((zc * zc).mean()) > 0:
        bands = _band_powers(zc, ref_px, k_max)
    else:
        bands = np.full(len(BAND_EDGES) - 1, np.nan)
    hi, lo = q[6] - q[3], q[3] - q[0]
    asym = float(np.log(hi / lo)) if hi > 0 and lo > 0 else float("nan")
    out = {"skew": skew, "asym": asym, "tails": tails, "flat": flat}
    out.update({f"band{i}": float(b) for i, b in enumerate(bands) if i != ANCHOR_BAND})
    return out


@functools.lru_cache(maxsize=1)
def _load_packaged_reference() -> dict:
    return json.loads(REFERENCE_PATH.read_text())


def load_reference(path=None) -> dict:
    """The reference (per-feature centre and spread, threshold) from JSON; packaged by default."""
    if path is None:
        return _load_packaged_reference()
    return json.loads(Path(path).read_text())


def _rms(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values) / len(values)) if values else 0.0


def ood_score(plane, pixel_size: float | None = None, reference: dict | None = None) -> dict:
    """Score one 2-D plane: ``{"score", "threshold", "flag", "reasons", "z"}``.

    ``pixel_size``: µm/px of ``plane`` (None: assumed to be the model's). ``reference``: a dict
    as in ``weights/ood_reference.json`` (None: the packaged one).
    ``score`` is the larger of the root-mean-square robust z-scores (against the training-like
    reference fields) of the value features and of the spatial features (``GROUPS``); ``flag`` is ``score > threshold``; ``reasons`` names the (at most two)
    features furthest out, in words; ``z`` holds every feature's z-score.
    """
    ref = load_reference() if reference is None else reference
    a = np.asarray(plane)
    if a.ndim != 2:
        raise ValueError(f"ood_score needs one 2-D plane, got shape {a.shape}")
    threshold = float(ref["threshold"])
    if min(a.shape) < MIN_SIDE:
        return {
            "score": None,
            "threshold": threshold,
            "flag": False,
            "reasons": [f"not scored: smaller than {MIN_SIDE} px per side"],
            "z": {},
        }
    f = features(a, pixel_size, float(ref.get("pixel_size", DEFAULT_PIXEL_SIZE)))
    zs: dict[str, float] = {}
    for name, stats in ref["features"].items():
        v = f.get(name, float("nan"))
        if math.isfinite(v):
            zs[name] = (v - float(stats["center"])) / float(stats["spread"])
    score = max((_rms([zs[n] for n in g if n in zs]) for g in GROUPS.values()), default=0.0)
    flag = score > threshold
    top = sorted(zs, key=lambda n: -abs(zs[n]))[:2]
    reasons = [
        f"{_WORDS[n][0 if zs[n] > 0 else 1]} (z = {zs[n]:+.1f})"
        for n in top
        if abs(zs[n]) > REASON_Z or (flag and n == top[0])
    ]
    return {
        "score": round(float(score), 3),
        "threshold": threshold,
        "flag": bool(flag),
        "reasons": reasons,
        "z": {n: round(v, 3) for n, v in zs.items()},
    }


def check_plane(plane, pixel_size: float | None = None) -> dict:
    """`ood_score` that never raises (the warning must never block staining)."""
    try:
        return ood_score(plane, pixel_size)
    except Exception as e:  # noqa: BLE001 - a missing/broken reference must not stop a stain
        return {"score": None, "threshold": None, "flag": False, "reasons": [f"not scored: {e}"]}


def summarise(per_plane: dict[tuple, dict]) -> dict | None:
    """One `info["ood"]` for an image or stack, with ``note``: the line to show when flagged.

    For a stack: the worst plane's score (``plane`` names it), ``planes_flagged`` and ``planes``.
    """
    if not per_plane:
        return None
    scored = {k: v for k, v in per_plane.items() if v.get("score") is not None}
    worst_idx = max(scored, key=lambda k: scored[k]["score"]) if scored else next(iter(per_plane))
    worst = dict(per_plane[worst_idx])
    n_flag = sum(bool(v.get("flag")) for v in per_plane.values())
    stack = len(per_plane) > 1 or worst_idx != ()
    if stack:
        worst.update(plane=list(worst_idx), planes_flagged=n_flag, planes=len(per_plane))
    worst["note"] = None
    if not n_flag:
        return worst
    why = "; ".join(worst["reasons"]) or "unusual statistics"
    what = f"OOD score {worst['score']:.1f} > {worst['threshold']:g}: {why}"
    if stack:
        what = f"{n_flag} of {len(per_plane)} planes; worst plane {tuple(worst_idx)}: {what}"
    worst["note"] = (
        f"input does not look like the qOBM phase the model was trained on ({what}); the stain "
        "may be wrong: check that it is a phase image and that its pixel size is right"
    )
    return worst
