"""`stain()` / `iter_stain()`: validate any array a lab has, then stain it plane by plane, tile by tile.

Every user path (napari widget, CLI, Python) goes through `iter_stain`, so input checks, pixel-size
handling, seeding and the uncertainty estimate behave the same everywhere.
"""

from __future__ import annotations

import functools
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from . import ood, tiling
from ._drain import drain
from ._params import (  # noqa: F401
    PIXEL_SIZE_TOLERANCE,
    RESCALE_RANGE,
    SEED_RANGE,
    guidance_number,
    rescale_factor,
)
from ._params import check_params as _check_params  # torch-free: the CLI checks before importing
from ._version import __version__
from .device import auto_batch

#: Largest |value| a qOBM phase image in radians plausibly holds; an integer image beyond it may be
#: a raw camera frame (intensity, not phase), which gets a note.
PHASE_LIMIT = 100.0
MAX_NDIM = 5


@dataclass
class StainResult:
    """What `iter_stain` returns: mean stain, per-pixel std (samples > 1) and provenance."""

    mean: np.ndarray
    std: np.ndarray | None = None
    info: dict = field(default_factory=dict)


def _is_lazy(a) -> bool:
    """dask / zarr / other array-likes that we index plane by plane instead of loading."""
    return (
        not isinstance(a, np.ndarray)
        and hasattr(a, "shape")
        and hasattr(a, "dtype")
        and hasattr(a, "__getitem__")
    )


def validate_image(image):
    """Return an indexable array with a usable dtype and shape, or raise ValueError/TypeError."""
    if isinstance(image, (str, bytes, os.PathLike)):
        raise TypeError(
            f"stain() needs an image array, got {type(image).__name__} {image!r}: read files with "
            "napari_lcm_stain.io.read_image(path) or use `lcm-stain stain FILE -o OUT`"
        )
    if image is None:
        raise TypeError("stain() needs an image array, got None")
    if type(image).__module__.split(".")[0] == "torch" and hasattr(image, "detach"):
        image = _from_torch(image)
    if isinstance(image, np.ma.MaskedArray):
        image = _unmask(image)
    arr = image if _is_lazy(image) else np.asarray(image)
    try:
        dtype = np.dtype(arr.dtype)
    except TypeError as e:
        if not hasattr(arr, "__array__"):
            raise TypeError(f"unsupported array dtype {arr.dtype!r}: pass a numeric array") from e
        arr = np.asarray(arr)  # e.g. a torch tensor: its dtype is not a numpy dtype
        dtype = arr.dtype
    if dtype.kind == "c":
        raise TypeError(
            f"complex input ({dtype}) is not a phase image: pass np.angle(field) or the real phase"
        )
    if dtype.kind not in "biuf":
        raise TypeError(
            f"image dtype {dtype} is not numeric: pass a bool, integer or float array "
            "(e.g. arr.astype(np.float32))"
        )
    arr = _known_shape(arr)
    shape = tuple(int(s) for s in arr.shape)
    if len(shape) == 0:
        raise ValueError("image is a scalar: pass a 2-D (Y, X) array or a stack (..., Y, X)")
    if len(shape) == 1:
        raise ValueError(f"image is 1-D {shape}: reshape it to 2-D, e.g. arr[None, :] for one row")
    if len(shape) > MAX_NDIM:
        raise ValueError(
            f"image has {len(shape)} dimensions {shape}: at most {MAX_NDIM} (T, Z, C, Y, X) are "
            "supported; squeeze or split the extra axes"
        )
    if 0 in shape:
        raise ValueError(f"image is empty (shape {shape}): nothing to stain")
    if len(shape) >= 3 and shape[-1] in (3, 4):  # RGB stacks too, not 3-4 px wide planes
        raise ValueError(
            f"image of shape {shape} looks like RGB/RGBA (last axis {shape[-1]}): qOBM phase is "
            "one channel; convert it first (e.g. skimage.color.rgb2gray(img) or img[..., 0])"
        )
    return arr


