"""Image and object metrics for virtual DAPI: pixel agreement, nuclei found/missed/invented, realism.

Pure numpy / scipy / scikit-image (no torch, no Qt). Every function returns finite, defined values on
degenerate input (constant images, no nuclei, empty predictions) so a benchmark never dies on NaN;
the conventions are listed in `docs/metrics.md`. The one exception is `edge_sharpness`, which is
NaN when there is no nuclear boundary to measure (no true nuclei); averages over fields skip it.

Conventions
-----------
* Pixel metrics (SSIM, PSNR, NRMSE, realism) are computed after ONE shared normalisation: the 1st and
  99.8th percentiles of the *target* map to 0 and 1, the same affine map is applied to the
  prediction, and both are clipped to [0, 1]. SSIM then uses ``data_range=1``.
* Nuclei are segmented from a DAPI image (predicted or true) with one fixed pipeline
  (`segment_nuclei`) and matched to ground-truth labels one-to-one by the Hungarian algorithm on IoU
  (`match_nuclei`); a pair counts only if IoU >= 0.5. Unmatched predictions that land on objects
  the true DAPI shows but the labels do not list (out-of-focus nuclei) are ignored, not counted as
  hallucinations (`unlabelled_mask`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment

__all__ = [
    "NORM_PERCENTILES",
    "PSNR_CAP_DB",
    "POWER_FLOOR",
    "SEG_SIGMA_PX",
    "SEG_BACKGROUND_UM",
    "SEG_PEAK_MIN_DISTANCE_UM",
    "SEG_MIN_AREA_UM2",
    "SEG_MIN_CONTRAST",
    "SEG_PEAK_H_UM",
    "HARD_CNR_THRESHOLD",
    "HARD_IN_SECTION_THRESHOLD",
    "DISTRACTOR_RADIUS_UM",
    "CNR_BINS",
    "IGNORE_FRACTION",
    "NucleiMatch",
    "unlabelled_mask",
    "normalize_pair",
    "pearson",
    "ssim",
    "psnr",
    "nrmse",
    "radial_log_power",
    "realism_distance",
    "EDGE_SIGMA_PX",
    "edge_sharpness",
    "rim_slope",
    "segment_nuclei",
    "match_nuclei",
    "nuclei_scores",
    "recall_by_contrast",
    "hard_nuclei_mask",
    "hard_subset_scores",
    "sample_plane",
    "image_metrics",
]

#: Target percentiles mapped to 0 and 1 before SSIM / PSNR / NRMSE / realism.
NORM_PERCENTILES: tuple[float, float] = (1.0, 99.8)
#: PSNR of a perfect prediction (MSE = 0) is reported as this value instead of +inf (JSON-safe).
PSNR_CAP_DB = 100.0
#: Spectral power floor for the realism distance: about the power of 8-bit quantisation noise on a
#: 0-1 scale ((1/255)^2 / 12 = 1.3e-6), so a flat image costs a bounded, not astronomical, distance.
POWER_FLOOR = 1e-6
#: Gaussian smoothing (px) of prediction and truth before the edge-sharpness gradient: the true
#: DAPI carries Poisson shot noise whose pixel-to-pixel steps would otherwise inflate the truth's
#: gradient (measured in docs/metrics.md, "Edge sharpness").
EDGE_SIGMA_PX = 1.0

#: Segmentation pipeline parameters (documented in docs/metrics.md; change = new BENCHMARK_VERSION).
SEG_SIGMA_PX = 1.0
SEG_BACKGROUND_UM = 12.0
SEG_PEAK_MIN_DISTANCE_UM = 3.0
SEG_MIN_AREA_UM2 = 8.0
SEG_MIN_CONTRAST = 0.05
SEG_PEAK_H_UM = 0.25
#: An unmatched predicted object at least this much inside an unlabelled DAPI object is ignored.
IGNORE_FRACTION = 0.5

#: Hard subset: a nucleus is hard if its phase |CNR| is below this ...
HARD_CNR_THRESHOLD = 1.0
#: ... or less than this fraction of it lies inside the qOBM optical section.
HARD_IN_SECTION_THRESHOLD = 0.5
#: An unmatched predicted object within this distance of a distractor is a distractor hallucination.
DISTRACTOR_RADIUS_UM = 3.0
#: Bin edges of |CNR| for recall as a function of phase contrast.
CNR_BINS: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0, float("inf"))


# --------------------------------------------------------------------------- validation helpers


def _as_image(x: Any, name: str, ndim: int | None = 2) -> np.ndarray:
    """A finite float64 array, or a ValueError/TypeError that says what to pass instead."""
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name} must be a numpy array, got {type(x).__name__}")
    try:
        a = np.asarray(x)
    except Exception as e:  # pragma: no cover - exotic array-likes
        raise TypeError(f"{name} must be array-like: {e}") from e
    if a.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(
            f"{name} must be {ndim}D (H, W), got shape {a.shape}; "
            "pass one plane at a time (e.g. image[z])"
        )
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape})")
    a = a.astype(np.float64, copy=False)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf; replace them (e.g. np.nan_to_num) first")
    return a


def _pair(pred: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    p = _as_image(pred, "pred", ndim=None)
    t = _as_image(target, "target", ndim=None)
    if p.shape != t.shape:
        raise ValueError(f"pred shape {p.shape} != target shape {t.shape}; crop or resize to match")
    return p, t


def _as_labels(x: Any, name: str) -> np.ndarray:
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name} must be an integer label image, got {type(x).__name__}")
    a = np.asarray(x)
    if a.dtype.kind == "b":
        a = a.astype(np.int64)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer label image (0 = background), got {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2D (H, W), got shape {a.shape}")
    if a.size and a.min() < 0:
        raise ValueError(f"{name} has negative labels; use 0 for background and 1..N for objects")
    return a.astype(np.int64, copy=False)


def _check_pixel_size(pixel_size: Any) -> float:
    try:
        ps = float(pixel_size)
    except (TypeError, ValueError) as e:
        raise TypeError(f"pixel_size must be a number in µm/px, got {pixel_size!r}") from e
    if not np.isfinite(ps) or ps <= 0:
        raise ValueError(f"pixel_size must be a positive number of µm/px, got {pixel_size!r}")
    return ps


# --------------------------------------------------------------------------- pixel metrics


def normalize_pair(
    pred: Any, target: Any, percentiles: tuple[float, float] = NORM_PERCENTILES
) -> tuple[np.ndarray, np.ndarray]:
    """Map the target's percentiles to [0, 1] and apply the SAME map to the prediction, then clip.

    Using the target's statistics for both keeps a too-dark or too-bright prediction penalised
    (normalising each image by itself would hide intensity errors). A constant target has no
    range: the joint min/max of both images is used instead, and if that is constant too both
    become zeros (identical images stay identical).
    """
    p, t = _pair(pred, target)
    lo, hi = np.percentile(t, percentiles)
    if not hi - lo > 1e-12 * max(1.0, abs(hi)):
        lo = min(p.min(), t.min())
        hi = max(p.max(), t.max())
    if not hi - lo > 1e-12 * max(1.0, abs(hi)):
        return np.zeros_like(p), np.zeros_like(t)
    scale = 1.0 / (hi - lo)
    return np.clip((p - lo) * scale, 0.0, 1.0), np.clip((t - lo) * scale, 0.0, 1.0)


def pearson(a: Any, b: Any) -> float:
    """Pearson correlation of all pixels (scale- and offset-free).

    Undefined when an image is constant; then 1.0 if the two images are equal, else 0.0.
    """
    x, y = _pair(a, b)
    if x.max() == x.min() or y.max() == y.min():
        return 1.0 if np.array_equal(x, y) else 0.0
    x = x.ravel() - x.mean()
    y = y.ravel() - y.mean()
    sx = np.sqrt(np.dot(x, x))
    sy = np.sqrt(np.dot(y, y))
    if sx == 0.0 or sy == 0.0:  # pragma: no cover - only with denormal ranges
        return 0.0
    return float(np.clip(np.dot(x, y) / (sx * sy), -1.0, 1.0))


def _ssim_raw(p: np.ndarray, t: np.ndarray, data_range: float) -> float:
    from skimage.metrics import structural_similarity

    # Wang et al. 2004: 11x11 Gaussian window (sigma 1.5), population covariance.
    if min(p.shape[-2:]) < 11:
        raise ValueError(
            f"SSIM needs images of at least 11x11 pixels (Gaussian window), got {p.shape}"
        )
    return float(
        structural_similarity(
            t,
            p,
            data_range=data_range,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
    )


def ssim(pred: Any, target: Any, normalize: bool = True) -> float:
    """SSIM with the Wang et al. settings, after `normalize_pair` (data_range = 1).

    With ``normalize=False`` the images are used as given and data_range is the target's range
    (max - min), or 1.0 for a constant target.
    """
    if normalize:
        p, t = normalize_pair(pred, target)
        dr = 1.0
    else:
        p, t = _pair(pred, target)
        dr = float(t.max() - t.min()) or 1.0
    if p.ndim != 2:
        raise ValueError(f"ssim expects 2D images (H, W), got shape {p.shape}")
    return _ssim_raw(p, t, dr)


def psnr(pred: Any, target: Any) -> float:
    """PSNR in dB after `normalize_pair` (peak = 1); a perfect match gives PSNR_CAP_DB, not inf."""
    p, t = normalize_pair(pred, target)
    mse = float(np.mean((p - t) ** 2))
    if mse <= 10.0 ** (-PSNR_CAP_DB / 10.0):
        return PSNR_CAP_DB
    return float(10.0 * np.log10(1.0 / mse))


def nrmse(pred: Any, target: Any) -> float:
    """||t - p|| / ||t|| after `normalize_pair` (0 = perfect, 1 = predicting all zeros).

    For an all-zero normalised target the denominator is sqrt(N), i.e. plain RMSE on the 0-1 scale.
    """
    p, t = normalize_pair(pred, target)
    num = float(np.sqrt(np.sum((t - p) ** 2)))
    den = float(np.sqrt(np.sum(t**2)))
    if den == 0.0:
        den = float(np.sqrt(t.size))
    return num / den


def radial_log_power(img: Any, n_bins: int = 32) -> np.ndarray:
    """Radially averaged log10 power spectrum in ``n_bins`` equal frequency bins (0, 0.5] cycles/px.

    The mean is removed and a Hann window applied first so the image border (a sharp edge under
    the FFT's periodic assumption) does not add spurious high-frequency power.
    """
    a = _as_image(img, "img")
    h, w = a.shape
    win = np.outer(np.hanning(h), np.hanning(w)) if min(h, w) > 2 else np.ones_like(a)
    f = np.fft.fft2((a - a.mean()) * win)
    power = (f.real**2 + f.imag**2) / max(float(np.sum(win**2)), 1e-12)
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    r = np.sqrt(fy**2 + fx**2)
    edges = np.linspace(0.0, 0.5, n_bins + 1)
    idx = np.digitize(r.ravel(), edges[1:], right=True)  # bin 0 holds (0, edge1]; DC excluded below
    keep = (r.ravel() > 0) & (r.ravel() <= 0.5)
    sums = np.bincount(idx[keep], weights=power.ravel()[keep], minlength=n_bins)[:n_bins]
    counts = np.bincount(idx[keep], minlength=n_bins)[:n_bins]
    mean = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    return np.log10(np.maximum(mean, POWER_FLOOR))


def realism_distance(pred: Any, target: Any, n_bins: int = 32) -> float:
    """Mean |difference| of radially averaged log10 power spectra (decades; 0 = same texture).

    Computed on the jointly normalised images, so both missing texture (blur: a high-frequency
    deficit) and invented texture or noise (an excess) increase it. Needs no trained network.
    """
    p, t = normalize_pair(pred, target)
    if p.ndim != 2:
        raise ValueError(f"realism expects 2D images (H, W), got shape {p.shape}")
    sp = radial_log_power(p, n_bins)
    st = radial_log_power(t, n_bins)
    return float(np.mean(np.abs(sp - st)))


def _gradient_magnitude(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """|grad| in intensity per pixel: optional Gaussian smoothing, then Sobel (kernel sum 8)."""
    a = ndi.gaussian_filter(img, sigma_px) if sigma_px > 0 else img
    return np.hypot(ndi.sobel(a, axis=0), ndi.sobel(a, axis=1)) / 8.0


def _rim_inputs(pred, target, true_labels, sigma_px: float, name: str):
    """(prediction, truth, true labels) checked for the rim metrics: 2-D, same shape, sigma >= 0."""
    p, t = _pair(pred, target)
    if p.ndim != 2:
        raise ValueError(f"{name} expects 2D images (H, W), got shape {p.shape}")
    tl = _as_labels(true_labels, "true_labels")
    if tl.shape != p.shape:
        raise ValueError(f"true_labels shape {tl.shape} != image shape {p.shape}")
    if not np.isfinite(sigma_px) or sigma_px < 0:
        raise ValueError(f"sigma_px must be a number >= 0 (pixels), got {sigma_px!r}")
    return p, t, tl


def edge_sharpness(
    pred: Any, target: Any, true_labels: Any, sigma_px: float = EDGE_SIGMA_PX
) -> float:
    """Mean gradient magnitude of the prediction on the TRUE nuclear boundaries over the same for
    the truth (1.0 = as sharp as the truth, < 1 blurrier, > 1 sharper or more contrasted).

    Why: the pixel metrics reward the blurry conditional mean, and the spectral `realism_distance`
    looks at the whole field; this looks only where a stain must be crisp, at nuclear rims.
    Boundaries are ``find_boundaries(true_labels, mode="thick")``: the pixels on both sides of
    every label edge (also between touching nuclei). Both images are smoothed with a Gaussian of
    ``sigma_px`` first so the truth's shot noise does not count as sharpness. The images are used
    as given (DAPI, 0-1): the ratio does not change under an affine map applied to both, but a
    lower-contrast prediction scores lower, as intended (a washed-out stain looks blurry too).
    NaN when there are no true nuclei or the truth has no gradient on them (nothing to compare).
    """
    from skimage.segmentation import find_boundaries

    p, t, tl = _rim_inputs(pred, target, true_labels, sigma_px, "edge_sharpness")
    rim = find_boundaries(tl, mode="thick")
    if not rim.any():
        return float("nan")
    g_true = float(_gradient_magnitude(t, sigma_px)[rim].mean())
    if not g_true > 0:
        return float("nan")
    return float(_gradient_magnitude(p, sigma_px)[rim].mean() / g_true)


def rim_slope(pred: Any, target: Any, true_labels: Any, sigma_px: float = EDGE_SIGMA_PX) -> float:
    """Mean intensity slope of the prediction ACROSS the true nuclear rims (along the rim's
    normal, into the nucleus) over the same for the truth: 1.0 = as steep as the truth.

    Why beside `edge_sharpness`: a gradient magnitude counts noise as sharpness, so a stain drawn
    with grain (a texture decoder, Pix2Pix's invented texture) scores sharper rims without having
    any. The slope along the normal is signed: zero-mean noise averages out, and only an
    intensity step where the true rim is counts. The normal is that of the true nuclear mask
    smoothed by `sigma_px`; rim pixels where that mask is flat (between touching nuclei) are left
    out. Same smoothing, rims and NaN rules as `edge_sharpness`."""
    from skimage.segmentation import find_boundaries

    p, t, tl = _rim_inputs(pred, target, true_labels, sigma_px, "rim_slope")
    mask = ndi.gaussian_filter((tl > 0).astype(np.float64), max(sigma_px, 0.5))
    ny, nx = ndi.sobel(mask, axis=0), ndi.sobel(mask, axis=1)
    norm = np.hypot(ny, nx)
    rim = find_boundaries(tl, mode="thick") & (norm > 1e-3 * max(float(norm.max()), 1e-12))
    if not rim.any():
        return float("nan")
    ny, nx = ny[rim] / norm[rim], nx[rim] / norm[rim]

    def slope(img: np.ndarray) -> float:
        a = ndi.gaussian_filter(img, sigma_px) if sigma_px > 0 else img
        return float(np.mean(ndi.sobel(a, axis=0)[rim] * ny + ndi.sobel(a, axis=1)[rim] * nx))

    s_true = slope(t)
    if not s_true > 0:
        return float("nan")
    return slope(p) / s_true


# --------------------------------------------------------------------------- segmentation


def _filter_small(labels: np.ndarray, min_px: int) -> np.ndarray:
    if labels.max() == 0:
        return labels
    sizes = np.bincount(labels.ravel())
    small = sizes < min_px
    small[0] = False
    out = labels.copy()
    out[small[labels]] = 0
    return out


def segment_nuclei(
    dapi: Any,
    pixel_size: float,
    *,
    sigma_px: float = SEG_SIGMA_PX,
    background_um: float = SEG_BACKGROUND_UM,
    peak_min_distance_um: float = SEG_PEAK_MIN_DISTANCE_UM,
    min_area_um2: float = SEG_MIN_AREA_UM2,
    min_contrast: float = SEG_MIN_CONTRAST,
    peak_h_um: float = SEG_PEAK_H_UM,
) -> np.ndarray:
    """Nucleus instance labels (int32, 0 = background) from a DAPI image in 0-1 units.

    The ONE pipeline used for predictions and for the oracle alike: Gaussian smoothing
    (``sigma_px``), haze removal (subtract a grey opening with a flat square of side
    ``background_um``: widefield out-of-focus haze is broader than any nucleus, so a global
    threshold would otherwise merge nuclei sitting on it), Otsu threshold, hole filling (dim nucleoli), removal of objects smaller than
    ``min_area_um2``, then a watershed of the negated Euclidean distance transform seeded at its
    local maxima that are at least ``peak_min_distance_um`` apart and rise ``peak_h_um`` above
    their surroundings (splits touching nuclei at a neck, keeps elongated nuclei whole). If Otsu's two
    classes differ by less than ``min_contrast`` (DAPI units) the image has no nuclei: this keeps
    an empty or noise-only prediction from being carved into fake objects.
    """
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu
    from skimage.morphology import h_maxima
    from skimage.segmentation import relabel_sequential, watershed

    img = _as_image(dapi, "dapi")
    ps = _check_pixel_size(pixel_size)
    empty = np.zeros(img.shape, dtype=np.int32)
    smooth = ndi.gaussian_filter(img, sigma_px) if sigma_px > 0 else img
    if background_um > 0:
        side = max(3, int(round(background_um / ps)) | 1)
        smooth = smooth - ndi.grey_opening(smooth, size=(side, side))
    if smooth.max() - smooth.min() <= 0:
        return empty
    thr = float(threshold_otsu(smooth))
    mask = smooth > thr
    if not mask.any() or mask.all():
        return empty
    if smooth[mask].mean() - smooth[~mask].mean() < min_contrast:
        return empty
    mask = ndi.binary_fill_holes(mask)
    min_px = max(1, int(round(min_area_um2 / ps**2)))
    comps, _ = ndi.label(mask)
    comps = _filter_small(comps, min_px)
    mask = comps > 0
    if not mask.any():
        return empty
    dist = ndi.distance_transform_edt(mask, sampling=ps)  # µm to the background
    # A light blur of the distance map breaks ties on the flat ridge of an elongated nucleus.
    dist_s = ndi.gaussian_filter(dist, 1.0)
    # Seeds: maxima that rise at least `peak_h_um` above the saddle to any neighbour (h-maxima,
    # so a long nucleus keeps one seed) and are at least `peak_min_distance_um` apart.
    hmask = np.zeros(img.shape, dtype=bool)
    for k, sl in enumerate(ndi.find_objects(comps), start=1):
        if sl is None:  # removed as too small
            continue
        sl = tuple(slice(max(0, a.start - 1), a.stop + 1) for a in sl)
        own = comps[sl] == k
        # per component: the same result as on the whole image, ~3x faster on large fields
        hmask[sl] |= (h_maxima(np.where(own, dist_s[sl], 0.0), peak_h_um) > 0) & own
    hmax, _ = ndi.label(hmask)
    min_dist_px = max(1, int(round(peak_min_distance_um / ps)))
    peaks = peak_local_max(
        np.where(hmax > 0, dist_s, 0.0),
        min_distance=min_dist_px,
        labels=comps,
        exclude_border=False,
    )
    markers = np.zeros(img.shape, dtype=np.int32)
    if len(peaks):
        keep_regions = np.unique(hmax[tuple(peaks.T)])
        keep_regions = keep_regions[keep_regions > 0]
        sel = np.isin(hmax, keep_regions)
        markers[sel] = hmax[sel]
    labels = watershed(-dist_s, markers, mask=mask).astype(np.int32)
    # Components that received no seed (possible for tiny plateaus) are kept whole.
    orphan = mask & (labels == 0)
    if orphan.any():
        extra, _ = ndi.label(orphan)
        labels[orphan] = extra[orphan] + labels.max()
    labels = _filter_small(labels, min_px)
    return relabel_sequential(labels)[0].astype(np.int32)


# --------------------------------------------------------------------------- matching


@dataclass
class NucleiMatch:
    """One-to-one matches between predicted and true objects (labels as in the input images)."""

    pairs: np.ndarray  # (K, 2) int64 rows (pred_label, true_label)
    ious: np.ndarray  # (K,) IoU of each pair
    pred_labels: np.ndarray  # all predicted labels present (sorted)
    true_labels: np.ndarray  # all true labels present (sorted)
    threshold: float = 0.5
    unmatched_pred: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    unmatched_true: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    #: unmatched predictions lying on an unlabelled object of the true DAPI: neither TP nor FP
    ignored_pred: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def false_pred(self) -> np.ndarray:
        """Labels of the false positives: unmatched and not ignored."""
        return self.unmatched_pred[~np.isin(self.unmatched_pred, self.ignored_pred)]

    @property
    def tp(self) -> int:
        return int(len(self.pairs))

    @property
    def fp(self) -> int:
        return int(len(self.false_pred))

    @property
    def n_ignored(self) -> int:
        return int(len(self.ignored_pred))

    @property
    def fn(self) -> int:
        return int(len(self.true_labels) - len(self.pairs))

    @property
    def n_pred(self) -> int:
        return int(len(self.pred_labels))

    @property
    def n_true(self) -> int:
        return int(len(self.true_labels))


def match_nuclei(
    pred_labels: Any,
    true_labels: Any,
    iou: float = 0.5,
    ignore: Any = None,
    ignore_fraction: float = IGNORE_FRACTION,
) -> NucleiMatch:
    """Hungarian (maximum total IoU) one-to-one matching; pairs below ``iou`` are not matches.

    ``ignore`` (a boolean mask, e.g. from `unlabelled_mask`) marks DAPI-visible objects that the
    ground truth does not label: an unmatched prediction with at least ``ignore_fraction`` of its
    pixels there is reported in ``ignored_pred`` and counts neither as TP nor as FP.
    """
    p = _as_labels(pred_labels, "pred_labels")
    t = _as_labels(true_labels, "true_labels")
    if p.shape != t.shape:
        raise ValueError(f"pred_labels shape {p.shape} != true_labels shape {t.shape}")
    if not 0.0 < float(iou) <= 1.0:
        raise ValueError(f"iou threshold must be in (0, 1], got {iou}")
    m = _match(p, t, float(iou))
    if ignore is not None and len(m.unmatched_pred):
        ig = np.asarray(ignore)
        if ig.shape != p.shape:
            raise ValueError(f"ignore mask shape {ig.shape} != label shape {p.shape}")
        frac = np.asarray(ndi.mean(ig > 0, labels=p, index=m.unmatched_pred), dtype=float)
        m.ignored_pred = m.unmatched_pred[frac >= ignore_fraction]
    return m


def _match(p: np.ndarray, t: np.ndarray, iou: float) -> NucleiMatch:
    pl = np.unique(p)
    pl = pl[pl > 0]
    tl = np.unique(t)
    tl = tl[tl > 0]
    if len(pl) == 0 or len(tl) == 0:
        return NucleiMatch(np.zeros((0, 2), np.int64), np.zeros(0), pl, tl, float(iou), pl, tl)
    # Intersections from the pixels where both are foreground (a sparse contingency table).
    both = (p > 0) & (t > 0)
    pi = np.searchsorted(pl, p[both])
    ti = np.searchsorted(tl, t[both])
    code = pi * len(tl) + ti
    uc, inter = np.unique(code, return_counts=True)
    ip, it = np.divmod(uc, len(tl))
    area_p = np.bincount(np.searchsorted(pl, p[p > 0]), minlength=len(pl))
    area_t = np.bincount(np.searchsorted(tl, t[t > 0]), minlength=len(tl))
    ious = inter / (area_p[ip] + area_t[it] - inter)
    ok = ious >= float(iou) - 1e-12
    ip, it, ious = ip[ok], it[ok], ious[ok]
    if len(ip) == 0:
        return NucleiMatch(np.zeros((0, 2), np.int64), np.zeros(0), pl, tl, float(iou), pl, tl)
    # Hungarian on the candidate sub-matrix only (IoU >= threshold is sparse).
    rows, rinv = np.unique(ip, return_inverse=True)
    cols, cinv = np.unique(it, return_inverse=True)
    m = np.zeros((len(rows), len(cols)))
    m[rinv, cinv] = ious
    r, c = linear_sum_assignment(m, maximize=True)
    keep = m[r, c] >= float(iou) - 1e-12
    r, c = r[keep], c[keep]
    pairs = np.stack([pl[rows[r]], tl[cols[c]]], axis=1).astype(np.int64)
    got_p = np.isin(pl, pairs[:, 0])
    got_t = np.isin(tl, pairs[:, 1])
    return NucleiMatch(pairs, m[r, c].astype(float), pl, tl, float(iou), pl[~got_p], tl[~got_t])


def nuclei_scores(
    pred_labels: Any, true_labels: Any, iou: float = 0.5, match: NucleiMatch | None = None
) -> dict[str, float]:
    """Recall, precision, F1, missed (1 - recall), hallucinated (FP / predicted) and counts.

    Conventions when a count is zero: no true and no predicted nuclei -> everything perfect (1, 1, 1,
    0, 0); no true nuclei but predictions -> recall 1, precision 0, F1 0, hallucinated 1; true
    nuclei but an empty prediction -> recall 0, precision 0, F1 0, hallucinated 0.
    """
    m = match if match is not None else match_nuclei(pred_labels, true_labels, iou)
    tp, fp, fn, n_true = m.tp, m.fp, m.fn, m.n_true
    n_pred = tp + fp  # ignored predictions (unlabelled DAPI objects) are left out
    recall = tp / n_true if n_true else 1.0
    if n_pred:
        precision = tp / n_pred
    else:
        precision = 1.0 if n_true == 0 else 0.0
    denom = 2 * tp + fp + fn
    f1 = 2 * tp / denom if denom else 1.0
    return {
        "recall": float(recall),
        "precision": float(precision),
        "f1": float(f1),
        "missed": float(1.0 - recall),
        "hallucinated": float(fp / n_pred) if n_pred else 0.0,
        "mean_iou": float(np.mean(m.ious)) if tp else 0.0,
        "tp": int(tp),
        "fp": int(fp),
        "fn": int(fn),
        "n_pred": int(n_pred),
        "n_true": int(n_true),
        "n_ignored": int(m.n_ignored),
    }


def unlabelled_mask(
    target: Any, true_labels: Any, pixel_size: float, iou: float = 0.5
) -> np.ndarray:
    """Where the true DAPI shows objects that the ground-truth labels do not list.

    The pipeline run on the TRUE DAPI finds every DAPI-visible object; those that match no labelled
    nucleus (out-of-focus nuclei in the widefield haze, merged clumps) are neither right nor wrong
    to predict, so `match_nuclei` can ignore predictions that land on them.
    """
    tl = _as_labels(true_labels, "true_labels")
    oracle = segment_nuclei(target, pixel_size)
    if oracle.shape != tl.shape:
        raise ValueError(f"target shape {oracle.shape} != true_labels shape {tl.shape}")
    m = _match(oracle, tl, float(iou))
    return np.isin(oracle, m.unmatched_pred)


# --------------------------------------------------------------------------- contrast & hard subset


def _per_nucleus(values: Any, name: str, labels: np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).ravel()
    need = int(labels.max()) if labels.size else 0
    if len(v) < need:
        raise ValueError(
            f"{name} has {len(v)} entries but the labels go up to {need}; "
            f"{name}[label - 1] must exist for every nucleus"
        )
    return v


def recall_by_contrast(
    match: NucleiMatch,
    nucleus_cnr: Any,
    bins: Sequence[float] = CNR_BINS,
) -> list[dict[str, Any]]:
    """Recall of true nuclei binned by |phase CNR| (``nucleus_cnr[label - 1]``).

    Each bin reports its edges, the number of true nuclei and how many were matched, so bins can be
    pooled over images; ``recall`` is None for an empty bin.
    """
    edges = np.asarray(bins, dtype=float)
    if edges.ndim != 1 or len(edges) < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"bins must be increasing edges (at least 2), got {bins!r}")
    tl = match.true_labels
    cnr = np.asarray(nucleus_cnr, dtype=np.float64).ravel()
    if len(tl) and len(cnr) < int(tl.max()):
        raise ValueError(
            f"nucleus_cnr has {len(cnr)} entries but labels go up to {int(tl.max())}; "
            "nucleus_cnr[label - 1] must exist for every nucleus"
        )
    a = np.abs(cnr[tl - 1]) if len(tl) else np.zeros(0)
    matched = np.isin(tl, match.pairs[:, 1]) if len(tl) else np.zeros(0, bool)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (a >= lo) & (a < hi)
        n = int(sel.sum())
        k = int(matched[sel].sum())
        out.append(
            {
                "lo": float(lo),
                "hi": float(hi) if np.isfinite(hi) else None,
                "n_true": n,
                "n_matched": k,
                "recall": (k / n) if n else None,
            }
        )
    return out


#: |phase CNR| at and above which a nucleus counts as clear in the phase (`nuclear_brightness`).
CLEAR_CNR = 4.0


def nuclear_brightness(pred: Any, target: Any, true_labels: Any, nucleus_cnr: Any) -> dict:
    """How bright a prediction paints the true nuclei, for nuclei clear in the phase
    (|CNR| >= `CLEAR_CNR`) and for all: the summed contrast of each nucleus (its mean inside its
    true mask minus the background mean, background = outside every nucleus) in the prediction
    and in the truth, and the count. Sums, so that fields pool (`pool_brightness`): a model that
    paints clearly visible nuclei at half their brightness is regressing to a mean, not missing
    information (docs/teacher-diagnosis.md)."""
    p, t = _pair(pred, target)
    labels = _as_labels(true_labels, "true_labels")
    ids = np.arange(1, int(labels.max()) + 1) if labels.size else np.zeros(0, int)
    cnr = np.abs(_per_nucleus(nucleus_cnr, "nucleus_cnr", labels))[: len(ids)]
    out = {k: {"pred": 0.0, "truth": 0.0, "n": 0} for k in ("clear", "all")}
    bg = labels == 0
    if not len(ids) or not bg.any():
        return out
    present = ndi.sum(np.ones_like(labels), labels, ids) > 0
    truth = ndi.mean(t, labels, ids) - float(t[bg].mean())
    painted = ndi.mean(p, labels, ids) - float(p[bg].mean())
    for key, sel in (("clear", present & (cnr >= CLEAR_CNR)), ("all", present)):
        out[key] = {"pred": float(painted[sel].sum()), "truth": float(truth[sel].sum()),
                    "n": int(sel.sum())}  # fmt: skip
    return out


def pool_brightness(parts: Sequence[dict]) -> dict[str, float | None]:
    """`nuclear_brightness` of several fields pooled: summed painted ÷ summed true contrast
    (1 = as bright as the truth), per group; None where a group has no nuclei."""
    pooled = {}
    for key in ("clear", "all"):
        pr = sum(d[key]["pred"] for d in parts)
        tr = sum(d[key]["truth"] for d in parts)
        pooled[key] = pr / tr if sum(d[key]["n"] for d in parts) and tr > 0 else None
    return pooled


def hard_nuclei_mask(
    nucleus_cnr: Any,
    nucleus_in_section: Any,
    cnr_threshold: float = HARD_CNR_THRESHOLD,
    in_section_threshold: float = HARD_IN_SECTION_THRESHOLD,
) -> np.ndarray:
    """Boolean per nucleus (index label - 1): |CNR| < threshold OR in-section fraction < 0.5."""
    cnr = np.asarray(nucleus_cnr, dtype=np.float64).ravel()
    ins = np.asarray(nucleus_in_section, dtype=np.float64).ravel()
    if cnr.shape != ins.shape:
        raise ValueError(
            f"nucleus_cnr ({cnr.shape}) and nucleus_in_section ({ins.shape}) must have one entry "
            "per nucleus"
        )
    return (np.abs(cnr) < cnr_threshold) | (ins < in_section_threshold)


def sample_plane(sample: Any, z: int) -> SimpleNamespace:
    """One plane of a Z-stack SimSample as a 2-D record for `hard_subset_scores` / `image_metrics`."""
    nuclei = np.asarray(sample.nuclei)
    if nuclei.ndim != 3:
        raise ValueError(f"sample is not a Z stack (nuclei shape {nuclei.shape}); use it directly")
    return SimpleNamespace(
        qobm=np.asarray(sample.qobm)[z],
        dapi=np.asarray(sample.dapi)[z],
        nuclei=nuclei[z],
        distractors=np.asarray(sample.distractors)[z],
        nucleus_cnr=np.asarray(sample.nucleus_cnr)[z],
        nucleus_in_section=np.asarray(sample.nucleus_in_section)[z],
        pixel_size=sample.pixel_size,
    )


def _plane(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(
            f"{name} has shape {a.shape}; pass one 2-D plane (for a Z stack use sample_plane(s, z))"
        )
    return a


def hard_subset_scores(
    sample: Any,
    pred_labels: Any,
    match: NucleiMatch | None = None,
    *,
    iou: float = 0.5,
    cnr_threshold: float = HARD_CNR_THRESHOLD,
    in_section_threshold: float = HARD_IN_SECTION_THRESHOLD,
    radius_um: float = DISTRACTOR_RADIUS_UM,
) -> dict[str, float]:
    """Scores on what makes qOBM hard, from a SimSample-like record.

    ``sample`` needs ``nuclei``, ``distractors`` (label images), ``nucleus_cnr`` and
    ``nucleus_in_section`` (index label - 1) and ``pixel_size``. Reports recall on hard nuclei
    (low |CNR| or mostly outside the optical section, also each reason alone), and
    hallucinations near distractors: predicted objects matched to no true nucleus that come within
    ``radius_um`` of a distractor pixel (count, per predicted object, per distractor). ``hard_f1``
    counts matched hard nuclei as TP, missed hard nuclei as FN and distractor hallucinations as FP.
    """
    for attr in ("nuclei", "distractors", "nucleus_cnr", "nucleus_in_section", "pixel_size"):
        if not hasattr(sample, attr):
            raise TypeError(f"sample needs a '{attr}' field (a simulate.SimSample), missing")
    true = _as_labels(_plane(sample.nuclei, "sample.nuclei"), "sample.nuclei")
    distr = _as_labels(_plane(sample.distractors, "sample.distractors"), "sample.distractors")
    pl = _as_labels(pred_labels, "pred_labels")
    if pl.shape != true.shape or distr.shape != true.shape:
        raise ValueError(
            f"shapes differ: pred_labels {pl.shape}, nuclei {true.shape}, distractors {distr.shape}"
        )
    ps = _check_pixel_size(sample.pixel_size)
    m = match if match is not None else match_nuclei(pl, true, iou)
    cnr = _per_nucleus(sample.nucleus_cnr, "nucleus_cnr", true)
    ins = _per_nucleus(sample.nucleus_in_section, "nucleus_in_section", true)
    tl = m.true_labels
    matched = np.isin(tl, m.pairs[:, 1]) if len(tl) else np.zeros(0, bool)
    low = np.abs(cnr[tl - 1]) < cnr_threshold if len(tl) else np.zeros(0, bool)
    out_sec = ins[tl - 1] < in_section_threshold if len(tl) else np.zeros(0, bool)
    hard = low | out_sec

    def _rec(sel: np.ndarray) -> tuple[int, int, float]:
        n = int(sel.sum())
        k = int(matched[sel].sum())
        return n, k, (k / n if n else 1.0)

    n_hard, tp_hard, hard_recall = _rec(hard)
    n_low, tp_low, rec_low = _rec(low)
    n_out, tp_out, rec_out = _rec(out_sec)

    n_distr = int(len(np.unique(distr[distr > 0])))
    near = 0
    fps = m.false_pred
    if n_distr and len(fps):
        dist = ndi.distance_transform_edt(distr == 0, sampling=ps)
        dmin = ndi.minimum(dist, labels=pl, index=fps)
        near = int(np.sum(np.asarray(dmin) <= radius_um))
    fn_hard = n_hard - tp_hard
    denom = 2 * tp_hard + near + fn_hard
    return {
        "hard_recall": float(hard_recall),
        "hard_f1": float(2 * tp_hard / denom) if denom else 1.0,
        "n_hard": n_hard,
        "tp_hard": tp_hard,
        "low_contrast_recall": float(rec_low),
        "n_low_contrast": n_low,
        "tp_low_contrast": tp_low,
        "out_of_section_recall": float(rec_out),
        "n_out_of_section": n_out,
        "tp_out_of_section": tp_out,
        "hallu_near_distractors": near,
        "hallu_near_distractors_rate": float(near / (m.tp + m.fp)) if m.tp + m.fp else 0.0,
        "hallu_per_distractor": float(near / n_distr) if n_distr else 0.0,
        "n_distractors": n_distr,
    }


# --------------------------------------------------------------------------- one call


def image_metrics(
    pred: Any,
    target: Any,
    true_labels: Any = None,
    pixel_size: float | None = None,
    *,
    iou: float = 0.5,
    pred_labels: Any = None,
    sample: Any = None,
    ignore: Any = "auto",
) -> dict[str, Any]:
    """All metrics of one predicted DAPI plane against its target, as one flat dict.

    Pixel metrics always; nuclei metrics and `edge_sharpness` (NaN without true nuclei) when
    ``true_labels`` is given (the prediction is segmented
    with `segment_nuclei`, which needs ``pixel_size``, unless ``pred_labels`` is passed); hard-subset
    metrics when ``sample`` (a SimSample-like record for this plane) is given as well.
    ``ignore="auto"`` leaves out predictions that land on DAPI-visible but unlabelled objects of the
    target (`unlabelled_mask`); pass a precomputed mask to reuse it, or None to count them as FP.
    """
    p, t = _pair(pred, target)
    if p.ndim != 2:
        raise ValueError(f"image_metrics expects 2D planes (H, W), got shape {p.shape}")
    out: dict[str, Any] = {
        "pearson": pearson(p, t),
        "ssim": ssim(p, t),
        "psnr": psnr(p, t),
        "nrmse": nrmse(p, t),
        "realism": realism_distance(p, t),
    }
    if sample is not None and true_labels is None:
        true_labels = _plane(sample.nuclei, "sample.nuclei")
    if sample is not None and pixel_size is None:
        pixel_size = sample.pixel_size
    if true_labels is None:
        return out
    tl = _as_labels(true_labels, "true_labels")
    if tl.shape != p.shape:
        raise ValueError(f"true_labels shape {tl.shape} != image shape {p.shape}")
    if pred_labels is None:
        if pixel_size is None:
            raise ValueError("pixel_size (µm/px) is needed to segment nuclei; pass pixel_size=...")
        pred_labels = segment_nuclei(p, pixel_size)
    pl = _as_labels(pred_labels, "pred_labels")
    if isinstance(ignore, str):
        if ignore != "auto":
            raise ValueError(f"ignore must be 'auto', None or a boolean mask, got {ignore!r}")
        if pixel_size is None:
            raise ValueError("pixel_size (µm/px) is needed to find unlabelled DAPI objects")
        ignore = unlabelled_mask(t, tl, pixel_size, iou)
    m = match_nuclei(pl, tl, iou, ignore=ignore)
    out.update(nuclei_scores(pl, tl, match=m))
    out["edge_sharpness"] = edge_sharpness(p, t, tl)
    out["rim_slope"] = rim_slope(p, t, tl)
    if sample is not None:
        out.update(hard_subset_scores(sample, pl, match=m, iou=iou))
    return out
