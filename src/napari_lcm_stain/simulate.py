"""Physics-informed simulator of paired qOBM phase / widefield DAPI images.

No real qOBM data is available, so this module is the training data of the packaged model and the
yardstick of the benchmark. It models the instrument, not random blobs:

1. a 3-D ground-truth *scene* in µm (cells with nuclei, nucleoli, chromocentres and cell bodies;
   capillaries with red blood cells and endothelial nuclei; lipid droplets, fibres, granules, debris;
   a power-law refractive-index background) -- :func:`make_scene`;
2. *rendering* of that scene at one focal plane: the optical path difference inside the qOBM optical
   section (2-4 µm), the DNA map seen by a widefield DAPI camera (in-focus nuclei sharp, the
   ±10 µm around them as haze), nucleus and distractor labels -- :func:`render_scene`;
3. the *qOBM forward model*: four oblique raw captures with illumination fall-off, shot and read
   noise, two DPC images and Tikhonov deconvolution with a partially coherent weak-object transfer
   function (Tian & Waller 2015 form), exactly as the real reconstruction -- :func:`qobm_forward`;
4. the *DAPI forward model*: defocus blur by depth bin, haze, autofluorescence, Poisson noise on a
   fixed intensity scale -- :func:`dapi_forward`.

Ambiguity is part of the physics: nuclear contrast has either sign and is often ~0, cell bodies
vary, the DAPI depth of field is much larger than the qOBM optical section, nuclei crowd and
distractors sit next to nuclei. See docs/simulator.md for every parameter and its source.

Pure numpy/scipy/scikit-image; no torch, Qt or napari.
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import scipy.fft as sfft
from scipy import ndimage
from scipy.special import erf

__all__ = [
    "PRESETS",
    "QobmOutput",
    "Scene",
    "SimParams",
    "SimSample",
    "dapi_forward",
    "get_preset",
    "make_scene",
    "qobm_forward",
    "qobm_transfer_functions",
    "render_scene",
    "simulate_pair",
    "write_dataset",
    "DOMAIN_RANGES",
    "MODEL_PIXEL_SIZE",
    "RANDOM_PRESET",
    "DomainRange",
    "sample_instrument",
    "simulate_training_pair",
    "sample_tissue",
    "TISSUE_PRESET",
    "TISSUE_RANGES",
]

# Nucleus type codes (Scene.nuclei["kind"]).
GLIA, NEURON, LYMPHOCYTE, ENDOTHELIAL, TUMOUR, MITOTIC = range(6)
KIND_NAMES = ("glia", "neuron", "lymphocyte", "endothelial", "tumour", "mitotic")
# Distractor codes (Scene.blobs["kind"], Scene.tubes kind).
RBC, LIPID, GRANULE, DEBRIS, FIBRE, VESSEL = range(6)
DISTRACTOR_NAMES = ("red blood cell", "lipid droplet", "granule", "debris", "fibre", "vessel lumen")

_N_HARM = 3  # angular harmonics of the shape noise


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SimParams:
    """All simulator parameters, in physical units (µm, refractive-index differences, photons).

    Ranges ``(lo, hi)`` are sampled per image or per object. Sources are listed in docs/simulator.md.
    """

    name: str = "brain-20x"
    # --- qOBM optics -----------------------------------------------------------------------
    pixel_size: float = 0.414  # µm/px in the sample (6.5 µm camera pixel / ~15.7x); 20x qOBM
    # qOBM camera pixel when it is coarser than the simulation grid (the phase is imaged on that
    # coarser grid and interpolated back; DAPI and labels stay on the grid). None = the grid
    qobm_pixel_size: float | None = None
    wavelength_um: float = 0.72  # LED centre wavelength (720 nm; NIR for depth in tissue)
    na_objective: float = 0.40  # objective NA (20x/0.4)
    # illumination NA / objective NA (back-scattered light fills the pupil: σ ≈ 1)
    illum_na_ratio: float = 1.0
    illum_tilt: float = 0.6  # 0 = uniform half-pupil source; >0 weights oblique angles more (0..1)
    optical_section_um: float = 3.0  # axial thickness the qOBM phase integrates (2-4 µm)
    section_edge_um: float = 0.6  # softness (erf width) of the optical-section edges
    illum_rotation_deg: float = 0.0  # rotation of the two illumination axes vs the camera axes
    # relative power of the +x, -x, +y, -y sources (fibre coupling; 1 = balanced)
    source_gains: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    tikhonov_alpha: float = 5e-3  # Tikhonov regularisation of the deconvolution (brain: 5e-3)
    # --- reconstruction: the model of the instrument it assumes (None = the true value) -------
    recon_na_objective: float | None = None
    recon_wavelength_um: float | None = None
    recon_illum_na_ratio: float | None = None
    recon_illum_tilt: float | None = None
    recon_illum_rotation_deg: float | None = None
    dpc_axes: str = "xy"  # "xy": both DPC axes; "x": single-axis DPC (the y pair is not used)
    # "tikhonov": WOTF deconvolution; "gradient": DPC integrated as a pure phase gradient (no WOTF)
    reconstruction: str = "tikhonov"
    background_sigma_um: float = 25.0  # DPC background subtraction (Gaussian low-pass), µm
    photons: float = 10000.0  # mean detected photons per pixel per raw capture
    read_noise_e: float = 2.0  # camera read noise, electrons rms
    falloff: float = 0.35  # illumination fall-off across the field (fraction, linear + vignette)
    # --- tissue: refractive index (Δn relative to the surrounding neuropil/stroma) ------------
    # in-focus (labelled) nuclei per 100x100 µm field, sampled log-uniformly per image
    nuclei_per_100um2: tuple[float, float] = (12.0, 30.0)
    # mix of nucleus types, in KIND_NAMES order (endothelial nuclei come with the vessels)
    kind_fractions: tuple[float, ...] = (0.55, 0.25, 0.08, 0.0, 0.0, 0.02)
    nucleus_dn_positive: tuple[float, float] = (0.003, 0.010)  # Δn nucleus-cytoplasm if positive
    nucleus_dn_negative: tuple[float, float] = (-0.010, -0.003)  # Δn if negative (n_nuc < n_cyto)
    nucleus_sign_p: tuple[float, float, float] = (0.35, 0.40, 0.25)  # P(positive, negative, ~zero)
    nucleus_dn_zero_sd: float = 0.0005  # spread of the "near-zero contrast" class
    nucleolus_dn: tuple[float, float] = (0.012, 0.03)  # nucleolus above nucleoplasm (1.387 vs 1.36)
    nucleolus_p: float = 0.6  # fraction of (non-neuron) nuclei with a visible nucleolus
    chromocentre_dn: float = 0.012  # heterochromatin foci above nucleoplasm
    cytoplasm_dn: tuple[float, float] = (-0.002, 0.008)  # cell body Δn vs neuropil, per cell
    cytoplasm_absent_p: float = 0.35  # cells whose body has no contrast at all
    cell_body_scale: tuple[float, float] = (1.2, 2.0)  # cell body radius / nucleus radius
    nucleus_size_scale: float = 1.0  # multiplies every nuclear radius (the per-type ranges)
    background_dn_rms: float = 0.003  # neuropil RI fluctuation (rms Δn), power-law field
    background_beta: float = 3.0  # P(k) ∝ k^-β of the background field
    tissue_depth_um: float = 24.0  # depth of tissue contributing DAPI haze (widefield, ±12 µm)
    dapi_label_depth_um: float = 4.0  # nuclei whose centre is within ± this of focus are labelled
    # --- distractors --------------------------------------------------------------------------
    vessels_per_100um2: tuple[float, float] = (0.3, 1.0)  # capillary segments in plane
    rbc_dn: tuple[float, float] = (0.035, 0.06)  # red blood cell vs tissue (n≈1.40)
    lumen_dn: float = -0.012  # blood plasma below tissue
    lipid_per_100um2: tuple[float, float] = (0.5, 3.0)
    lipid_dn: tuple[float, float] = (0.08, 0.12)  # lipid droplets (n≈1.45-1.48)
    granules_per_100um2: tuple[float, float] = (3.0, 12.0)
    granule_dn: tuple[float, float] = (0.02, 0.05)
    debris_per_100um2: tuple[float, float] = (1.0, 4.0)
    debris_dn: tuple[float, float] = (-0.015, 0.03)
    fibres_per_100um2: tuple[float, float] = (0.5, 2.0)  # myelinated axons / collagen
    fibre_dn: tuple[float, float] = (0.008, 0.025)
    near_nucleus_p: float = 0.4  # fraction of blob distractors placed touching a nucleus
    # --- DAPI widefield ----------------------------------------------------------------------
    dapi_na: float = 0.45  # detection NA of the DAPI channel
    dapi_wavelength_um: float = 0.46  # DAPI emission
    dapi_defocus_blur: float = 0.35  # σ of the geometric defocus blur per µm of defocus
    dapi_level: float = 0.55  # typical in-focus nucleus intensity on the 0-1 scale
    dapi_stain_range: tuple[float, float] = (0.5, 2.0)  # per-cell staining factor (log-uniform)
    dapi_4n_p: float = 0.12  # fraction of cycling (4N) nuclei
    dapi_background: tuple[float, float] = (0.03, 0.07)  # autofluorescence level
    dapi_photons: float = 400.0  # photons at intensity 1.0 (sets Poisson noise)
    dapi_misregistration_px: float = 0.0  # rms qOBM↔DAPI shift (0 = perfectly registered)
    shape_noise: float = 0.08  # rms amplitude of the angular harmonics of nuclear outlines
    aspect: tuple[float, float] = (1.0, 1.35)  # nuclear aspect ratio range
    # --- tissue architecture (tissue.py) and nuclear detail -------------------------------------
    # "scattered": nuclei placed independently (the fixed presets); any other tissue.FAMILIES
    # name arranges most nuclei in that layout, over a sparse scattered stroma
    layout: str = "scattered"
    layout_stroma: float = 0.3  # scattered density kept beside a layout (× nuclei_per_100um2)
    rim_p: float = 0.0  # fraction of nuclei with a rim (envelope + peripheral heterochromatin)
    chromatin_contrast: float = 0.3  # rms of the chromatin texture (DAPI and phase), relative
    fine_texture_rms: float = 0.0  # speckle-like fine phase texture, rad rms (0 = none)
    # --- through-focus brightfield retrieval (reconstruction="through-focus") --------------------
    tf_defocus_um: float = 2.0  # the stack's planes at -d, 0, +d µm
    tf_residual_defocus_um: float = 0.0  # true focus offset the inversion does not know
    tf_alpha: float = 2e-2  # Tikhonov regulariser of the defocus-stack inversion
    tf_lowcut_um: float = 12.0  # σ of its low-frequency background removal (harder than DPC)
    tf_speckle: float = 0.0  # rms of multiplicative speckle on each brightfield plane

    def to_dict(self) -> dict:
        """JSON-friendly dict (tuples become lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


PRESETS: dict[str, SimParams] = {
    # Mouse/human brain at 20x: THE training distribution of the packaged model.
    "brain-20x": SimParams(),
    # Brain at 60x/0.7: finer sampling (0.138 µm/px), thinner section, sharper DAPI focus.
    "brain-60x": SimParams(
        name="brain-60x",
        pixel_size=0.138,
        na_objective=0.7,
        optical_section_um=2.0,
        photons=8000.0,
        dapi_na=0.7,
        dapi_defocus_blur=0.5,
        dapi_label_depth_um=3.0,
    ),
    # Dense, pleomorphic tumour at 20x (glioma-like): crowding, more mitoses, bigger nuclei.
    "tumour-dense-20x": SimParams(
        name="tumour-dense-20x",
        nuclei_per_100um2=(35.0, 60.0),
        kind_fractions=(0.15, 0.0, 0.07, 0.0, 0.70, 0.08),
        shape_noise=0.14,
        aspect=(1.0, 1.8),
        cell_body_scale=(1.1, 1.5),
        dapi_4n_p=0.25,
        dapi_level=0.4,
        vessels_per_100um2=(0.5, 1.5),
        lipid_per_100um2=(0.2, 1.5),
        fibres_per_100um2=(0.0, 0.8),
    ),
    # Same pixel size, different instrument/sample: 650 nm LED, 0.5 NA, narrower and less oblique
    # illumination, more read noise, stronger fall-off, nuclei mostly denser than cytoplasm (as
    # in fixed tissue), rougher background, another DAPI stain/camera.
    "shifted-20x": SimParams(
        name="shifted-20x",
        wavelength_um=0.65,
        na_objective=0.5,
        illum_na_ratio=0.95,
        illum_tilt=0.2,
        optical_section_um=2.5,
        photons=12000.0,
        read_noise_e=4.0,
        falloff=0.6,
        nucleus_sign_p=(0.65, 0.15, 0.20),
        nucleus_dn_positive=(0.004, 0.012),
        cytoplasm_dn=(0.0, 0.012),
        cytoplasm_absent_p=0.2,
        background_dn_rms=0.006,
        background_beta=2.8,
        dapi_level=0.45,
        dapi_background=(0.06, 0.12),
        dapi_stain_range=(0.6, 1.6),
        dapi_defocus_blur=0.45,
        dapi_photons=250.0,
    ),
}


def get_preset(name: str | SimParams) -> SimParams:
    """Return the preset ``name`` (a SimParams passes through)."""
    if isinstance(name, SimParams):
        return name
    if not isinstance(name, str):
        raise TypeError(f"preset must be a preset name or SimParams, got {type(name).__name__}")
    try:
        return PRESETS[name]
    except KeyError:
        if name in (RANDOM_PRESET, TISSUE_PRESET):
            raise ValueError(
                f"{name!r} draws a new instrument per field: pass it to simulate_pair "
                "or write_dataset, or draw one with sample_instrument(seed)"
            ) from None
        raise ValueError(
            f"unknown simulator preset {name!r}; choose one of: "
            f"{', '.join(sorted([*PRESETS, RANDOM_PRESET, TISSUE_PRESET]))}"
        ) from None


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------
@dataclass
class SimSample:
    """One simulated pair. Image arrays are (H, W), or (Z, H, W) for stacks.

    ``nucleus_cnr`` / ``nucleus_in_section`` are indexed by ``label - 1``; for stacks they are
    (Z, N) with NaN / 0 where the nucleus is not labelled in that plane.
    """

    qobm: np.ndarray  # float32, rad (relative, high-pass)
    dapi: np.ndarray  # float32, fixed 0-1 scale
    nuclei: np.ndarray  # int32 instance labels
    distractors: np.ndarray  # int32 instance labels (phase-visible, DAPI-negative)
    nucleus_cnr: np.ndarray  # float32, phase contrast-to-noise per nucleus
    nucleus_in_section: np.ndarray  # float32, 0-1
    pixel_size: float  # µm/px
    preset: str
    seed: int = 0
    focus_um: np.ndarray | float = 0.0  # focal plane(s), µm
    nucleus_kind: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    distractor_kind: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    params: SimParams | None = None


@dataclass
class QobmOutput:
    """Result of :func:`qobm_forward` (all float32)."""

    phase: np.ndarray  # reconstructed phase, rad
    phase_clean: np.ndarray  # reconstruction of the noise-free DPC (same filter), rad
    raw: np.ndarray  # (4, H, W) raw captures in photo-electrons: +x, -x, +y, -y
    dpc: np.ndarray  # (2, H, W) DPC images (x, y)
    noise_std: float  # rms of phase - phase_clean


# --------------------------------------------------------------------------------------------
# Fourier helpers
# --------------------------------------------------------------------------------------------
def _freqs(shape: tuple[int, int], px: float) -> tuple[np.ndarray, np.ndarray]:
    fy = sfft.fftfreq(shape[0], d=px)[:, None]
    fx = sfft.fftfreq(shape[1], d=px)[None, :]
    return fy, fx


@functools.lru_cache(maxsize=8)
def _power_law_amp(shape, px, beta, kmin) -> np.ndarray:
    fy = sfft.fftfreq(shape[0], d=px)[:, None]
    fx = sfft.rfftfreq(shape[1], d=px)[None, :]
    k = np.sqrt(fx * fx + fy * fy)
    amp = np.maximum(k, kmin) ** (-beta / 2.0)
    amp[0, 0] = 0.0
    amp.setflags(write=False)
    return amp


def _power_law_spectrum(rng, shape, px, beta, kmin=0.005) -> np.ndarray:
    """Random rfft2 spectrum with P(k) ∝ k^-β (k in cycles/µm)."""
    amp = _power_law_amp(tuple(shape), float(px), float(beta), float(kmin))
    z = rng.standard_normal((2, *amp.shape))  # same stream as two consecutive draws
    return amp * (z[0] + 1j * z[1])


def _field_from_spectrum(spec, shape) -> np.ndarray:
    f = sfft.irfft2(spec, s=shape)
    sd = f.std()
    return (f / sd if sd > 0 else f).astype(np.float32)


def _power_law_field(rng, shape, px, beta, kmin=0.005) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian random field with P(k) ∝ k^-β (k in cycles/µm)."""
    return _field_from_spectrum(_power_law_spectrum(rng, shape, px, beta, kmin), shape)


class _LazyFields:
    """Unit-variance fields at depth knots, transformed only when a focal plane needs them."""

    def __init__(self, spectra, shape):
        self._spectra = spectra
        self._shape = tuple(shape)
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._spectra)

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if i not in self._cache:
            self._cache[i] = _field_from_spectrum(self._spectra[i], self._shape)
        return self._cache[i]


@functools.lru_cache(maxsize=16)
def _wotf_reference(na_obj: float, wl: float, illum_ratio: float, tilt: float):
    """Phase WOTF of the +x half-pupil source on a reference frequency grid (cycles/µm).

    Tian & Waller (2015): H(u) = i[∫S P P(.+u) − ∫S P P(.−u)] / ∫S|P|², computed as
    cross-correlations by FFT on a grid that is 4x wider than the pupil (no wrap-around).
    """
    fc = na_obj / wl
    m = 256
    d = fc / 48.0
    f = (np.arange(m) - m // 2) * d
    fy, fx = np.meshgrid(f, f, indexing="ij")
    rho = np.hypot(fx, fy)
    pupil = (rho <= fc).astype(np.float64)
    src = ((rho <= fc * illum_ratio) & (fx > 0)).astype(np.float64)
    src *= 1.0 + tilt * (rho / fc - 0.5)  # back-scattered light: more weight at oblique angles
    sp = src * pupil
    b = sp.sum()
    # A(u) = sum_f S(f)P(f)P(f+u) ; circular cross-correlation on the centred grid
    fsp = np.fft.fft2(np.fft.ifftshift(sp))
    fp = np.fft.fft2(np.fft.ifftshift(pupil))
    a_pos = np.fft.fftshift(np.real(np.fft.ifft2(np.conj(fsp) * fp))) / b
    a_neg = a_pos[::-1, ::-1]
    # index of -u on the centred grid: (m - i) % m, which for even m maps m//2 to itself
    a_neg = np.roll(a_neg, (1, 1), axis=(0, 1))
    h_im = a_pos - a_neg  # H = i * h_im
    return f, h_im


def qobm_transfer_functions(shape: tuple[int, int], params: SimParams) -> np.ndarray:
    """Imaginary parts of the DPC phase transfer functions (x, y), shape (2, H, W), FFT order."""
    return _transfer_cached(
        tuple(int(s) for s in shape),
        float(params.pixel_size),
        float(params.na_objective),
        float(params.wavelength_um),
        float(params.illum_na_ratio),
        float(params.illum_tilt),
        float(params.illum_rotation_deg),
    )


def _assumed_instrument(p: SimParams) -> SimParams:
    """The instrument the reconstruction believes in: ``recon_*`` fields replace the true optics."""
    over = {
        k: getattr(p, f"recon_{k}")
        for k in (
            "na_objective",
            "wavelength_um",
            "illum_na_ratio",
            "illum_tilt",
            "illum_rotation_deg",
        )
        if getattr(p, f"recon_{k}") is not None
    }
    return replace(p, **over) if over else p


@functools.lru_cache(maxsize=32)
def _transfer_cached(shape, px, na, wl, ratio, tilt, rot_deg=0.0) -> np.ndarray:
    f, h_ref = _wotf_reference(na, wl, ratio, tilt)
    fy, fx = _freqs(shape, px)
    d = f[1] - f[0]
    c0 = len(f) // 2
    out = np.empty((2, *shape), np.float64)
    fyy = np.broadcast_to(fy, shape)
    fxx = np.broadcast_to(fx, shape)
    if rot_deg:  # sources rotated by θ: H_θ(f) = H(R(-θ) f)
        t = math.radians(rot_deg)
        fxx, fyy = math.cos(t) * fxx + math.sin(t) * fyy, math.cos(t) * fyy - math.sin(t) * fxx
    # x-DPC: source on +x; y-DPC: the same source rotated by 90° (swap axes)
    out[0] = ndimage.map_coordinates(h_ref, [fyy / d + c0, fxx / d + c0], order=1, cval=0.0)
    out[1] = ndimage.map_coordinates(h_ref, [fxx / d + c0, fyy / d + c0], order=1, cval=0.0)
    out[:, 0, 0] = 0.0
    out.setflags(write=False)
    return out


# --------------------------------------------------------------------------------------------
# qOBM forward model
# --------------------------------------------------------------------------------------------
def _falloff_maps(shape, strength) -> np.ndarray:
    """Relative illumination of the four fibre positions: a gradient away from each fibre + vignette."""
    h, w = shape
    y = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
    x = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
    vig = 1.0 - 0.3 * strength * (x * x + y * y)
    g = 0.5 * strength
    return np.stack(
        [
            (1 + g * x) * vig,
            (1 - g * x) * vig,
            (1 + g * y) * vig,
            (1 - g * y) * vig,
        ]
    ).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _quad_pinv(h: int, w: int, st: int):
    y = np.linspace(-1, 1, h)[:, None]
    x = np.linspace(-1, 1, w)[None, :]
    ys, xs = np.broadcast_arrays(y[::st], x[:, ::st])
    A = np.stack([np.ones(ys.size), xs.ravel(), ys.ravel(), xs.ravel() ** 2, ys.ravel() ** 2,
                  (xs * ys).ravel()], 1)  # fmt: skip
    return np.linalg.pinv(A), y, x


def _smooth_background(img: np.ndarray) -> np.ndarray:
    """Least-squares quadratic surface per image (the illumination background of a DPC image)."""
    n, h, w = img.shape
    st = max(1, min(h, w) // 64)
    pinv, y, x = _quad_pinv(h, w, st)
    coef = pinv @ img[:, ::st, ::st].reshape(n, -1).T  # (6, n)
    c = coef[:, :, None, None]
    return c[0] + c[1] * x + c[3] * x * x + (c[2] * y + c[4] * y * y) + c[5] * (y * x)


def qobm_forward(
    ri_phase: np.ndarray, params: SimParams | str, rng: np.random.Generator | int | None = None
) -> QobmOutput:
    """Image a (weak) phase object with qOBM and reconstruct it like the real pipeline.

    ``ri_phase`` is the true phase delay inside the optical section (rad), (H, W). The four raw
    captures are I = N·F·(1 ± H⊛φ) with fall-off F, shot noise (Gaussian approximation of Poisson,
    exact for the photon counts used here) and read noise; DPC = (I+ − I−)/(I+ + I−); its
    low-frequency background is subtracted; phase = Tikhonov deconvolution with the same WOTF.
    The FFT treats the image as periodic: pad (as :func:`simulate_pair` does) to avoid wrap-around.
    """
    p = get_preset(params)
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    phi = np.asarray(ri_phase, dtype=np.float64)
    if phi.ndim != 2:
        raise ValueError(f"ri_phase must be a 2-D (H, W) array, got shape {phi.shape}")
    shape = phi.shape
    if p.dpc_axes not in ("xy", "x"):
        raise ValueError(f"dpc_axes must be 'xy' or 'x', got {p.dpc_axes!r}")
    if p.reconstruction not in ("tikhonov", "gradient", "through-focus"):
        raise ValueError(
            "reconstruction must be 'tikhonov', 'gradient' or 'through-focus', got "
            f"{p.reconstruction!r}"
        )
    if p.qobm_pixel_size is not None and p.qobm_pixel_size != p.pixel_size:
        return _qobm_on_coarser_camera(phi, p, rng)
    if p.reconstruction == "through-focus":
        return _through_focus(phi, p, rng)
    htf = _half(qobm_transfer_functions(shape, p))  # (2, H, W//2+1), H = i*htf
    fphi = sfft.rfft2(phi)
    # modulation for +x and +y sources; the opposed sources have the mirrored (negated) WOTF
    mod = sfft.irfft2(1j * htf * fphi[None], s=shape, axes=(-2, -1))
    mod = np.clip(mod, -0.9, 0.9)
    fall = _falloff_maps(shape, p.falloff)
    mean = p.photons * np.stack([fall[0] * (1 + mod[0]), fall[1] * (1 - mod[0]),
                                 fall[2] * (1 + mod[1]), fall[3] * (1 - mod[1])])  # fmt: skip
    if any(g != 1.0 for g in p.source_gains):
        mean *= np.asarray(p.source_gains, np.float64)[:, None, None]
    noise_sd = np.sqrt(mean + p.read_noise_e**2)
    raw = mean + noise_sd * rng.standard_normal(mean.shape)
    raw = np.maximum(raw, 1.0)
    # the real pipeline, applied to the noisy captures and (for the noise estimate) to the mean
    both = np.stack([raw, mean])  # (2, 4, H, W)
    dpc = (both[:, 0::2] - both[:, 1::2]) / (both[:, 0::2] + both[:, 1::2])  # (2, 2, H, W)
    dpc = dpc - _smooth_background(dpc.reshape(4, *shape)).reshape(dpc.shape)
    fy = sfft.fftfreq(shape[0], d=p.pixel_size)[:, None]
    fx = sfft.rfftfreq(shape[1], d=p.pixel_size)[None, :]
    highpass = 1.0 - np.exp(-2 * (np.pi * p.background_sigma_um) ** 2 * (fx * fx + fy * fy))
    assumed = _assumed_instrument(p)
    hrec = htf if assumed is p else _half(qobm_transfer_functions(shape, assumed))
    if p.reconstruction == "gradient":
        hrec = _gradient_model(hrec, fx, fy)
    if p.dpc_axes == "x":
        hrec = hrec[:1]
    denom = (hrec**2).sum(0) + p.tikhonov_alpha
    fd = sfft.rfft2(dpc[:, : len(hrec)], axes=(-2, -1))
    # Tikhonov: conj(H)·D / (Σ|H|² + α) with H = i*htf, i.e. conj(H)·D = -i*htf·D
    num = (-1j * hrec[None] * fd).sum(1) * (highpass / denom)
    rec = sfft.irfft2(num, s=shape, axes=(-2, -1))
    phase, clean = rec[0], rec[1]
    return QobmOutput(
        phase=phase.astype(np.float32),
        phase_clean=clean.astype(np.float32),
        raw=raw.astype(np.float32),
        dpc=dpc[0].astype(np.float32),
        noise_std=float(np.std(phase - clean)),
    )


def _qobm_on_coarser_camera(phi: np.ndarray, p: SimParams, rng) -> QobmOutput:
    """qOBM with a camera pixel ``p.qobm_pixel_size`` coarser than the grid of ``phi``: the true
    phase is resampled (anti-aliased) to the camera grid, imaged and reconstructed there, and the
    phase is interpolated back (linear) to the grid. ``raw`` / ``dpc`` stay on the camera grid."""
    from skimage.transform import resize

    if p.qobm_pixel_size < p.pixel_size:
        raise ValueError(
            f"qobm_pixel_size ({p.qobm_pixel_size:g} µm) must not be finer than pixel_size "
            f"({p.pixel_size:g} µm): simulate at the camera's pixel size instead"
        )
    h, w = phi.shape
    hc = max(8, round(h * p.pixel_size / p.qobm_pixel_size))
    wc = max(8, round(w * p.pixel_size / p.qobm_pixel_size))
    cam = replace(p, pixel_size=h * p.pixel_size / hc, qobm_pixel_size=None)
    out = qobm_forward(
        resize(phi, (hc, wc), order=1, anti_aliasing=True, preserve_range=True), cam, rng
    )

    def up(a):
        return resize(a, (h, w), order=1, preserve_range=True).astype(np.float32)

    phase, clean = up(out.phase), up(out.phase_clean)
    return QobmOutput(phase=phase, phase_clean=clean, raw=out.raw, dpc=out.dpc,
                      noise_std=float(np.std(phase - clean)))  # fmt: skip


def defocus_transfer(shape: tuple[int, int], px: float, wavelength_um: float, na: float,
                     sigma: float, z_um: float) -> np.ndarray:  # fmt: skip
    """Weak-phase transfer function of a brightfield image defocused by ``z_um`` (rfft2 half):
    2·sin(πλz|f|²) inside the pupil, damped by the partially coherent source of NA σ·NA
    (jinc(2πzσNA|f|): Streibl 1985; Jenkins & Gaylord 2015). Zero at DC and ∝ |f|² near it,
    so a through-focus stack loses low frequencies faster than DPC (∝ |f|)."""
    from scipy.special import j1

    fy = sfft.fftfreq(shape[0], d=px)[:, None]
    fx = sfft.rfftfreq(shape[1], d=px)[None, :]
    f = np.hypot(fx, fy)
    x = 2 * np.pi * abs(z_um) * sigma * na * f
    with np.errstate(invalid="ignore", divide="ignore"):
        jinc = np.where(x > 1e-9, 2 * j1(x) / np.where(x > 1e-9, x, 1.0), 1.0)
    pupil = f <= na / wavelength_um
    return 2 * np.sin(np.pi * wavelength_um * z_um * f * f) * jinc * pupil


def _through_focus(phi: np.ndarray, p: SimParams, rng) -> QobmOutput:
    """Phase from a through-focus brightfield stack (-d, 0, +d): intensities with fall-off,
    multiplicative speckle, shot and read noise; each plane divided by its smooth background;
    Tikhonov inverse of the defocus transfer functions (``tf_alpha``) the inversion believes in
    (it does not know ``tf_residual_defocus_um``); a harder low-frequency cut (``tf_lowcut_um``).
    ``raw`` is the stack, ``dpc`` the two defocused contrast images."""
    shape = phi.shape
    px = p.pixel_size
    zs = np.array([-1.0, 0.0, 1.0]) * p.tf_defocus_um
    sigma = p.illum_na_ratio
    true_h = [defocus_transfer(shape, px, p.wavelength_um, p.na_objective, sigma,
                               z + p.tf_residual_defocus_um) for z in zs]  # fmt: skip
    a = _assumed_instrument(p)
    rec_h = np.stack([defocus_transfer(shape, px, a.wavelength_um, a.na_objective,
                                       a.illum_na_ratio, z) for z in zs])  # fmt: skip
    fphi = sfft.rfft2(phi)
    mod = np.stack([sfft.irfft2(h * fphi, s=shape) for h in true_h])
    mod = np.clip(mod, -0.9, 0.9)
    fall = _falloff_maps(shape, p.falloff)[0]
    mean = p.photons * fall[None] * (1 + mod)
    if p.tf_speckle > 0:  # out-of-focus scattering: fine grain, partly shared between planes
        grain = max(0.5 * p.wavelength_um / p.na_objective / px, 0.5)
        common = ndimage.gaussian_filter(rng.standard_normal(shape), grain)
        sp = [ndimage.gaussian_filter(rng.standard_normal(shape), grain) for _ in zs]
        sp = np.stack([(common + s_) for s_ in sp])
        sp /= sp.std() + 1e-12
        mean = mean * np.clip(1 + p.tf_speckle * sp, 0.05, None)
    noise_sd = np.sqrt(mean + p.read_noise_e**2)
    raw = np.maximum(mean + noise_sd * rng.standard_normal(mean.shape), 1.0)
    both = np.stack([raw, mean])  # (2, 3, H, W)
    bg = _smooth_background(both.reshape(-1, *shape)).reshape(both.shape)
    contrast = both / np.maximum(bg, 1e-6) - 1.0
    fy = sfft.fftfreq(shape[0], d=px)[:, None]
    fx = sfft.rfftfreq(shape[1], d=px)[None, :]
    highpass = 1.0 - np.exp(-2 * (np.pi * p.tf_lowcut_um) ** 2 * (fx * fx + fy * fy))
    fd = sfft.rfft2(contrast, axes=(-2, -1))
    num = (rec_h[None] * fd).sum(1) * (highpass / ((rec_h**2).sum(0) + p.tf_alpha))
    rec = sfft.irfft2(num, s=shape, axes=(-2, -1))
    phase, clean = rec[0], rec[1]
    return QobmOutput(
        phase=phase.astype(np.float32),
        phase_clean=clean.astype(np.float32),
        raw=raw.astype(np.float32),
        dpc=contrast[0, [0, 2]].astype(np.float32),
        noise_std=float(np.std(phase - clean)),
    )


def _gradient_model(htf: np.ndarray, fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
    """A reconstruction without the WOTF: DPC_k ≈ c·f_k (a pure phase gradient), with c the
    least-squares slope of the true transfer function over its inner half band."""
    out = np.empty_like(htf)
    fxx, fyy = np.broadcast_arrays(fx, fy)
    for k, f in enumerate((fxx, fyy)):
        band = np.hypot(fxx, fyy) < 0.5 * np.hypot(fxx, fyy)[np.abs(htf[k]) > 0].max()
        c = float((htf[k] * f)[band].sum() / max(float((f * f)[band].sum()), 1e-12))
        out[k] = c * f
    return out


def _half(htf: np.ndarray) -> np.ndarray:
    """rfft2 half of an FFT-ordered odd transfer function (Nyquist column set to 0)."""
    w = htf.shape[-1]
    out = np.array(htf[..., : w // 2 + 1])
    if w % 2 == 0:
        out[..., -1] = 0.0
    return out


# --------------------------------------------------------------------------------------------
# Scene
# --------------------------------------------------------------------------------------------
_NUC_COLS = (
    "x y z a b c theta dn dna kind stain mitotic cx cy ca cb cc ctheta cdn nl_r nl_dx nl_dy nl_dn"
).split()
_BLOB_COLS = "x y z a b c theta dn kind".split()


def _empty(cols, n=0):
    d = {k: np.zeros(n) for k in cols}
    d["harm"] = np.zeros((n, _N_HARM))
    d["hph"] = np.zeros((n, _N_HARM))
    return d


@dataclass
class Scene:
    """Ground-truth 3-D scene in µm (x right, y down, z along the optical axis, focus at 0).

    ``nuclei``/``blobs`` are column dicts of 1-D arrays (see _NUC_COLS/_BLOB_COLS); ``tubes`` is a
    list of dicts with ``points`` (P, 2) µm, ``z`` (P,), ``radius``, ``dn``, ``kind``;
    ``chromocentres`` columns x, y, nucleus (index), amp. Build one by hand with
    :meth:`add_nucleus` / :meth:`add_blob` for tests.
    """

    width_um: float
    height_um: float
    nuclei: dict = field(default_factory=lambda: _empty(_NUC_COLS))
    blobs: dict = field(default_factory=lambda: _empty(_BLOB_COLS))
    tubes: list = field(default_factory=list)
    chromocentres: dict = field(
        default_factory=lambda: {k: np.zeros(0) for k in ("x", "y", "nucleus", "amp")}
    )
    background: object | None = None  # K unit-variance (H, W) fields at z knots (indexable)
    background_knots: np.ndarray | None = None  # z of each background field, µm
    background_rad_per_unit: float = 0.0  # phase (rad) per unit of the background field
    autofluor: np.ndarray | None = None  # (H, W) DAPI autofluorescence, 0-1 scale
    texture: np.ndarray | None = None  # (H, W) chromatin texture field, mean 1
    # phase-only ellipses (x, y, a, b, theta, Δn): lumens, necrotic cavities (tissue.py)
    regions: list = field(default_factory=list)
    fine_texture: np.ndarray | None = None  # (H, W) fine phase texture, rad

    def add_nucleus(self, x, y, z=0.0, a=4.0, b=None, c=None, theta=0.0, dn=0.0, dna=1.0,
                    kind=GLIA, stain=1.0, cell_scale=0.0, cdn=0.0, nucleolus_r=0.0,
                    nucleolus_dn=0.0) -> int:  # fmt: skip
        """Append one nucleus (µm, Δn vs cytoplasm); returns its index."""
        b = a if b is None else b
        c = min(a, b) if c is None else c
        row = dict(x=x, y=y, z=z, a=a, b=b, c=c, theta=theta, dn=dn, dna=dna, kind=kind,
                   stain=stain, mitotic=float(kind == MITOTIC), cx=x, cy=y, ca=a * cell_scale,
                   cb=b * cell_scale, cc=c * max(cell_scale, 1.0), ctheta=theta, cdn=cdn,
                   nl_r=nucleolus_r, nl_dx=0.0, nl_dy=0.0, nl_dn=nucleolus_dn)  # fmt: skip
        for k in _NUC_COLS:
            self.nuclei[k] = np.append(self.nuclei[k], row[k])
        self.nuclei["harm"] = np.vstack([self.nuclei["harm"], np.zeros((1, _N_HARM))])
        self.nuclei["hph"] = np.vstack([self.nuclei["hph"], np.zeros((1, _N_HARM))])
        return len(self.nuclei["x"]) - 1

    def add_blob(self, x, y, z=0.0, a=2.0, b=None, c=None, theta=0.0, dn=0.05, kind=DEBRIS) -> int:
        """Append one distractor ellipsoid (RBCs get a biconcave profile)."""
        b = a if b is None else b
        c = min(a, b) if c is None else c
        row = dict(x=x, y=y, z=z, a=a, b=b, c=c, theta=theta, dn=dn, kind=kind)
        for k in _BLOB_COLS:
            self.blobs[k] = np.append(self.blobs[k], row[k])
        self.blobs["harm"] = np.vstack([self.blobs["harm"], np.zeros((1, _N_HARM))])
        self.blobs["hph"] = np.vstack([self.blobs["hph"], np.zeros((1, _N_HARM))])
        return len(self.blobs["x"]) - 1


def _loguniform(rng, lo_hi, size=None):
    lo, hi = lo_hi
    if lo <= 0 or hi <= 0:
        return rng.uniform(lo, hi, size)
    return np.exp(rng.uniform(np.log(lo), np.log(hi), size))


def _random_path(rng, start, angle, length, step, curvature):
    """Smooth random-walk centreline (µm)."""
    n = max(int(length / step), 2)
    turns = np.cumsum(rng.normal(0, curvature, n))
    turns = ndimage.gaussian_filter1d(turns, 2.0)
    ang = angle + turns
    pts = np.cumsum(np.stack([np.cos(ang), np.sin(ang)], 1) * step, 0) + start
    return pts


def make_scene(params: SimParams | str, width_um: float, height_um: float, rng,
               grid: tuple[int, int] | None = None, px: float | None = None) -> Scene:  # fmt: skip
    """Sample a random ground-truth scene (µm). ``grid``/``px`` size the background fields."""
    p = get_preset(params)
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    W, H = float(width_um), float(height_um)
    area = W * H / 1e4  # in units of 100x100 µm
    sc = Scene(width_um=W, height_um=H)
    half_depth = p.tissue_depth_um / 2

    # ---- nuclei: density is of labelled nuclei (|z| <= label depth); haze fills the slab ----
    dens = _loguniform(rng, p.nuclei_per_100um2)
    if p.layout != "scattered":  # a sparse stroma beside the layout's own nuclei
        dens = dens * p.layout_stroma
    n_lab = dens * area
    n_tot = rng.poisson(n_lab * p.tissue_depth_um / (2 * p.dapi_label_depth_um))
    fr = np.asarray(p.kind_fractions, float)
    fr = fr / fr.sum()
    kind = rng.choice(len(fr), size=n_tot, p=fr)
    x = rng.uniform(-10, W + 10, n_tot)
    y = rng.uniform(-10, H + 10, n_tot)
    z = rng.uniform(-half_depth, half_depth, n_tot)
    r_lo = np.array([3.2, 5.0, 2.5, 0, 4.0, 2.0])[kind]
    r_hi = np.array([4.8, 7.0, 3.4, 0, 8.0, 3.2])[kind]
    r = rng.uniform(r_lo, r_hi)
    if p.nucleus_size_scale != 1.0:
        r = r * p.nucleus_size_scale
    asp = rng.uniform(*p.aspect, n_tot)
    asp = np.where(kind == LYMPHOCYTE, np.minimum(asp, 1.15), asp)
    a = r * np.sqrt(asp)
    b = r / np.sqrt(asp)
    c = np.minimum(a, b) * rng.uniform(0.75, 1.0, n_tot)
    theta = rng.uniform(0, np.pi, n_tot)
    lobe = np.ones(n_tot)
    lay = None
    if p.layout != "scattered":
        from .tissue import arrange, inside_ellipse

        lay = arrange(p.layout, rng, W, H, p.dapi_label_depth_um, p.nucleus_size_scale)
        keep = np.ones(n_tot, bool)
        for ex in lay.exclude:  # cavities: no stroma nuclei either
            keep &= ~inside_ellipse(x, y, *ex)
        lk = np.where(lay.kind >= 0, lay.kind, rng.choice(len(fr), size=len(lay), p=fr))
        lk = np.where(lk == NEURON, GLIA, lk)  # a layout's nuclei are not neurons
        # the same structure continues above and below the section: a jittered copy of half
        # the layout's nuclei 5–11 µm out of focus (DAPI haze with the layout's shape)
        cp = rng.random(len(lay)) < 0.5
        zc = rng.uniform(5, 11, cp.sum()) * rng.choice([-1, 1], cp.sum())
        jx, jy = rng.normal(0, 1.5, (2, cp.sum()))
        x = np.concatenate([x[keep], lay.x, lay.x[cp] + jx])
        y = np.concatenate([y[keep], lay.y, lay.y[cp] + jy])
        z = np.concatenate([z[keep], lay.z, np.clip(zc, -half_depth, half_depth)])
        la, lb = np.concatenate([lay.a, lay.a[cp]]), np.concatenate([lay.b, lay.b[cp]])
        a = np.concatenate([a[keep], la])
        b = np.concatenate([b[keep], lb])
        r = np.concatenate([r[keep], np.sqrt(la * lb)])
        c = np.concatenate([c[keep], lb * rng.uniform(0.75, 1.0, len(lb))])
        theta = np.concatenate([theta[keep], lay.theta, lay.theta[cp]])
        kind = np.concatenate([kind[keep], lk, lk[cp]])
        lobe = np.concatenate([lobe[keep], lay.lobe, lay.lobe[cp]])
        n_tot = len(x)
    # nuclear Δn vs cytoplasm: sign mixture with a near-zero class (the hard cases)
    cls = rng.choice(3, size=n_tot, p=np.asarray(p.nucleus_sign_p) / np.sum(p.nucleus_sign_p))
    dn = np.select(
        [cls == 0, cls == 1],
        [rng.uniform(*p.nucleus_dn_positive, n_tot), rng.uniform(*p.nucleus_dn_negative, n_tot)],
        rng.normal(0, p.nucleus_dn_zero_sd, n_tot),
    )
    mit = kind == MITOTIC
    dn = np.where(mit, rng.uniform(0.006, 0.015, n_tot), dn)  # condensed chromatin is dense
    # DNA: density factor by type × content (2N/4N) ; stain per cell
    dens_f = np.array([1.0, 0.55, 1.35, 1.1, 0.9, 2.6])[kind]
    content = np.where(rng.random(n_tot) < p.dapi_4n_p, 1.6, 1.0)
    stain = _loguniform(rng, p.dapi_stain_range, n_tot)
    dna = dens_f * content
    # cell bodies
    has_cyto = (rng.random(n_tot) >= p.cytoplasm_absent_p) & (kind != LYMPHOCYTE)
    cdn = np.where(has_cyto, rng.uniform(*p.cytoplasm_dn, n_tot), 0.0)
    cdn = np.where(kind == NEURON, cdn + 0.003 * has_cyto, cdn)  # Nissl-rich neuronal somata
    cs = rng.uniform(*p.cell_body_scale, n_tot) * np.where(kind == NEURON, 1.25, 1.0)
    off = rng.uniform(0, 0.45, n_tot) * (cs - 1) * r
    oang = rng.uniform(0, 2 * np.pi, n_tot)
    casp = rng.uniform(1.0, 1.6, n_tot)
    ca = cs * r * np.sqrt(casp)
    cb = cs * r / np.sqrt(casp)
    cc = np.maximum(c, c * cs * 0.8)
    # nucleoli: neurons always (big), others with probability nucleolus_p
    has_nl = np.where(kind == NEURON, True, rng.random(n_tot) < p.nucleolus_p) & ~mit
    nl_r = np.where(kind == NEURON, rng.uniform(0.9, 1.5, n_tot), rng.uniform(0.4, 0.9, n_tot))
    nl_r = np.where(has_nl, nl_r, 0.0)
    nl_off = rng.uniform(0, 0.4, n_tot) * np.maximum(r - nl_r, 0)
    nl_ang = rng.uniform(0, 2 * np.pi, n_tot)
    sc.nuclei = {
        "x": x, "y": y, "z": z, "a": a, "b": b, "c": c, "theta": theta, "dn": dn, "dna": dna,
        "kind": kind.astype(float), "stain": stain, "mitotic": mit.astype(float),
        "cx": x + off * np.cos(oang), "cy": y + off * np.sin(oang), "ca": ca, "cb": cb,
        "cc": cc, "ctheta": theta + rng.normal(0, 0.5, n_tot), "cdn": cdn,
        "nl_r": nl_r, "nl_dx": nl_off * np.cos(nl_ang), "nl_dy": nl_off * np.sin(nl_ang),
        "nl_dn": rng.uniform(*p.nucleolus_dn, n_tot),
        "harm": rng.normal(0, p.shape_noise, (n_tot, _N_HARM)) * np.where(mit, 2.0, 1.0)[:, None],
        "hph": rng.uniform(0, 2 * np.pi, (n_tot, _N_HARM)),
    }  # fmt: skip
    if lay is not None:
        sc.nuclei["harm"] *= lobe[:, None]
        # columnar and spindle cells: the cell body follows the nucleus' long axis
        lay_n = slice(n_tot - len(lay) - int(cp.sum()), n_tot)
        sc.nuclei["ca"][lay_n] = cs[lay_n] * a[lay_n]
        sc.nuclei["cb"][lay_n] = cs[lay_n] * b[lay_n]
        sc.nuclei["ctheta"][lay_n] = theta[lay_n]
        sc.regions = list(lay.regions)
        sc.tubes.extend(lay.tubes)

    # ---- capillaries: lumen + RBCs + endothelial nuclei on the wall ----
    n_ves = rng.poisson(_loguniform(rng, p.vessels_per_100um2) * area)
    extra_nuc = []
    blobs = [] if lay is None else list(lay.blobs)
    for _ in range(n_ves):
        start = np.array([rng.uniform(0, W), rng.uniform(0, H)])
        pts = _random_path(rng, start, rng.uniform(0, 2 * np.pi), rng.uniform(60, 250), 1.0, 0.04)
        rad = rng.uniform(2.5, 4.0)
        zv = rng.normal(0, 1.5) + np.cumsum(rng.normal(0, 0.02, len(pts)))
        sc.tubes.append({"points": pts, "z": zv, "radius": rad, "dn": p.lumen_dn, "kind": VESSEL})
        seg = np.diff(pts, axis=0)
        ang = np.arctan2(seg[:, 1], seg[:, 0])
        # RBCs every ~6-20 µm, some in rouleaux
        s = rng.uniform(0, 10)
        while s < len(pts) - 1:
            i = int(s)
            tilt = rng.uniform(0.35, 1.0)  # deformed / tilted disc footprint
            rr = rng.uniform(3.4, 4.0)
            blobs.append((pts[i, 0] + rng.normal(0, 0.6), pts[i, 1] + rng.normal(0, 0.6),
                          zv[i], rr, rr * tilt, 1.0, ang[min(i, len(ang) - 1)] + np.pi / 2,
                          rng.uniform(*p.rbc_dn), RBC))  # fmt: skip
            s += rng.uniform(2.5, 5) if rng.random() < 0.3 else rng.uniform(6, 22)
        # endothelial nuclei: every ~25-50 µm on alternating walls
        s = rng.uniform(0, 20)
        side = 1
        while s < len(pts) - 1:
            i = int(s)
            nrm = np.array([-np.sin(ang[min(i, len(ang) - 1)]), np.cos(ang[min(i, len(ang) - 1)])])
            pos = pts[i] + side * nrm * (rad + 1.0)
            extra_nuc.append((pos[0], pos[1], zv[i] + rng.normal(0, 1.0),
                              ang[min(i, len(ang) - 1)]))  # fmt: skip
            side = -side
            s += rng.uniform(25, 50)
    if extra_nuc:
        e = np.asarray(extra_nuc)
        m = len(e)
        ea = rng.uniform(5.0, 9.0, m) * p.nucleus_size_scale
        eb = rng.uniform(1.2, 2.3, m) * p.nucleus_size_scale
        ecls = rng.choice(3, size=m, p=np.asarray(p.nucleus_sign_p) / np.sum(p.nucleus_sign_p))
        edn = np.select(
            [ecls == 0, ecls == 1],
            [rng.uniform(*p.nucleus_dn_positive, m), rng.uniform(*p.nucleus_dn_negative, m)],
            rng.normal(0, p.nucleus_dn_zero_sd, m),
        )
        add = {
            "x": e[:, 0], "y": e[:, 1], "z": e[:, 2], "a": ea, "b": eb, "c": eb, "theta": e[:, 3],
            "dn": edn, "dna": np.full(m, 1.2), "kind": np.full(m, float(ENDOTHELIAL)),
            "stain": _loguniform(rng, p.dapi_stain_range, m), "mitotic": np.zeros(m),
            "cx": e[:, 0], "cy": e[:, 1], "ca": ea * 1.2, "cb": eb * 1.5, "cc": eb,
            "ctheta": e[:, 3], "cdn": np.where(rng.random(m) < 0.5, 0.0, 0.003),
            "nl_r": np.zeros(m), "nl_dx": np.zeros(m), "nl_dy": np.zeros(m), "nl_dn": np.zeros(m),
            "harm": rng.normal(0, p.shape_noise * 0.5, (m, _N_HARM)),
            "hph": rng.uniform(0, 2 * np.pi, (m, _N_HARM)),
        }  # fmt: skip
        sc.nuclei = {k: np.concatenate([sc.nuclei[k], add[k]]) for k in sc.nuclei}

    # ---- chromocentres (mouse-like heterochromatin foci), in non-neuron nuclei ----
    nn = len(sc.nuclei["x"])
    ncc = rng.poisson(np.where(sc.nuclei["kind"] == NEURON, 1.5, 3.0))
    ncc = np.where(sc.nuclei["mitotic"] > 0, 0, ncc)
    idx = np.repeat(np.arange(nn), ncc)
    rr = np.sqrt(rng.uniform(0, 0.6, len(idx)))
    ang = rng.uniform(0, 2 * np.pi, len(idx))
    sc.chromocentres = {
        "x": sc.nuclei["x"][idx] + rr * sc.nuclei["a"][idx] * np.cos(ang),
        "y": sc.nuclei["y"][idx] + rr * sc.nuclei["b"][idx] * np.sin(ang),
        "nucleus": idx.astype(float),
        "amp": rng.uniform(0.4, 1.2, len(idx)),
    }

    # ---- blob distractors: lipid, granules, debris; some touching nuclei ----
    def _place(n, near):
        px_ = rng.uniform(0, W, n)
        py_ = rng.uniform(0, H, n)
        if nn and near > 0:
            pick = rng.random(n) < near
            # nuclei near focus are the relevant neighbours
            cand = np.flatnonzero(np.abs(sc.nuclei["z"]) < p.dapi_label_depth_um)
            if len(cand):
                j = rng.choice(cand, size=n)
                ang_ = rng.uniform(0, 2 * np.pi, n)
                d = np.maximum(sc.nuclei["a"][j], sc.nuclei["b"][j]) + rng.uniform(0.5, 2.5, n)
                px_ = np.where(pick, sc.nuclei["x"][j] + d * np.cos(ang_), px_)
                py_ = np.where(pick, sc.nuclei["y"][j] + d * np.sin(ang_), py_)
        return px_, py_

    sec = p.optical_section_um
    for kind_, dens_r, rad_r, dn_r in (
        (LIPID, p.lipid_per_100um2, (0.6, 2.0), p.lipid_dn),
        (GRANULE, p.granules_per_100um2, (0.3, 0.6), p.granule_dn),
        (DEBRIS, p.debris_per_100um2, (1.2, 4.0), p.debris_dn),
    ):
        n = rng.poisson(_loguniform(rng, dens_r) * area)
        bx, by = _place(n, p.near_nucleus_p)
        br = rng.uniform(*rad_r, n)
        basp = rng.uniform(1.0, 1.3 if kind_ != DEBRIS else 2.5, n)
        bz = rng.uniform(-sec, sec, n)
        for i in range(n):
            blobs.append((bx[i], by[i], bz[i], br[i] * np.sqrt(basp[i]), br[i] / np.sqrt(basp[i]),
                          br[i] / np.sqrt(basp[i]), rng.uniform(0, np.pi), rng.uniform(*dn_r),
                          kind_))  # fmt: skip
    if blobs:
        bl = np.asarray(blobs, float)
        nb = len(bl)
        sc.blobs = {k: bl[:, i] for i, k in enumerate(_BLOB_COLS)}
        hs = np.where(bl[:, 8] == DEBRIS, 0.25, 0.04)
        sc.blobs["harm"] = rng.normal(0, 1, (nb, _N_HARM)) * hs[:, None]
        sc.blobs["hph"] = rng.uniform(0, 2 * np.pi, (nb, _N_HARM))

    # ---- fibres (myelinated axons / collagen), gently inclined through the section ----
    for _ in range(rng.poisson(_loguniform(rng, p.fibres_per_100um2) * area)):
        start = np.array([rng.uniform(0, W), rng.uniform(0, H)])
        pts = _random_path(rng, start, rng.uniform(0, 2 * np.pi), rng.uniform(30, 200), 1.0, 0.02)
        slope = rng.normal(0, 0.03)
        zf = rng.uniform(-sec, sec) + slope * np.arange(len(pts))
        sc.tubes.append({"points": pts, "z": zf, "radius": rng.uniform(0.3, 0.9),
                         "dn": rng.uniform(*p.fibre_dn), "kind": FIBRE})  # fmt: skip

    # ---- background fields (phase: knots through depth; DAPI autofluorescence; texture) ----
    if grid is not None and px is not None:
        knots = np.arange(-half_depth, half_depth + 1e-6, max(sec, 1.0))
        sc.background = _LazyFields(
            [_power_law_spectrum(rng, grid, px, p.background_beta) for _ in knots], grid
        )
        sc.background_knots = knots
        sc.background_rad_per_unit = 2 * np.pi / p.wavelength_um * p.background_dn_rms * sec
        af = _power_law_field(rng, grid, px, 3.0)
        lvl = rng.uniform(*p.dapi_background)
        sc.autofluor = np.clip(lvl * (1 + 0.35 * af), 0.3 * lvl, None).astype(np.float32)
        tex = _power_law_field(rng, grid, px, 1.2, kmin=0.3)
        sc.texture = np.clip(1 + p.chromatin_contrast * tex, 0.3, 2.5).astype(np.float32)
        if p.fine_texture_rms > 0:  # speckle-like fine texture of the tissue's phase
            ft = ndimage.gaussian_filter(rng.standard_normal(grid), max(0.3 / px, 0.5))
            sc.fine_texture = (ft / (ft.std() + 1e-12) * p.fine_texture_rms).astype(np.float32)
    if p.rim_p > 0:
        nn_ = len(sc.nuclei["x"])
        sc.nuclei["rim"] = np.where(rng.random(nn_) < p.rim_p, rng.uniform(0.3, 1.0, nn_), 0.0)
    return sc


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
_GX = np.linspace(-6.0, 6.0, 2401)
_GT = _GX * erf(_GX) + np.exp(-_GX * _GX) / np.sqrt(np.pi) - np.abs(_GX)


def _Phi(z, s):
    """Antiderivative of erf(z/s): s·(x erf x + exp(-x²)/√π) = s·(|x| + g(x)), g tabulated.

    g decays like exp(-x²) (< 1e-16 beyond |x| = 6); linear interpolation error < 4e-6·s.
    """
    x = np.asarray(z, dtype=np.float64) / s
    return s * (np.abs(x) + np.interp(x, _GX, _GT))


def _section_path(z_lo, z_hi, zf, T, s):
    """Length (µm) of [z_lo, z_hi] inside a soft-edged section of thickness T centred on zf."""
    z_lo = np.asarray(z_lo, float)
    z_hi = np.asarray(z_hi, float)
    if z_lo.shape != z_hi.shape:
        z_lo, z_hi = np.broadcast_arrays(z_lo, z_hi)
    out = np.zeros(z_lo.shape)
    m = z_hi > z_lo  # only pixels with a non-empty chord contribute
    if not m.any():
        return out
    lo, hi = z_lo[m], z_hi[m]
    a = zf - T / 2
    b = zf + T / 2
    P = _Phi(np.stack([hi - a, lo - a, hi - b, lo - b]), s)
    out[m] = 0.5 * ((P[0] - P[1]) - (P[2] - P[3]))
    return out


_CHORD_N = 257
_CHORD_UNIT = np.linspace(0.0, 1.0, _CHORD_N)


def _chord_path(hh: np.ndarray, dz: float, hmax: float, T: float, s: float) -> np.ndarray:
    """Section path of the chords [dz − hh, dz + hh] (one object: scalar dz, 0 ≤ hh ≤ hmax).

    L depends on hh only, so it is tabulated exactly on 257 points and linearly interpolated
    (error < 1e-3 µm): far cheaper than erf per pixel.
    """
    if hmax <= 0:
        return np.zeros(np.shape(hh))
    ht = hmax * _CHORD_UNIT
    tab = _section_path(dz - ht, dz + ht, 0.0, T, s)
    t = hh * ((_CHORD_N - 1) / hmax)
    i = np.minimum(t.astype(np.intp), _CHORD_N - 2)
    f = t - i
    return tab[i] * (1.0 - f) + tab[i + 1] * f


def _ellipse(x, y, a, b, theta, harm, hph, px, shape, grow=1.0):
    """Bounding-box slices and normalised radius ρ (ρ<1 inside) of a noisy ellipse."""
    h, w = shape
    R = max(a, b) * (1 + float(np.abs(harm).sum())) * grow + 1.5 * px
    i0 = max(int(np.floor((y - R) / px)), 0)
    i1 = min(int(np.ceil((y + R) / px)) + 1, h)
    j0 = max(int(np.floor((x - R) / px)), 0)
    j1 = min(int(np.ceil((x + R) / px)) + 1, w)
    if i0 >= i1 or j0 >= j1:
        return None
    Y = (np.arange(i0, i1) * px - y)[:, None]
    X = (np.arange(j0, j1) * px - x)[None, :]
    ct, st = math.cos(theta), math.sin(theta)
    u = X * (ct / a) + Y * (st / a)
    v = Y * (ct / b) - X * (st / b)
    rho = np.sqrt(u * u + v * v)
    if harm.any():
        # cos(kθ + φ) from cos θ, sin θ by the Chebyshev recurrences (no arctan2/cos per pixel);
        # at ρ = 0 the value is irrelevant (ρ/mod = 0)
        inv = 1.0 / np.maximum(rho, 1e-12)
        c1 = u * inv
        s1 = v * inv
        mod = np.ones_like(rho)
        ck, sk = c1, s1
        for k in range(_N_HARM):
            if harm[k] != 0:
                mod += harm[k] * (ck * np.cos(hph[k]) - sk * np.sin(hph[k]))
            ck, sk = ck * c1 - sk * s1, sk * c1 + ck * s1
        rho = rho / np.maximum(mod, 0.3)
    return (slice(i0, i1), slice(j0, j1)), rho


@dataclass
class Rendered:
    """Noise-free ground truth at one focal plane (padded canvas)."""

    phase: np.ndarray  # true phase in the optical section, rad
    dna_bins: np.ndarray  # (B, H, W) DAPI emitters by defocus bin (0-1 scale before blur)
    bin_sigma_um: np.ndarray  # (B,) blur σ of each bin
    nuclei: np.ndarray  # int32 labels, value = scene nucleus index + 1
    distractors: np.ndarray  # int32 labels, value = distractor id + 1
    in_section: np.ndarray  # per scene nucleus (NaN if not labelled)
    distractor_kind: np.ndarray  # per distractor id


def _dapi_bins(p: SimParams):
    """Defocus bin edges (µm) and the blur σ for each bin (in-focus PSF ⊕ geometric defocus)."""
    edges = np.array([0.0, 1.5, 3.0, p.dapi_label_depth_um, 8.0, 12.0, 1e9])
    mids = np.array([0.7, 2.2, (3.0 + p.dapi_label_depth_um) / 2, 6.5, 10.0, 14.0])
    psf = 0.21 * p.dapi_wavelength_um / p.dapi_na
    return edges, np.sqrt(psf**2 + (p.dapi_defocus_blur * mids) ** 2)


def render_scene(scene: Scene, shape: tuple[int, int], pixel_size: float, z_focus: float,
                 params: SimParams | str) -> Rendered:  # fmt: skip
    """Render the ground truth of ``scene`` at focal plane ``z_focus`` on a (H, W) grid."""
    p = get_preset(params)
    px = float(pixel_size)
    shape = tuple(int(s) for s in shape)
    T = p.optical_section_um
    s_edge = p.section_edge_um
    k0 = 2 * np.pi / p.wavelength_um
    opd = np.zeros(shape, np.float64)  # Σ Δn·L (µm)
    edges, bin_sigma = _dapi_bins(p)
    nbin = len(bin_sigma)
    dna = np.zeros((nbin, *shape), np.float32)
    labels = np.zeros(shape, np.int32)
    dlabels = np.zeros(shape, np.int32)
    tex = scene.texture
    nu = scene.nuclei
    n = len(nu["x"])
    in_sec = np.full(n, np.nan)
    dz = nu["z"] - z_focus
    adz = np.abs(dz)
    reach = T / 2 + 2 * s_edge
    # cell bodies first (nucleus Δn is relative to them)
    for i in np.flatnonzero((nu["cdn"] != 0) & (adz < reach + nu["cc"])):
        e = _ellipse(nu["cx"][i], nu["cy"][i], nu["ca"][i], nu["cb"][i], nu["ctheta"][i],
                     nu["harm"][i] * 1.5, nu["hph"][i], px, shape)  # fmt: skip
        if e is None:
            continue
        sl, rho = e
        hh = nu["cc"][i] * np.sqrt(np.clip(1 - rho * rho, 0, None))
        opd[sl] += nu["cdn"][i] * _chord_path(hh, dz[i], nu["cc"][i], T, s_edge)

    # lumens and cavities fill the section: Δn over its thickness, with a 1 µm soft edge
    for rx, ry, ra, rb, rt, rdn in scene.regions:
        e = _ellipse(rx, ry, ra, rb, rt, np.zeros(_N_HARM), np.zeros(_N_HARM), px, shape)
        if e is not None:
            sl, rho = e
            opd[sl] += rdn * T * np.clip((1 - rho) * min(ra, rb), 0, 1)
    rims = nu.get("rim")

    label_depth = p.dapi_label_depth_um
    full = (adz < label_depth) | (adz < reach + nu["c"])
    order = np.flatnonzero(full)
    order = order[np.argsort(-adz[order])]  # farthest first: nearest nuclei paint on top
    for i in order:
        e = _ellipse(nu["x"][i], nu["y"][i], nu["a"][i], nu["b"][i], nu["theta"][i],
                     nu["harm"][i], nu["hph"][i], px, shape)  # fmt: skip
        if e is None:
            continue
        sl, rho = e
        inside = rho < 1
        if not inside.any():
            continue
        hh = nu["c"][i] * np.sqrt(np.clip(1 - rho * rho, 0, None))
        L = _chord_path(hh, dz[i], nu["c"][i], T, s_edge)
        Lc = _chord_path(hh, 0.0, nu["c"][i], T, s_edge)
        tot_c = Lc.sum()
        in_sec[i] = float(L.sum() / tot_c) if tot_c > 0 else 0.0
        # the cell body already adds cdn·L over the nucleus; dn is relative to the cytoplasm
        # (or to the neuropil when the cell body has no contrast), so Δn=0 is truly invisible
        opd[sl] += nu["dn"][i] * L
        # DNA: projected density (thick centre brighter), chromatin texture, nucleolus hole
        proj = hh / max(nu["c"][i], 1e-6)
        if rims is not None and rims[i] > 0:
            # envelope + peripheral heterochromatin: a denser, DNA-brighter rim, paler centre
            ring = np.exp(-(((1 - rho) / 0.2) ** 2)) * inside
            opd[sl] += rims[i] * 0.008 * ring * L
            proj = proj * (1 + rims[i] * (1.5 * ring - 0.5))
        if tex is not None:
            proj = proj * tex[sl]
        if nu["nl_r"][i] > 0:
            e2 = _ellipse(nu["x"][i] + nu["nl_dx"][i], nu["y"][i] + nu["nl_dy"][i],
                          nu["nl_r"][i], nu["nl_r"][i], 0.0, np.zeros(_N_HARM),
                          np.zeros(_N_HARM), px, shape)  # fmt: skip
            if e2 is not None:
                sl2, rho2 = e2
                h2 = nu["nl_r"][i] * np.sqrt(np.clip(1 - rho2 * rho2, 0, None))
                L2 = _chord_path(h2, dz[i], nu["nl_r"][i], T, s_edge)
                opd[sl2] += nu["nl_dn"][i] * L2
                # nucleolus excludes DNA: darken within the nucleus bbox
                oy = sl2[0].start - sl[0].start
                ox = sl2[1].start - sl[1].start
                sub = proj[oy : oy + rho2.shape[0], ox : ox + rho2.shape[1]]
                sub *= 1 - 0.7 * (h2 / nu["nl_r"][i])[: sub.shape[0], : sub.shape[1]]
        amp = p.dapi_level * nu["stain"][i] * nu["dna"][i]
        b = int(np.searchsorted(edges, adz[i], side="right") - 1)
        dna[b][sl] += (amp * proj).astype(np.float32)
        if adz[i] <= label_depth or in_sec[i] > 0.25:
            labels[sl][inside] = i + 1
        else:
            in_sec[i] = np.nan
    # haze: out-of-band nuclei as blurred points carrying their integrated DNA
    haze = np.flatnonzero(~full)
    if len(haze):
        hi = np.clip(np.round(nu["y"][haze] / px).astype(int), -1, shape[0])
        hj = np.clip(np.round(nu["x"][haze] / px).astype(int), -1, shape[1])
        ok = (hi >= 0) & (hi < shape[0]) & (hj >= 0) & (hj < shape[1])
        haze, hi, hj = haze[ok], hi[ok], hj[ok]
        area_px = np.pi * nu["a"][haze] * nu["b"][haze] / px**2
        amp = p.dapi_level * nu["stain"][haze] * nu["dna"][haze] * area_px * (2 / 3)
        b = np.clip(np.searchsorted(edges, adz[haze], side="right") - 1, 0, nbin - 1)
        np.add.at(dna, (b, hi, hj), amp.astype(np.float32))
    # chromocentres: bright DAPI foci (in-band nuclei) and small phase dots
    cc = scene.chromocentres
    if len(cc["x"]):
        j = cc["nucleus"].astype(int)
        sel = full[j]
        ci = np.round(cc["y"][sel] / px).astype(int)
        cj = np.round(cc["x"][sel] / px).astype(int)
        ok = (ci >= 0) & (ci < shape[0]) & (cj >= 0) & (cj < shape[1])
        js = j[sel][ok]
        ci, cj = ci[ok], cj[ok]
        b = np.clip(np.searchsorted(edges, adz[js], side="right") - 1, 0, nbin - 1)
        spot_area = np.pi * 0.6**2 / px**2
        amp = p.dapi_level * nu["stain"][js] * cc["amp"][sel][ok] * 0.8 * max(spot_area, 1.0)
        np.add.at(dna, (b, ci, cj), amp.astype(np.float32))
        w_sec = _section_path(dz[js] - 0.6, dz[js] + 0.6, 0.0, T, s_edge)
        np.add.at(opd, (ci, cj), p.chromocentre_dn * w_sec * cc["amp"][sel][ok] * spot_area)

    # blob distractors
    bl = scene.blobs
    dkinds = []
    bdz = bl["z"] - z_focus
    for i in np.flatnonzero(np.abs(bdz) < reach + bl["c"]):
        e = _ellipse(bl["x"][i], bl["y"][i], bl["a"][i], bl["b"][i], bl["theta"][i],
                     bl["harm"][i], bl["hph"][i], px, shape)  # fmt: skip
        if e is None:
            continue
        sl, rho = e
        r2 = np.clip(rho * rho, 0, None)
        if bl["kind"][i] == RBC:  # biconcave disc thickness (Evans & Fung form), half-height
            hh = 0.5 * 2.6 * np.sqrt(np.clip(1 - r2, 0, None)) * (0.28 + 1.6 * r2 - 1.1 * r2 * r2)
        else:
            hh = bl["c"][i] * np.sqrt(np.clip(1 - r2, 0, None))
        L = _chord_path(hh, bdz[i], max(float(hh.max()), 1e-9), T, s_edge)
        opd[sl] += bl["dn"][i] * L
        vis = (L > 0.3) & (rho < 1)
        if vis.sum() >= 2:
            dkinds.append(int(bl["kind"][i]))
            dlabels[sl][vis] = len(dkinds)
    # tubes (vessel lumens, fibres): one distance transform for all centrelines
    if scene.tubes:
        cl = np.zeros(shape, np.int32)
        tinfo = []  # per point: radius, z, dn, tube index
        for t_i, t in enumerate(scene.tubes):
            pts = t["points"]
            ii = np.round(pts[:, 1] / px).astype(int)
            jj = np.round(pts[:, 0] / px).astype(int)
            ok = (ii >= 0) & (ii < shape[0]) & (jj >= 0) & (jj < shape[1])
            base = len(tinfo)
            for q in np.flatnonzero(ok):
                tinfo.append((t["radius"], t["z"][q], t["dn"], t_i))
            cl[ii[ok], jj[ok]] = base + np.arange(ok.sum()) + 1
        if tinfo:
            ti = np.asarray(tinfo)
            rmax = ti[:, 0].max()
            dist, (ni, nj) = ndimage.distance_transform_edt(cl == 0, return_indices=True)
            dist = dist * px
            near = dist < rmax + px
            idx = cl[ni[near], nj[near]] - 1
            rad = ti[idx, 0]
            d = dist[near]
            hh = np.sqrt(np.clip(rad * rad - d * d, 0, None))
            zc = ti[idx, 1] - z_focus
            L = _section_path(zc - hh, zc + hh, 0.0, T, s_edge)
            opd[near] += ti[idx, 2] * L
            tube_of = ti[idx, 3].astype(int)
            for t_i, t in enumerate(scene.tubes):
                if t["kind"] != FIBRE:
                    continue
                m = (tube_of == t_i) & (L > 0.3)
                if m.sum() >= 3:
                    dkinds.append(FIBRE)
                    sub = np.zeros(shape, bool)
                    sub[near] = m
                    dlabels[sub & (dlabels == 0)] = len(dkinds)
    if scene.regions or p.layout != "scattered":
        _drop_islands(labels)
    phase = k0 * opd
    if scene.background is not None:
        kn = scene.background_knots
        t = np.clip(np.interp(z_focus, kn, np.arange(len(kn))), 0, len(kn) - 1)
        i0 = int(np.floor(t))
        i1 = min(i0 + 1, len(kn) - 1)
        f = t - i0
        bg = (
            np.cos(np.pi / 2 * f) * scene.background[i0]
            + np.sin(np.pi / 2 * f) * scene.background[i1]
        )
        phase = phase + scene.background_rad_per_unit * bg
    if scene.fine_texture is not None:
        phase = phase + scene.fine_texture
    return Rendered(
        phase=phase,
        dna_bins=dna,
        bin_sigma_um=bin_sigma,
        nuclei=labels,
        distractors=dlabels,
        in_section=in_sec,
        distractor_kind=np.asarray(dkinds, np.int8),
    )


def _drop_islands(labels: np.ndarray) -> None:
    """Keep each instance's largest piece (in place). Packed layouts put nuclei at slightly
    different depths side by side, and a nearer one painted across a farther one's lobe would
    otherwise leave that nucleus as two islands: one nucleus, one connected label."""
    for i, sl in enumerate(ndimage.find_objects(labels)):
        if sl is None:
            continue
        m = labels[sl] == i + 1
        lab, n = ndimage.label(m)
        if n > 1:
            sizes = np.bincount(lab.ravel())[1:]
            labels[sl][m & (lab != 1 + int(np.argmax(sizes)))] = 0


def dapi_forward(rendered: Rendered, scene: Scene | None, params: SimParams | str, rng,
                 pixel_size: float | None = None) -> np.ndarray:  # fmt: skip
    """Widefield DAPI: per-bin defocus blur (Gaussian, in Fourier space), autofluorescence,
    Poisson noise; fixed 0-1 scale (1.0 = ``dapi_photons`` photons), clipped."""
    p = get_preset(params)
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    px = p.pixel_size if pixel_size is None else pixel_size
    shape = rendered.dna_bins.shape[1:]
    fy = sfft.fftfreq(shape[0], d=px)[:, None]
    fx = sfft.rfftfreq(shape[1], d=px)[None, :]
    k2 = fx * fx + fy * fy
    acc = np.zeros((shape[0], shape[1] // 2 + 1), np.complex128)
    for b, s in enumerate(rendered.bin_sigma_um):
        if rendered.dna_bins[b].any():
            acc += sfft.rfft2(rendered.dna_bins[b]) * np.exp(-2 * (np.pi * s) ** 2 * k2)
    img = sfft.irfft2(acc, s=shape)
    if p.dapi_misregistration_px > 0:
        shift = rng.normal(0, p.dapi_misregistration_px, 2)
        img = ndimage.shift(img, shift, order=1, mode="nearest")
    bg = scene.autofluor if (scene is not None and scene.autofluor is not None) else 0.05
    img = np.clip(img, 0, None) + bg
    img = rng.poisson(img * p.dapi_photons) / p.dapi_photons
    return np.clip(img, 0, 1).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------
def _parse_size(size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        hw = (int(size), int(size))
    elif isinstance(size, Sequence) and len(size) == 2:
        hw = (int(size[0]), int(size[1]))
    else:
        raise TypeError(f"size must be an int or an (H, W) pair, got {size!r}")
    if min(hw) < 8:
        raise ValueError(f"size must be at least 8 pixels per side, got {hw}")
    return hw


def _cnr(phase_clean, labels, n_lab, noise):
    """Per-label phase contrast (mean inside − mean of a 4-pixel ring outside) / noise rms."""
    from skimage.segmentation import expand_labels

    idx = np.arange(1, n_lab + 1)
    if n_lab == 0:
        return np.zeros(0, np.float32)
    ring = expand_labels(labels, distance=4) * (labels == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        inner = ndimage.mean(phase_clean, labels, idx)
        outer = ndimage.mean(phase_clean, ring, idx)
    c = (np.asarray(inner) - np.asarray(outer)) / max(noise, 1e-9)
    return np.nan_to_num(c, nan=0.0).astype(np.float32)


def simulate_pair(
    preset: str | SimParams = "brain-20x",
    size: int | tuple[int, int] = 512,
    seed: int = 0,
    z_planes: int | None = None,
    z_step_um: float = 1.0,
) -> SimSample:
    """Simulate one paired qOBM phase / DAPI field (or a Z stack of ``z_planes`` planes).

    Deterministic for a given (preset, size, seed, z_planes, z_step_um). ``"domain-random"``
    draws the instrument from the seed too (:func:`simulate_training_pair`; single planes only).
    """
    if isinstance(preset, str) and preset in (RANDOM_PRESET, TISSUE_PRESET):
        if z_planes is not None:
            raise ValueError(
                f"preset {preset!r} simulates single planes: leave z_planes unset, or use "
                "a fixed preset for Z stacks"
            )
        return simulate_training_pair(seed, size, tissue=preset == TISSUE_PRESET)
    p = get_preset(preset)
    H, W = _parse_size(size)
    if z_planes is not None and (not isinstance(z_planes, (int, np.integer)) or z_planes < 1):
        raise ValueError(f"z_planes must be a positive int or None, got {z_planes!r}")
    if not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    px = p.pixel_size
    pad = max(16, int(round(12.0 / px)))  # ≥12 µm margin: FFT wrap-around and border objects
    Hp = sfft.next_fast_len(H + 2 * pad, real=True)
    Wp = sfft.next_fast_len(W + 2 * pad, real=True)
    oy, ox = (Hp - H) // 2, (Wp - W) // 2
    rng = np.random.default_rng(int(seed))
    scene = make_scene(p, Wp * px, Hp * px, rng, grid=(Hp, Wp), px=px)
    planes = (
        [0.0] if z_planes is None else list((np.arange(z_planes) - (z_planes - 1) / 2) * z_step_um)
    )
    crop = (slice(oy, oy + H), slice(ox, ox + W))
    outs = []
    for zf in planes:
        r = render_scene(scene, (Hp, Wp), px, zf, p)
        q = qobm_forward(r.phase, p, rng)
        d = dapi_forward(r, scene, p, rng)
        outs.append((r, q, d))

    # relabel: keep ids consistent across planes, consecutive over nuclei present anywhere
    present = np.unique(np.concatenate([np.unique(r.nuclei[crop]) for r, _, _ in outs]))
    present = present[present > 0]
    lut = np.zeros(len(scene.nuclei["x"]) + 1, np.int32)
    lut[present] = np.arange(1, len(present) + 1)
    nz = len(planes)
    qo, da, nl, dl = [], [], [], []
    cnr = np.full((nz, len(present)), np.nan, np.float32)
    ins = np.zeros((nz, len(present)), np.float32)
    for k, (r, q, d) in enumerate(outs):
        lab = lut[r.nuclei[crop]]
        qo.append(q.phase[crop])
        da.append(d[crop])
        nl.append(lab)
        dlab = r.distractors[crop]
        if dlab.any():
            u = np.unique(dlab)
            u = u[u > 0]
            dlut = np.zeros(dlab.max() + 1, np.int32)
            dlut[u] = np.arange(1, len(u) + 1)
            dlab = dlut[dlab]
        dl.append(dlab)
        here = np.unique(lab)
        here = here[here > 0]
        c = _cnr(q.phase_clean[crop], lab, len(present), q.noise_std)
        cnr[k, here - 1] = c[here - 1]
        ins[k, here - 1] = np.nan_to_num(r.in_section[present[here - 1] - 1])
    kinds = scene.nuclei["kind"][present - 1].astype(np.int8)
    if z_planes is None:
        return SimSample(
            qobm=qo[0].astype(np.float32), dapi=da[0].astype(np.float32),
            nuclei=nl[0].astype(np.int32), distractors=dl[0].astype(np.int32),
            nucleus_cnr=cnr[0], nucleus_in_section=ins[0], pixel_size=float(px),
            preset=p.name, seed=int(seed), focus_um=0.0, nucleus_kind=kinds,
            distractor_kind=_kinds_present(outs[0][0], crop), params=p,
        )  # fmt: skip
    return SimSample(
        qobm=np.stack(qo).astype(np.float32), dapi=np.stack(da).astype(np.float32),
        nuclei=np.stack(nl).astype(np.int32), distractors=np.stack(dl).astype(np.int32),
        nucleus_cnr=cnr, nucleus_in_section=ins, pixel_size=float(px), preset=p.name,
        seed=int(seed), focus_um=np.asarray(planes, np.float32), nucleus_kind=kinds,
        distractor_kind=_kinds_present(outs[0][0], crop), params=p,
    )  # fmt: skip


def _kinds_present(r: Rendered, crop) -> np.ndarray:
    u = np.unique(r.distractors[crop])
    u = u[u > 0]
    return r.distractor_kind[u - 1] if len(u) else np.zeros(0, np.int8)


# --------------------------------------------------------------------------------------------
# Domain randomisation: a new instrument and tissue for every training field
# --------------------------------------------------------------------------------------------
#: Name of the domain-randomised "preset" (:func:`simulate_pair`, ``lcm-stain simulate --preset``).
RANDOM_PRESET = "domain-random"
#: Pixel size (µm/px) that :func:`simulate_training_pair` resamples to: the packaged models'.
MODEL_PIXEL_SIZE = 0.414


@dataclass(frozen=True)
class DomainRange:
    """One randomised quantity: drawn uniformly (``log``: log-uniformly) in [lo, hi] per field."""

    lo: float
    hi: float
    log: bool
    why: str

    def draw(self, rng: np.random.Generator, size=None):
        return (
            _loguniform(rng, (self.lo, self.hi), size)
            if self.log
            else rng.uniform(self.lo, self.hi, size)
        )


#: Every range :func:`sample_instrument` draws from, in drawing order. docs/simulator.md shows
#: this table (``python experiments/make_sim_figure.py --domain-table``); the instrument suite of
#: `evaluate --suite instruments` lies outside it.
DOMAIN_RANGES: dict[str, DomainRange] = {
    # --- optics ---
    "pixel_size": DomainRange(0.25, 0.8, True, "µm/px in the sample, 40×-class (0.25) to 10×-class (0.8) cameras; brackets 0.414 (20×). Finer sampling adds nothing once resampled to 0.414 and costs time"),  # noqa: E501
    "na_objective": DomainRange(0.25, 0.75, False, "10×/0.25 to 40×/0.75 objectives; brackets 0.4 (brain-20x), 0.5 (shifted-20x), 0.7 (brain-60x)"),  # noqa: E501
    "wavelength_um": DomainRange(0.55, 0.85, False, "green to near-infrared LEDs; brackets 0.65 and 0.72 µm"),  # noqa: E501
    "illum_na_ratio": DomainRange(0.7, 1.0, False, "σ: multiply scattered light fills the pupil (1) or less (thin or weakly scattering samples, apertured fibres); brackets 0.95, 1"),  # noqa: E501
    "illum_tilt": DomainRange(0.0, 1.0, False, "flat (0) to strongly oblique-weighted (1) half-pupil source; brackets 0.2 and 0.6"),  # noqa: E501
    "illum_rotation_deg": DomainRange(-10.0, 10.0, False, "fibres off the camera axes; the reconstruction assumes 0° (a WOTF mismatch)"),  # noqa: E501
    "source_gain": DomainRange(0.8, 1.25, True, "power of each of the four sources (fibre coupling, LED ageing), drawn per source; presets: 1"),  # noqa: E501
    "falloff": DomainRange(0.0, 0.7, False, "illumination fall-off across the field; brackets 0.35 and 0.6"),  # noqa: E501
    "optical_section_um": DomainRange(1.5, 4.5, False, "axial thickness the phase integrates (2–4 µm in qOBM, ± a margin); brackets 2, 2.5, 3"),  # noqa: E501
    # --- reconstruction ---
    "tikhonov_alpha": DomainRange(1e-3, 3e-2, True, "Tikhonov regulariser: sharp and noisy (1e-3) to smooth (3e-2); brackets 5e-3"),  # noqa: E501
    "background_sigma_um": DomainRange(15.0, 40.0, True, "σ of the DPC background high-pass; brackets 25 µm"),  # noqa: E501
    "recon_na_error": DomainRange(0.85, 1.15, False, "WOTF mismatch: NA the reconstruction assumes / true NA (nominal vs effective NA)"),  # noqa: E501
    "recon_wavelength_error": DomainRange(0.95, 1.05, False, "WOTF mismatch: assumed / true wavelength (LED spectrum and centre)"),  # noqa: E501
    "recon_illum_na_ratio_error": DomainRange(0.9, 1.1, False, "WOTF mismatch: assumed / true σ (capped at 1)"),  # noqa: E501
    "recon_tilt_error": DomainRange(-0.3, 0.3, False, "WOTF mismatch: assumed − true source tilt (the source shape is rarely measured; clipped to 0–1)"),  # noqa: E501
    # --- camera ---
    "photons": DomainRange(2000.0, 30000.0, True, "detected photons per pixel and capture, dim to full-well sCMOS; brackets 8000–12000"),  # noqa: E501
    "read_noise_e": DomainRange(0.5, 6.0, False, "camera read noise, e⁻ rms: sCMOS (0.5–2) to CCD (6); brackets 2 and 4"),  # noqa: E501
    # --- tissue ---
    "background_dn_rms": DomainRange(0.001, 0.009, True, "RI roughness of the background: smooth (cultures, grey matter) to rough (white matter, stroma); brackets 0.003, 0.006"),  # noqa: E501
    "background_beta": DomainRange(2.4, 3.6, False, "power-law slope of tissue RI spectra (2–4 in the literature); brackets 2.8, 3"),  # noqa: E501
    "nucleus_dn_scale": DomainRange(0.6, 1.6, True, "|Δn| nucleus vs cytoplasm × brain-20x's 0.003–0.010 (both signs); brackets shifted-20x's 0.004–0.012"),  # noqa: E501
    "nucleus_size_scale": DomainRange(0.75, 1.35, True, "every nuclear radius × brain-20x's per-type ranges (small glia to large tumour nuclei)"),  # noqa: E501
    "nuclei_density": DomainRange(8.0, 40.0, True, "lower end of the labelled-nuclei density per 100×100 µm (upper end 2× that); brackets 12–30 (brain) and 35–60 (tumour)"),  # noqa: E501
    "tumour_fraction": DomainRange(0.0, 1.0, False, "blend of brain-20x and tumour-dense-20x cell-type mix, 4N fraction and DAPI level"),  # noqa: E501
    "shape_noise": DomainRange(0.04, 0.16, False, "irregularity of nuclear outlines; brackets 0.08, 0.14"),  # noqa: E501
    "aspect_max": DomainRange(1.15, 1.9, False, "upper end of the nuclear aspect ratio (lower end 1); brackets 1.35, 1.8"),  # noqa: E501
    "cell_body_lo": DomainRange(1.05, 1.3, False, "lower end of cell-body / nucleus radius; brackets 1.1, 1.2"),  # noqa: E501
    "cell_body_span": DomainRange(0.3, 0.9, False, "upper − lower cell-body / nucleus radius; brackets 0.4, 0.8"),  # noqa: E501
    "cytoplasm_dn_lo": DomainRange(-0.004, 0.0, False, "lower end of cell-body Δn vs neuropil; brackets −0.002, 0"),  # noqa: E501
    "cytoplasm_dn_hi": DomainRange(0.005, 0.012, False, "upper end of cell-body Δn; brackets 0.008, 0.012"),  # noqa: E501
    "cytoplasm_absent_p": DomainRange(0.1, 0.6, False, "fraction of cells with no body contrast; brackets 0.2, 0.35"),  # noqa: E501
    "distractor_density_scale": DomainRange(0.3, 3.0, True, "density of each distractor kind (vessels, lipid, granules, debris, fibres) × its brain-20x range, drawn per kind: the mix varies"),  # noqa: E501
    "near_nucleus_p": DomainRange(0.1, 0.6, False, "fraction of blob distractors touching a nucleus; brackets 0.4"),  # noqa: E501
}  # fmt: skip
#: Dirichlet concentration of P(positive, negative, ~zero) nuclear contrast, drawn per field.
NUCLEUS_SIGN_DIRICHLET: tuple[float, float, float] = (2.0, 2.0, 1.5)


def sample_instrument(
    rng: np.random.Generator | int, base: str | SimParams = "brain-20x"
) -> SimParams:
    """Draw one instrument and tissue from :data:`DOMAIN_RANGES` (deterministic for a seed).

    Returns a ``SimParams`` named ``"domain-random"`` built on ``base`` (the DAPI side stays the
    base's: it is the model's output convention, not the instrument).
    """
    b = get_preset(base)
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    d = {k: r.draw(rng) for k, r in DOMAIN_RANGES.items() if k not in ("source_gain",)}
    d_scale = DOMAIN_RANGES["distractor_density_scale"].draw(rng, 5)
    gains = DOMAIN_RANGES["source_gain"].draw(rng, 4)
    sign_p = rng.dirichlet(NUCLEUS_SIGN_DIRICHLET)
    tum, tumour = d["tumour_fraction"], get_preset("tumour-dense-20x")
    kinds = (1 - tum) * np.asarray(b.kind_fractions) + tum * np.asarray(tumour.kind_fractions)
    kinds = kinds / kinds.sum()

    def scaled(rng_pair, s):
        return (float(rng_pair[0] * s), float(rng_pair[1] * s))

    dn_s = d["nucleus_dn_scale"]
    return replace(
        b,
        name=RANDOM_PRESET,
        pixel_size=float(d["pixel_size"]),
        na_objective=float(d["na_objective"]),
        wavelength_um=float(d["wavelength_um"]),
        illum_na_ratio=float(d["illum_na_ratio"]),
        illum_tilt=float(d["illum_tilt"]),
        illum_rotation_deg=float(d["illum_rotation_deg"]),
        source_gains=tuple(float(g) for g in gains),
        falloff=float(d["falloff"]),
        optical_section_um=float(d["optical_section_um"]),
        tikhonov_alpha=float(d["tikhonov_alpha"]),
        background_sigma_um=float(d["background_sigma_um"]),
        recon_na_objective=float(d["na_objective"] * d["recon_na_error"]),
        recon_wavelength_um=float(d["wavelength_um"] * d["recon_wavelength_error"]),
        recon_illum_na_ratio=float(min(1.0, d["illum_na_ratio"] * d["recon_illum_na_ratio_error"])),
        recon_illum_tilt=float(np.clip(d["illum_tilt"] + d["recon_tilt_error"], 0.0, 1.0)),
        recon_illum_rotation_deg=0.0,
        photons=float(d["photons"]),
        read_noise_e=float(d["read_noise_e"]),
        background_dn_rms=float(d["background_dn_rms"]),
        background_beta=float(d["background_beta"]),
        nucleus_dn_positive=scaled(b.nucleus_dn_positive, dn_s),
        nucleus_dn_negative=scaled(b.nucleus_dn_negative, dn_s),
        nucleus_sign_p=tuple(float(x) for x in sign_p),
        nucleus_size_scale=float(d["nucleus_size_scale"]),
        nuclei_per_100um2=(float(d["nuclei_density"]), float(2 * d["nuclei_density"])),
        kind_fractions=tuple(float(x) for x in kinds),
        dapi_4n_p=float((1 - tum) * b.dapi_4n_p + tum * tumour.dapi_4n_p),
        dapi_level=float((1 - tum) * b.dapi_level + tum * tumour.dapi_level),
        shape_noise=float(d["shape_noise"]),
        aspect=(1.0, float(d["aspect_max"])),
        cell_body_scale=(float(d["cell_body_lo"]), float(d["cell_body_lo"] + d["cell_body_span"])),
        cytoplasm_dn=(float(d["cytoplasm_dn_lo"]), float(d["cytoplasm_dn_hi"])),
        cytoplasm_absent_p=float(d["cytoplasm_absent_p"]),
        vessels_per_100um2=scaled(b.vessels_per_100um2, d_scale[0]),
        lipid_per_100um2=scaled(b.lipid_per_100um2, d_scale[1]),
        granules_per_100um2=scaled(b.granules_per_100um2, d_scale[2]),
        debris_per_100um2=scaled(b.debris_per_100um2, d_scale[3]),
        fibres_per_100um2=scaled(b.fibres_per_100um2, d_scale[4]),
        near_nucleus_p=float(d["near_nucleus_p"]),
    )


#: Name of the domain-randomised preset with tissue architecture and phase-retrieval diversity
#: (:func:`sample_tissue` on top of :func:`sample_instrument`).
TISSUE_PRESET = "tissue-random"

#: What :func:`sample_tissue` draws on top of an instrument, in drawing order.
TISSUE_RANGES: dict[str, DomainRange] = {
    "pixel_size": DomainRange(0.25, 1.0, True, "µm/px in the sample, 40×-class to 10×-class cameras; coarser than the model's 0.414 is imaged on its own grid and brought to 0.414 as the engine does"),  # noqa: E501
    "layout_stroma": DomainRange(0.1, 0.5, False, "scattered stroma beside a layout (× the density)"),  # noqa: E501
    "rim_p": DomainRange(0.0, 0.8, False, "share of nuclei with a rim (envelope, peripheral heterochromatin)"),  # noqa: E501
    "chromatin_contrast": DomainRange(0.15, 0.5, False, "rms chromatin texture; brackets 0.3"),  # noqa: E501
    "fine_texture_rms": DomainRange(0.0, 0.03, False, "speckle-like fine phase texture, rad rms"),  # noqa: E501
    "tf_defocus_um": DomainRange(1.0, 4.0, True, "through-focus stack: ± defocus of its outer planes"),  # noqa: E501
    "tf_residual_defocus_um": DomainRange(-0.5, 0.5, False, "through-focus: focus error the inversion does not know"),  # noqa: E501
    "tf_alpha": DomainRange(5e-3, 5e-2, True, "through-focus: Tikhonov regulariser"),  # noqa: E501
    "tf_lowcut_um": DomainRange(6.0, 20.0, True, "through-focus: σ of the low-frequency cut (DPC: 15–40)"),  # noqa: E501
    "tf_speckle": DomainRange(0.0, 0.02, False, "through-focus: multiplicative speckle rms; above ~0.04 it drowns the phase (docs/simulator.md)"),  # noqa: E501
}  # fmt: skip
#: Layout families and their shares in :func:`sample_tissue` (tissue.TRAIN_FAMILIES).
TISSUE_FAMILY_P: dict[str, float] = {
    "scattered": 0.2, "gland": 0.25, "sheet": 0.15, "stream": 0.15, "cluster": 0.1,
    "necrosis": 0.15,
}  # fmt: skip
#: Share of tissue fields whose phase comes from a through-focus stack instead of DPC.
THROUGH_FOCUS_P = 0.35


def sample_tissue(rng: np.random.Generator | int, instrument: SimParams) -> SimParams:
    """Draw a tissue architecture (tissue.TRAIN_FAMILIES), nuclear detail, a pixel size and
    the phase-retrieval family (DPC or through-focus) on top of ``instrument``."""
    from .tissue import TRAIN_FAMILIES

    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    d = {k: float(r.draw(rng)) for k, r in TISSUE_RANGES.items()}
    fams = list(TISSUE_FAMILY_P)
    assert set(fams) <= set(TRAIN_FAMILIES)
    w = np.asarray([TISSUE_FAMILY_P[f] for f in fams])
    family = fams[int(rng.choice(len(fams), p=w / w.sum()))]
    tf = bool(rng.random() < THROUGH_FOCUS_P)
    return replace(
        instrument,
        name=TISSUE_PRESET,
        pixel_size=d["pixel_size"],
        layout=family,
        layout_stroma=d["layout_stroma"],
        rim_p=d["rim_p"],
        chromatin_contrast=d["chromatin_contrast"],
        fine_texture_rms=d["fine_texture_rms"],
        reconstruction="through-focus" if tf else instrument.reconstruction,
        tf_defocus_um=d["tf_defocus_um"],
        tf_residual_defocus_um=d["tf_residual_defocus_um"],
        tf_alpha=d["tf_alpha"],
        tf_lowcut_um=d["tf_lowcut_um"],
        tf_speckle=d["tf_speckle"],
    )


def _relabel(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive ids 1..K for the labels present; returns (new labels, old ids present)."""
    u = np.unique(labels)
    u = u[u > 0]
    lut = np.zeros(int(labels.max(initial=0)) + 1, np.int32)
    lut[u] = np.arange(1, len(u) + 1, dtype=np.int32)
    return lut[labels], u


def simulate_training_pair(
    seed: int,
    size: int | tuple[int, int] = 256,
    pixel_size: float = MODEL_PIXEL_SIZE,
    tissue: bool = False,
) -> SimSample:
    """One domain-randomised training field at the model's pixel size.

    Draws an instrument and tissue with :func:`sample_instrument` from
    ``numpy.random.default_rng(seed)``. A camera finer than ``pixel_size`` is simulated on its own
    grid over the same area, then qOBM and DAPI are resampled (anti-aliased linear, scikit-image)
    and the labels by nearest neighbour; a coarser one images only the phase on its grid
    (``qobm_pixel_size``), interpolated back, while ground truth and DAPI stay at ``pixel_size``.
    ``params`` records the instrument (camera pixel: ``qobm_pixel_size or pixel_size``);
    ``pixel_size`` is the output's. Deterministic per (seed, size, pixel_size, tissue).
    ``tissue``: also draw an architecture, nuclear detail, a 0.25–1.0 µm/px camera and the
    phase retrieval (:func:`sample_tissue`; preset ``"tissue-random"``).
    """
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not (isinstance(pixel_size, (int, float)) and math.isfinite(pixel_size) and pixel_size > 0):
        raise ValueError(f"pixel_size must be a positive number of µm/px, got {pixel_size!r}")
    H, W = _parse_size(size)
    rng = np.random.default_rng(int(seed))
    p = sample_instrument(rng)
    if tissue:
        p = sample_tissue(rng, p)
    name = TISSUE_PRESET if tissue else RANDOM_PRESET
    scene_seed = int(rng.integers(2**31))
    if p.pixel_size > pixel_size:
        # a coarser qOBM camera: ground truth and DAPI stay on the model's grid (the DAPI is the
        # output convention, not the instrument); only the phase is imaged on the camera grid
        p = replace(p, qobm_pixel_size=p.pixel_size, pixel_size=float(pixel_size))
        s = simulate_pair(p, size=(H, W), seed=scene_seed)
        return replace(s, preset=name, seed=int(seed))
    # a finer camera: simulate on its grid over the same area (the native pixel is adjusted by
    # < 0.5 px over the field so the resampling factor is exact), then resample everything
    hn = max(8, round(H * pixel_size / p.pixel_size))
    wn = max(8, round(W * pixel_size / p.pixel_size))
    p = replace(p, pixel_size=float(H * pixel_size / hn))
    s = simulate_pair(p, size=(hn, wn), seed=scene_seed)
    return _resample_sample(s, (H, W), pixel_size, preset=name, seed=int(seed))


def _resample_sample(s: SimSample, shape: tuple[int, int], pixel_size: float, preset: str,
                     seed: int) -> SimSample:  # fmt: skip
    """A single-plane sample on a (H, W) grid over the same area: images by anti-aliased linear
    interpolation, labels by nearest neighbour (renumbered 1..K; per-nucleus arrays follow)."""
    from skimage.transform import resize

    down = s.qobm.shape[0] > shape[0]

    def img(a):
        return resize(a, shape, order=1, anti_aliasing=down, preserve_range=True).astype(np.float32)

    def lab(a):
        return resize(a, shape, order=0, anti_aliasing=False, preserve_range=True).astype(np.int32)

    nuclei, keep = _relabel(lab(s.nuclei))
    distr, dkeep = _relabel(lab(s.distractors))
    return SimSample(
        qobm=img(s.qobm), dapi=np.clip(img(s.dapi), 0, 1), nuclei=nuclei, distractors=distr,
        nucleus_cnr=s.nucleus_cnr[keep - 1], nucleus_in_section=s.nucleus_in_section[keep - 1],
        pixel_size=float(pixel_size), preset=preset, seed=seed, focus_um=0.0,
        nucleus_kind=s.nucleus_kind[keep - 1], distractor_kind=s.distractor_kind[dkeep - 1],
        params=s.params,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Dataset writer
# --------------------------------------------------------------------------------------------
def _atomic_write_tiff(path: Path, data: np.ndarray, px: float, axes: str, z_step=None) -> None:
    import tifffile

    meta = {"axes": axes, "PhysicalSizeX": px, "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": px, "PhysicalSizeYUnit": "µm"}  # fmt: skip
    if z_step is not None:
        meta.update(PhysicalSizeZ=float(z_step), PhysicalSizeZUnit="µm")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp_", suffix=".ome.tif")
    os.close(fd)
    try:
        tifffile.imwrite(tmp, data, ome=True, metadata=meta, photometric="minisblack")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; datasets are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp_", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_list(a: np.ndarray) -> list:
    """Rounded nested list with NaN (nucleus absent from a plane) as null: strict JSON."""
    a = np.round(np.asarray(a, np.float64), 4)
    return np.where(np.isnan(a), None, a).tolist()


def write_dataset(out, preset: str = "brain-20x", n: int = 4, size: int | tuple[int, int] = 512,
                  seed: int = 0, z_planes: int | None = None, z_step_um: float = 1.0) -> list[Path]:  # fmt: skip
    """Write ``n`` simulated pairs as OME-TIFFs (+ JSON metadata) into ``out``.

    Sample ``i`` uses seed ``seed + i``. Returns the qOBM paths, one per sample.
    """
    p = preset if preset == RANDOM_PRESET else get_preset(preset)
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive number of samples, got {n!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(int(n)):
        s = simulate_pair(p, size=size, seed=int(seed) + i, z_planes=z_planes, z_step_um=z_step_um)
        axes = "YX" if z_planes is None else "ZYX"
        zs = None if z_planes is None else z_step_um
        stem = f"{i:03d}"
        qp = out / f"{stem}_qobm.ome.tif"
        _atomic_write_tiff(qp, s.qobm, s.pixel_size, axes, zs)
        _atomic_write_tiff(out / f"{stem}_dapi.ome.tif", s.dapi, s.pixel_size, axes, zs)
        _atomic_write_tiff(out / f"{stem}_nuclei.ome.tif", s.nuclei, s.pixel_size, axes, zs)
        _atomic_write_tiff(
            out / f"{stem}_distractors.ome.tif", s.distractors, s.pixel_size, axes, zs
        )
        meta = {
            "preset": s.preset,
            "seed": s.seed,
            "pixel_size_um": s.pixel_size,
            "z_planes": z_planes,
            "z_step_um": z_step_um if z_planes else None,
            "qobm_units": "rad",
            "dapi_scale": "fixed 0-1 (1.0 = dapi_photons photons)",
            "nucleus_cnr": _json_list(s.nucleus_cnr),
            "nucleus_in_section": _json_list(s.nucleus_in_section),
            "nucleus_kind": [KIND_NAMES[k] for k in s.nucleus_kind],
            "params": s.params.to_dict(),
        }
        _atomic_write_text(out / f"{stem}_meta.json", json.dumps(meta, indent=1, allow_nan=False))
        paths.append(qp)
    return paths