def _from_torch(tensor):
    """A CPU tensor numpy can take: detached (one that requires grad cannot become numpy), and
    bfloat16 / float8 (no numpy dtype) widened to float32 (exact for both)."""
    import torch

    tensor = tensor.detach().cpu()
    if tensor.is_floating_point() and tensor.dtype not in (
        torch.float16, torch.float32, torch.float64
    ):  # fmt: skip
        tensor = tensor.float()
    return tensor


def _known_shape(arr):
    """`arr` with every size known: a dask array with unknown chunk sizes (boolean indexing,
    `from_delayed` with NaN shape) gets them computed, on a copy, so the caller's array is left
    as it is; any other array-like with an unknown size is explained."""
    shape = tuple(arr.shape)
    if all(isinstance(s, (int, np.integer)) for s in shape):
        return arr
    if hasattr(arr, "compute_chunk_sizes"):  # dask
        return arr.copy().compute_chunk_sizes()
    raise ValueError(
        f"image has unknown size {shape} (a lazy array whose sizes are not known until it is "
        "computed): compute it first (np.asarray(image)) or give it known chunk sizes"
    )


def _ood_view(plane: np.ndarray, pixel_size) -> np.ndarray:
    """The central part of `plane` the out-of-distribution score reads: at most `ood.MAX_SIDE`
    px per side *after* its resampling to the reference pixel size. The score crops to that
    side before resampling, so a coarse input (3.3 µm/px: 8×) would be scored on an 8192²
    float64 plane and its spectrum (~2 GB); cropping first bounds it for every pixel size."""
    f = float(pixel_size or ood.DEFAULT_PIXEL_SIZE) / ood.DEFAULT_PIXEL_SIZE
    if f <= 1.0:
        return plane
    side = max(ood.MIN_SIDE, math.ceil(ood.MAX_SIDE / f))
    h, w = plane.shape
    y0, x0 = max(0, (h - side) // 2), max(0, (w - side) // 2)
    return plane[y0 : y0 + min(h, side), x0 : x0 + min(w, side)]


def _unmask(image: np.ma.MaskedArray) -> np.ndarray:
    """A masked array's masked pixels become NaN in a float copy, so they are filled like NaN
    pixels (the plane's finite median) instead of being stained from their hidden values."""
    mask = np.ma.getmaskarray(image)
    if not mask.any():
        return np.ma.getdata(image)
    if image.dtype.kind not in "biuf":
        return np.ma.getdata(image)  # validate_image names the bad dtype
    dtype = np.float64 if image.dtype.itemsize > 4 else np.float32
    warnings.warn(
        f"masked array: its {int(mask.sum())} masked pixels are treated as missing (filled with "
        "the plane's finite median before staining); the result is a plain array",
        stacklevel=4,
    )
    return np.ma.filled(image.astype(dtype), np.nan)


def estimate_input_pixel_size(arr) -> tuple[float, str]:
    """µm/px of an image without a pixel size, read from its first plane's content
    (`pixel_size_estimate`), and the note that says so."""
    from .pixel_size_estimate import CROP, estimate_pixel_size, load_estimator

    first = arr[(0,) * (arr.ndim - 2)] if arr.ndim > 2 else arr
    h, w = first.shape[-2:]  # only the central crop the features use is read (dask, zarr)
    y0, x0 = max(0, (h - CROP) // 2), max(0, (w - CROP) // 2)
    est = estimate_pixel_size(np.asarray(first[y0 : y0 + CROP, x0 : x0 + CROP], np.float32))
    err = load_estimator()["held_out"]["median_rel_error"]
    return est, (
        f"no pixel size given: estimated {est:.3g} µm/px from the image (the estimator's median "
        f"error on held-out simulated fields is {err:.0%}); give the pixel size to override"
    )


def _check_phase_range(plane: np.ndarray, where: str, notes: list[str]) -> None:
    """Note an integer image far beyond a phase image's radians: maybe a raw camera frame."""
    if plane.dtype.kind not in "iu":
        return
    lo, hi = float(plane.min()), float(plane.max())
    peak = hi if hi >= -lo else lo
    if abs(peak) <= PHASE_LIMIT:
        return
    msg = (
        f"{where} has values up to {peak:.6g} ({plane.dtype}), far beyond the few radians of a "
        "qOBM phase image: if these are raw camera counts (an intensity frame), the stain is not "
        "meaningful, reconstruct the phase first; phase in other units (e.g. nm of optical path) "
        "is fine for the packaged models, which normalise each plane by its own statistics"
    )
    notes.append(msg)
    warnings.warn(msg, stacklevel=3)


def _is_predictor(obj) -> bool:
    return callable(obj) and all(hasattr(obj, a) for a in ("multiple", "noise_shape", "normalize"))


@functools.lru_cache(maxsize=4)
def _cached_packaged(
    name: str, steps, device: str, precision: str = "auto", texture=False, guidance=None
):
    from .sampling import load_predictor

    return load_predictor(name, steps, device, precision, texture=texture, guidance=guidance)


def with_texture(predictor, texture: bool):
    """`predictor` drawing (or not) its texture decoder's grain, via `Predictor.with_texture`
    (a copy when that changes anything); objects without that method are returned as they are."""
    follow = getattr(predictor, "with_texture", None)
    return follow(bool(texture)) if callable(follow) else predictor


def with_guidance(predictor, guidance):
    """`predictor` sampling at guidance `guidance`, via `Predictor.with_guidance` (a copy when
    that changes anything; ValueError outside the model's range); objects without that method
    have no guidance control: they are returned as they are for None or 1, else refused."""
    follow = getattr(predictor, "with_guidance", None)
    if callable(follow):
        return follow(guidance)
    from ._params import check_guidance

    check_guidance(guidance, None)
    return predictor


def get_predictor(
    model="lcm", steps=None, device="auto", precision="auto", texture=None, guidance=None
):
    """A loaded Predictor: passed through, or packaged ('lcm', 'pix2pix', 'teacher', cached) or a
    path. `texture`: True/False = draw a texture decoder's grain or its smooth mean; None = the
    default (loaded here: smooth; a passed Predictor: as it is). A passed Predictor follows a
    True/False through `Predictor.with_texture`, which never changes the caller's object.
    `guidance`: the guidance scale (`_params.check_guidance`); None = the model's default (a
    passed Predictor: as it is); a passed Predictor follows a number through
    `Predictor.with_guidance` (a copy, too)."""
    guidance = guidance_number(guidance)  # a number (also the cache key) before any loading
    if _is_predictor(model):
        pred = model if texture is None else with_texture(model, texture)
        return pred if guidance is None else with_guidance(pred, guidance)
    texture = bool(texture)  # None: smooth
    if isinstance(model, str) and model.lower() in ("lcm", "pix2pix", "teacher"):
        return _cached_packaged(model.lower(), steps, str(device), precision, texture, guidance)
    if isinstance(model, (str, os.PathLike)):
        from .sampling import load_predictor

        return load_predictor(model, steps, device, precision, texture=texture, guidance=guidance)
    raise TypeError(
        f"model must be 'lcm', 'pix2pix', 'teacher', a checkpoint path or a loaded Predictor, "
        f"not {type(model).__name__}"
    )


def _fix_nonfinite(plane: np.ndarray, where: str, notes: list[str]) -> np.ndarray:
    """Replace NaN/Inf by the plane's finite median (in our own copy); all-NaN is an error."""
    if plane.dtype.kind != "f":
        return plane
    finite = np.isfinite(plane)
    if finite.all():
        return plane
    if not finite.any():
        raise ValueError(
            f"{where} has no finite pixels (all NaN/Inf): nothing to stain; drop or mask that plane"
        )
    med = float(np.median(plane[finite]))
    n_bad = int(plane.size - np.count_nonzero(finite))
    plane = plane.copy()
    plane[~finite] = med
    msg = f"{where}: replaced {n_bad} NaN/Inf pixels by the plane's finite median {med:.4g}"
    notes.append(msg)
    warnings.warn(msg, stacklevel=3)
    return plane


def _plane_normalizer(pred, plane, where: str, notes: list[str]):
    """(stats, per-tile transform) for one whole plane: the statistics of the checkpoint's
    normalisation come from the whole plane, so every tile is normalised alike. Predictors
    without `norm_stats` (duck-typed test doubles) normalise each tile on their own."""
    if not hasattr(pred, "norm_stats"):
        return None, pred.normalize
    stats = pred.norm_stats(plane)
    if stats.get("constant"):
        notes.append(f"{where} is constant (no phase structure): its stain carries no information")
    return stats, functools.partial(pred.normalize, stats=stats)


def _resize(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize with anti-aliasing when shrinking (skimage), kept float32."""
    from skimage.transform import resize

    if tuple(a.shape) == tuple(shape):
        return a
    shrink = shape[0] < a.shape[0] or shape[1] < a.shape[1]
    return resize(
        a, shape, order=1, mode="reflect", anti_aliasing=shrink, preserve_range=True
    ).astype(np.float32, copy=False)


def _scheduler_context(scheduler):
    """(compute function, closer) for a dask scheduler name, address or distributed Client."""
    if scheduler in ("threads", "sync", "synchronous", "processes", "single-threaded"):
        return (lambda arr: arr.compute(scheduler=scheduler)), (lambda: None)
    try:
        from distributed import Client
    except ImportError as e:  # pragma: no cover - distributed is in the test/all extras
        raise ValueError(
            "--scheduler needs dask.distributed: pip install 'napari-lcm-stain[all]'"
        ) from e
    if isinstance(scheduler, Client):
        return (lambda arr: scheduler.compute(arr).result()), (lambda: None)
    if not isinstance(scheduler, str):
        raise TypeError(
            f"scheduler must be an address string or a distributed.Client, not {scheduler!r}"
        )
    try:
        client = Client(scheduler, timeout="20s")
    except OSError as e:
        raise ValueError(f"cannot reach dask scheduler at {scheduler!r}: {e}") from e
    return (lambda arr: client.compute(arr).result()), client.close


class _PlaneView:
    """Write-through view of one plane of a lazy output (zarr): `view[r0:r1, c0:c1] = block`."""

    def __init__(self, arr, idx: tuple):
        self.arr, self.idx = arr, idx

    def __setitem__(self, key, value):
        self.arr[self.idx + tuple(key)] = value


def _plane_target(out, idx: tuple):
    if not idx:
        return out
    return out[idx] if isinstance(out, np.ndarray) else _PlaneView(out, idx)


def iter_stain(
    image,
    model="lcm",
    steps: int | None = None,
    tile: int = 1024,
    overlap: int = 32,
    device: str = "auto",
    seed: int = 0,
    pixel_size: float | None = None,
    samples: int = 1,
    *,
    batch: int | None = None,
    precision: str = "auto",
    out=None,
    out_std=None,
    scheduler=None,
    loader: Callable[[], object] | None = None,
    context: int | None = None,
    pixel_size_source: str = "pixel_size",
    texture: bool | None = None,
    guidance: float | None = None,
) -> Iterator[tuple[int, int]]:
    """Generator: yields (done, total) over planes × samples × tiles; returns a `StainResult`.

    `image`: numpy, dask or zarr, 2-D (Y, X) or up to 5-D with leading plane axes (never modified).
    `model`: 'lcm' | 'pix2pix' | 'teacher' | checkpoint path | loaded Predictor (reused as is).
    `steps`: sampling steps; None = the model's default (LCM 1, teacher 50).
    `pixel_size`: input µm/px; if it differs from the model's training pixel size by > 1 %, each
    plane is resized to the training pixel size, stained, and resized back. "auto" = estimate
    it from the image (`pixel_size_estimate`; `info["pixel_size_estimated"]`, with a note);
    None = assume the model's.
    `samples`: K > 1 draws K noise canvases (seeds seed..seed+K-1) -> mean and per-pixel std.
    `out` / `out_std`: optional pre-allocated outputs with the input's shape (tifffile memmap,
    zarr) that planes are written into as they finish, so big stacks never sit in memory twice.
    `scheduler`: dask scheduler name, address or Client: each plane runs as a dask graph;
    `loader` (picklable, zero-arg) lets workers build the predictor instead of receiving it.
    `context`: input-only margin (px) around each tile; None = the model's receptive-field
    radius (`tiling.model_context`), so tiled output matches whole-image output.
    `pixel_size_source`: where `pixel_size` came from, named in the message when its rescale
    factor is outside `RESCALE_RANGE` (e.g. "--pixel-size", "the file's metadata").
    `info["ood"]`: the input's out-of-distribution score (`ood.ood_score`; the worst plane of a
    stack); when flagged its note is also in `info["warnings"]`. Never blocks.
    `texture`: True = models with a texture decoder draw the stain with DAPI-like grain, for
    looking at it beside real DAPI; False = their smooth mean, what analysis wants; None (the
    default) = smooth for a model loaded here, a passed Predictor as it is. Other models ignore
    it. The grain costs SSIM and nuclei F1 and adds no rim (docs/model-card.md).
    `info["texture"]` says whether grain was drawn (False for models without a texture decoder).
    `guidance`: the guidance scale of a model trained for it (a guided LCM, or a teacher trained
    with condition dropout, which then samples with classifier-free guidance): lower values give
    a faithful, softer stain; higher ones crisper, bolder nuclei. It costs nothing for a guided
    LCM (an input to the network; the guided teacher runs two branches per step). None (the
    default) = the model's default (a passed Predictor: as it is); outside the range the model
    was trained for it is refused with that range; models without guidance accept only None or
    1. `info["guidance"]` is the scale used (None for a model without guidance).
    """
    t_start = time.perf_counter()
    arr = validate_image(image)
    px = _check_params(tile, overlap, samples, seed, pixel_size, steps, guidance)
    pred = get_predictor(model, steps, device, precision, texture, guidance)
    shape = tuple(int(s) for s in arr.shape)
    lead, (h, w) = shape[:-2], shape[-2:]
    n_planes = int(np.prod(lead)) if lead else 1
    notes: list[str] = []

    model_px = getattr(pred, "pixel_size", None)
    px_estimate = None
    if px == "auto":
        try:
            px, note = estimate_input_pixel_size(arr)
            px_estimate = px
            pixel_size_source = "the pixel-size estimator"
        except ValueError as exc:  # too small or no finite pixels: the checks below say more
            px, note = None, f"pixel size unknown and not estimable ({exc}): assumed the model's"
        notes.append(note)
    scale = rescale_factor(px, model_px, pixel_size_source)
    work = (max(1, round(h * scale)), max(1, round(w * scale))) if scale != 1.0 else (h, w)
    if scale != 1.0:
        notes.append(
            f"rescaled {h}x{w} px at {px:g} µm/px to {work[0]}x{work[1]} px at the model's "
            f"{float(model_px):g} µm/px, stained, and rescaled back"
        )
    elif px is None:
        notes.append("pixel size unknown: assumed to match the model's training pixel size")

    if context is None:
        context = tiling.model_context(pred)
    grid = tiling.make_grid(work, pred.multiple, tile, overlap, context)
    if batch is None:  # 2 on the CPU; on CUDA as many tiles as the card's free memory holds
        pred_dev = getattr(pred, "device", None)
        batch = auto_batch(pred_dev, grid.tile[0] * grid.tile[1]) if pred_dev else 2
    stochastic = pred.noise_shape(*grid.padded) is not None
    k_eff = samples if stochastic else 1
    if k_eff > 1 and getattr(pred, "texture", False):
        # grain is measurement-like noise, not the model's uncertainty: K samples are summarised
        # without it, so the std shows only how the model's answers differ
        pred = with_texture(pred, False)
        notes.append(
            f"{samples} samples: the mean and std are of the smooth stain (the texture grain is "
            "left out of an uncertainty estimate)"
        )
    if samples > 1 and not stochastic:
        notes.append(f"{pred.name} is deterministic: {samples} samples would be identical, std = 0")
    total = n_planes * k_eff * grid.n_tiles

    mean_out = out if out is not None else np.empty(shape, np.float32)
    std_out = None
    if samples > 1:
        std_out = out_std if out_std is not None else np.empty(shape, np.float32)
    for name, o in (("out", mean_out), ("out_std", std_out)):
        if o is not None and tuple(o.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(o.shape)}, expected the input's {shape}")
        if o is not None and np.dtype(o.dtype).kind != "f":
            raise ValueError(
                f"{name} has dtype {np.dtype(o.dtype)}: the stain is a 0-1 float, so an integer "
                "or bool output would hold only 0 and 1; allocate it as float32"
            )

    if scheduler is not None:
        compute, close = _scheduler_context(scheduler)
        if loader is None and isinstance(model, (str, os.PathLike)):
            from .sampling import load_predictor

            loader = functools.partial(
                load_predictor, str(model), steps, str(device), texture=bool(texture),
                guidance=getattr(pred, "guidance", None),
            )  # fmt: skip
    else:
        compute, close = None, (lambda: None)

    # one noise canvas per sample, the same for every plane: a Z/T stack gets no noise flicker,
    # and a plane stains the same whether it comes alone or inside a stack. K > 1 samples draw
    # their canvases one at a time (drawing is cheap beside the model), never K at once.
    noise0 = tiling.make_noise_canvas(pred, grid.padded, seed) if k_eff == 1 else None
    clip = (0.0, 1.0)
    done = 0
    ood_planes: dict[tuple, dict] = {}  # out-of-distribution score per plane (never blocks)
    range_noted = False
    try:
        yield done, total
        for idx in np.ndindex(*lead) if lead else [()]:
            where = f"plane {idx}" if lead else "image"
            key = idx if idx else ...
            # the caller's data (often a view or memmap): only read; tiles are cast and
            # normalised one at a time; _fix_nonfinite copies before it writes
            plane = np.asarray(arr[key])
            if plane.dtype.kind == "f" and plane.dtype.itemsize < 4:
                plane = plane.astype(np.float32)
            plane = _fix_nonfinite(plane, where, notes)
            ood_px = px if px is not None else model_px
            ood_planes[idx] = ood.check_plane(_ood_view(plane, ood_px), ood_px)
            if not range_noted:
                n_notes = len(notes)
                _check_phase_range(plane, where, notes)
                range_noted = len(notes) > n_notes  # one note per image, not one per plane
            if scale != 1.0:  # resampled tile by tile as the tiler reads it (docs/engine.md)
                plane = tiling.ResampledPlane(plane, work)
            stats, transform = _plane_normalizer(pred, plane, where, notes)
            direct = k_eff == 1 and compute is None
            mean = m2 = None
            for k in range(k_eff):
                noise = (
                    noise0 if k_eff == 1 else tiling.make_noise_canvas(pred, grid.padded, seed + k)
                )
                # the stain at the working size goes through a ResampleSink, which writes it
                # back at the input's size band by band
                target = _plane_target(mean_out, idx) if direct else None
                if scale != 1.0:
                    y_small = target if direct else np.empty((h, w), np.float32)
                    target = tiling.ResampleSink(work, y_small, clip, shape=(h, w))
                if compute is not None:
                    lazy = tiling.predict_tiled_dask(
                        plane, pred, tile, overlap, noise, batch, loader=loader,
                        normalize=stats or True, clip=clip, context=context,
                    )  # fmt: skip
                    y = np.asarray(compute(lazy), dtype=np.float32)
                    done += grid.n_tiles
                    yield done, total
                    if target is not None:
                        target[0 : work[0], 0 : work[1]] = y
                else:
                    gen = tiling.iter_predict_tiled(
                        plane, pred, tile, overlap, noise, batch, out=target,
                        transform=transform, clip=clip, context=context,
                    )  # fmt: skip
                    base = done
                    while True:
                        try:
                            d, _t = next(gen)
                        except StopIteration as stop:
                            y = stop.value
                            break
                        done = base + d
                        yield done, total
                del noise
                if direct:  # streamed straight into the output, band by band
                    continue
                if scale != 1.0:
                    y = y_small
                # Welford running mean / M2: K samples never need K planes in memory
                if mean is None:
                    mean = np.array(y, dtype=np.float32)
                    m2 = np.zeros_like(mean) if k_eff > 1 else None
                else:
                    delta = y - mean
                    mean += delta / (k + 1)
                    m2 += delta * (y - mean)
                del y
            del plane
            if mean is not None:
                mean_out[key] = mean
            if std_out is not None:
                std_out[key] = 0.0 if m2 is None else np.sqrt(m2 / (k_eff - 1))
            del mean, m2
    finally:
        close()

    ood_info = ood.summarise(ood_planes)
    if ood_info and ood_info["note"]:
        notes.append(ood_info["note"])
    info = {
        "model": getattr(pred, "name", type(pred).__name__),
        "steps": getattr(pred, "steps", steps),
        # whether the stain was drawn with grain: only a texture decoder with texture on
        "texture": bool(getattr(pred, "texture", False)),
        # the guidance scale it sampled with (None: a model without guidance)
        "guidance": getattr(pred, "guidance", None),
        "seed": int(seed),
        "samples": int(samples),
        "tile": list(grid.tile),
        "overlap": int(overlap),
        "context": int(context),
        "taper": list(grid.taper),
        "tiles_per_plane": grid.n_tiles,
        "planes": n_planes,
        "device": str(getattr(pred, "device", device)),
        "pixel_size": px,
        # µm/px read from the image when none was given (pixel_size="auto"); None otherwise
        "pixel_size_estimated": px_estimate,
        "model_pixel_size": None if model_px is None else float(model_px),
        "rescale": scale,
        "work_shape": list(work),
        "scheduler": None if scheduler is None else str(scheduler),
        "warnings": notes,
        "ood": ood_info,
        "version": __version__,
        "seconds": round(time.perf_counter() - t_start, 3),
    }
    return StainResult(mean_out, std_out, info)


def stain(
    image,
    model="lcm",
    steps: int | None = None,
    tile: int = 1024,
    overlap: int = 32,
    device: str = "auto",
    seed: int = 0,
    pixel_size: float | None = None,
    samples: int = 1,
    progress: Callable[[int, int], None] | None = None,
    *,
    guidance: float | None = None,
    **kwargs,
) -> np.ndarray:
    """Virtual DAPI (float32, 0–1, the input's shape) from a qOBM phase image or stack.

    Same arguments as `iter_stain`; `progress(done, total)` is called as tiles finish.
    With `samples > 1` this returns the mean; use `iter_stain` to get the std as well.
    `guidance` (models trained for it): lower = a faithful, softer stain; higher = crisper,
    bolder nuclei; None = the model's default (see `iter_stain`).
    """
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be a callable(done, total) or None, not {progress!r}")
    gen = iter_stain(
        image, model, steps, tile, overlap, device, seed, pixel_size, samples,
        guidance=guidance, **kwargs,
    )  # fmt: skip
    result = drain(gen, None if progress is None else lambda ev: progress(*ev))
    note = (result.info.get("ood") or {}).get("note")
    if note:  # stain() returns no info: the out-of-distribution note becomes a warning
        warnings.warn(note, stacklevel=2)
    return result.mean
