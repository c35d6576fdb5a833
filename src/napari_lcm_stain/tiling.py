"""Tiled prediction: tile grid, smooth overlap blending, one shared noise canvas, a dask twin.

Why a tiler of our own: seams are the first thing a biologist sees in a stained mosaic, and a
stochastic (latent-noise) model needs something generic tilers lack: the noise must be drawn once
over the whole canvas and cropped per tile, so two tiles that overlap see the same noise there and
agree. The blending is a separable Hann taper over the overlap, normalised by the summed weights.

Layout (per axis): the image is reflect-padded at the end to a multiple of `predictor.multiple`;
tiles have equal sides (a multiple of `multiple`), start at multiples of `multiple` (so latent
noise crops align with the latent grid) and the last tile ends exactly at the padded edge.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from scipy.signal import windows

#: Minimum blending weight: every canvas pixel keeps a positive weight, even where a taper ends.
WINDOW_FLOOR = 1e-3
#: Fraction of the overlap, at each tile edge, that gets (almost) no weight: convolutions see zero
#: padding there, so those pixels are the least trustworthy. The Hann ramp spans the middle part.
EDGE_SKIP = 0.25


class Cancelled(Exception):
    """Raised between tile batches when `cancel_check()` returns True."""


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def hann_ramp(length: int) -> np.ndarray:
    """Rising half-Hann ramp of `length` samples, sin²(π(i+½)/2L): ramp + ramp[::-1] == 1.

    Taken from `scipy.signal.windows.hann(4L+1)` at odd indices, so it never reaches 0.
    """
    if length <= 0:
        return np.ones(0, np.float32)
    return windows.hann(4 * length + 1, sym=True)[1 : 2 * length : 2].astype(np.float32)


def _fit_axis(p: int, t_max: int, overlap: int, m: int) -> tuple[int, tuple[int, ...]]:
    """Fewest tiles of side <= t_max covering p with overlaps >= `overlap`, then the smallest side.

    Work is proportional to (n·t)², so after fixing the tile count n we shrink the tile to the
    least multiple of m whose n tiles, evenly spread at multiples of m, still overlap enough.
    """
    g_max = (t_max - overlap) // m  # largest stride, in units of m
    if g_max < 1:
        raise ValueError(f"overlap {overlap} leaves no stride in a {t_max}-px tile")
    n = 1 + -(-(p - t_max) // (g_max * m))  # tiles needed at the largest tile
    for t in range(_ceil_to(-(-(p + (n - 1) * overlap) // n), m), t_max + m, m):
        span = (p - t) // m  # last start, in units of m
        g = (t - overlap) // m
        if g >= 1 and (n - 1) * g >= span:
            break
    span = (p - t) // m
    starts = tuple(m * ((k * span) // (n - 1)) for k in range(n))
    return t, starts


@dataclass(frozen=True)
class TileGrid:
    """Tile layout over a padded canvas; windows and weight sums are separable per axis."""

    shape: tuple[int, int]  # original (H, W)
    padded: tuple[int, int]  # canvas (Hp, Wp), multiples of `multiple`
    tile: tuple[int, int]  # tile sides
    taper: tuple[int, int]  # taper length per axis (the nominal overlap between neighbours)
    starts: tuple[tuple[int, ...], tuple[int, ...]]  # tile starts per axis
    multiple: int
    context: int = 0  # px at each inner tile edge that only serve as model input (weight ~0)

    @property
    def n_tiles(self) -> int:
        return len(self.starts[0]) * len(self.starts[1])

    def tiles(self) -> list[tuple[int, int, int, int]]:
        """Row-major list of (i, j, y0, x0)."""
        return [
            (i, j, y0, x0)
            for i, y0 in enumerate(self.starts[0])
            for j, x0 in enumerate(self.starts[1])
        ]

    def axis_window(self, axis: int, k: int) -> np.ndarray:
        """1-D blending window of tile k along `axis`: tapered only on sides facing a neighbour."""
        t, n, length = self.tile[axis], self.padded[axis], self.taper[axis]
        s = self.starts[axis][k]
        w = np.ones(t, np.float32)
        length = min(length, t)
        if length:
            c = min(self.context, length // 2)
            m = c + int((length - 2 * c) * EDGE_SKIP)
            side = np.concatenate([np.zeros(m, np.float32), hann_ramp(length - 2 * m)])
            side = np.concatenate([side, np.ones(length - side.size, np.float32)])
            if s > 0:
                w[:length] = np.minimum(w[:length], side)
            if s + t < n:
                w[t - length :] = np.minimum(w[t - length :], side[::-1])
        return np.maximum(w, WINDOW_FLOOR)

    @cached_property
    def windows(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return tuple([self.axis_window(a, k) for k in range(len(self.starts[a]))] for a in (0, 1))

    def tile_weight(self, i: int, j: int) -> np.ndarray:
        wy, wx = self.windows
        return wy[i][:, None] * wx[j][None, :]

    @cached_property
    def weight_sums(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-axis sums of windows; the 2-D sum of weights is their outer product."""
        out = []
        for a in (0, 1):
            s = np.zeros(self.padded[a], np.float32)
            for k, start in enumerate(self.starts[a]):
                s[start : start + self.tile[a]] += self.windows[a][k]
            out.append(s)
        return tuple(out)


def make_grid(
    shape, multiple: int, tile: int = 512, overlap: int = 32, context: int = 0
) -> TileGrid:
    """Tile grid for a 2-D image of `shape`; tile rounded down to a multiple of `multiple`.

    `tile` is the largest side: the grid uses the fewest tiles that cover the image with overlaps
    >= `overlap`, then the smallest side that still does (less padding, less work), with starts
    spread evenly at multiples of `multiple`. An image narrower than a tile along one axis gets
    tiles longer than `tile` along the other (same tile area), so a 1×100000 strip takes a few
    calls instead of hundreds.

    `context` (px, usually the model's receptive-field radius) is added around each tile as
    input-only margin: tiles grow by 2·context (up to `tile + 2·context`), neighbours overlap by
    `overlap + 2·context`, and the outer `context` px of every inner tile edge get ~no weight,
    so each kept pixel was predicted with at least that much real image around it.
    """
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 1:
        raise ValueError(f"tile must be a positive integer (pixels), got {tile!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)) or overlap < 0:
        raise ValueError(f"overlap must be an integer >= 0 (pixels), got {overlap!r}")
    if isinstance(context, bool) or not isinstance(context, (int, np.integer)) or context < 0:
        raise ValueError(f"context must be an integer >= 0 (pixels), got {context!r}")
    context = int(context)
    multiple = int(multiple)
    if multiple < 1:
        raise ValueError(f"predictor.multiple must be >= 1, got {multiple}")
    h, w = (int(s) for s in shape)
    if h < 1 or w < 1:
        raise ValueError(f"cannot tile an empty image of shape {shape}")
    core = max(multiple, (int(tile) // multiple) * multiple)
    t_req = core + _ceil_to(2 * context, multiple)
    ov = int(overlap) + 2 * context
    if (t_req - ov) // multiple < 1 and any(_ceil_to(n, multiple) > t_req for n in (h, w)):
        raise ValueError(
            f"overlap {overlap} leaves no stride in a {core}-px tile: use tile >= overlap + "
            f"{multiple} (e.g. --tile {_ceil_to(int(overlap) + multiple, multiple)}) "
            "or a smaller overlap"
        )
    pads = [_ceil_to(n, multiple) for n in (h, w)]
    # a thin strip (one tile across) gets longer tiles along it, same pixel budget per tile
    sides = [min(t_req, p) for p in pads]
    for a in (0, 1):
        if pads[1 - a] <= t_req and sides[1 - a] < t_req:
            long = (t_req * t_req // sides[1 - a]) // multiple * multiple
            sides[a] = min(pads[a], max(sides[a], long))
    padded, tiles, tapers, starts = [], [], [], []
    for p, t in zip(pads, sides):
        if t < p:
            t, st = _fit_axis(p, t, ov, multiple)
            taper = t - max(b - a for a, b in zip(st[:-1], st[1:]))
        else:
            st, taper = (0,), 0
        padded.append(p)
        tiles.append(t)
        tapers.append(taper)
        starts.append(st)
    return TileGrid(
        (h, w), tuple(padded), tuple(tiles), tuple(tapers), tuple(starts), multiple, context
    )


def model_context(predictor) -> int:
    """Input-only margin (px) a predictor needs around each tile: its `context`, else half its
    `receptive_field` (both optional attributes; 0 if absent)."""
    c = getattr(predictor, "context", None)
    if c is None:
        c = int(getattr(predictor, "receptive_field", 0) or 0) // 2
    return max(0, int(c))


def measure_context(
    predictor, image: np.ndarray, tol: float = 0.005, seed: int = 0, step: int = 8
) -> int:
    """Smallest margin d (px, a multiple of `step`) such that predicting a crop of `image`
    differs from predicting the whole image by <= `tol` everywhere >= d px from the crop's cut
    edges. Store 2·d as the checkpoint's `receptive_field` so the engine adds that context.

    `image` is a normalised 2-D plane, ideally >= 512 px, with a multiple-aligned size.
    """
    image = np.asarray(image, dtype=np.float32)
    m = int(predictor.multiple)
    h, w = (s // m * m for s in image.shape)
    if min(h, w) < 2 * m:
        raise ValueError(f"measure_context needs an image of at least {2 * m} px per side")
    image = image[:h, :w]
    noise = make_noise_canvas(predictor, (h, w), seed)

    def run(x, nz):
        return _run_batch(predictor, x[None], None if nz is None else [nz])[0]

    whole = run(image, noise)
    ch, cw = h // 2 // m * m, w // 2 // m * m
    crop = run(np.ascontiguousarray(image[:ch, :cw]), None if noise is None else _noise_crop(
        noise, h // noise.shape[-2], 0, 0, ch, cw))  # fmt: skip
    err = np.abs(crop - whole[:ch, :cw])
    dist = np.minimum((ch - 1 - np.arange(ch))[:, None], (cw - 1 - np.arange(cw))[None, :])
    for d in range(0, min(ch, cw), step):
        if float(err[dist >= d].max(initial=0.0)) <= tol:
            return d
    return min(ch, cw)


def reflect_indices(n: int, start: int, length: int) -> np.ndarray:
    """Source indices of canvas positions start..start+length for an axis of n pixels.

    Mirror without repeating the edge pixel (numpy's 'reflect'); any pad length, n == 1 included.
    """
    return _mirror(np.arange(start, start + length), n)


def _mirror(idx: np.ndarray, n: int) -> np.ndarray:
    """Indices (any, negative included) mirrored into 0..n-1 without repeating the edge pixel
    (numpy's 'reflect', scipy.ndimage's 'mirror')."""
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    r = idx % period
    return np.where(r >= n, period - r, r)


# --------------------------------------------------------------------------------------------
# streamed resampling: a pixel-size rescale computed per tile and per band of rows, so neither
# the resampled plane nor the model's output at the working size is ever held whole

#: Pixels read or written at once when resampling (as float64: 0.5 MB).
RESAMPLE_CHUNK = 1 << 16


def resample_operator(n_in: int, n_out: int):
    """(n_out × n_in) sparse matrix of `skimage.transform.resize` along one axis (order 1,
    mode 'reflect', anti-aliased when shrinking, as `engine._resize`): a Gaussian of σ = (f−1)/2
    (f = n_in/n_out > 1, truncated at 4σ) then linear interpolation at the grid-mode
    coordinates (j + ½)·f − ½ of `scipy.ndimage.zoom`, both mirrored at the edges. A plane
    resamples as Ay @ plane @ Axᵀ, so any block of the result needs only the source block
    under its rows and columns. Built row by row (the Gaussian folded into the two
    interpolation taps), so its size grows with n_out only."""
    from scipy import sparse

    n_in, n_out = int(n_in), int(n_out)
    f = n_in / n_out
    x = (np.arange(n_out) + 0.5) * f - 0.5
    i0 = np.floor(x).astype(np.int64)
    t = (x - i0)[:, None]
    g = np.ones(1)
    if f > 1:  # the Gaussian of scipy.ndimage.gaussian_filter1d (truncate=4.0)
        sigma = (f - 1) / 2
        r = int(4.0 * sigma + 0.5)
        g = np.exp(-0.5 * np.arange(-r, r + 1) ** 2 / sigma**2)
        g /= g.sum()
    r = g.size // 2
    lower, upper = np.append(g, 0.0), np.insert(g, 0, 0.0)  # g[k] and g[k-1], k = -r..r+1
    vals = (1.0 - t) * lower[None, :] + t * upper[None, :]
    cols = _mirror(i0[:, None] + np.arange(-r, r + 2)[None, :], n_in)
    rows = np.repeat(np.arange(n_out), 2 * r + 2)
    op = sparse.csr_matrix((vals.ravel(), (rows, cols.ravel())), shape=(n_out, n_in))
    op.sum_duplicates()
    op.eliminate_zeros()  # a weight of exactly 0 must not make a row read one more pixel
    return op


def _support(op) -> tuple[np.ndarray, np.ndarray]:
    """First and one-past-last source index each row of a CSR operator reads."""
    starts = op.indptr[:-1]
    return np.minimum.reduceat(op.indices, starts), np.maximum.reduceat(op.indices, starts) + 1


def _resample_block(source, ay, ax, out=None, clip: tuple[float, float] | None = None):
    """ay @ source @ axᵀ (float32, into `out` if given, clipped to `clip`), reading only the
    source rows and columns the operators touch, a few output rows at a time: each step reads
    and writes at most about `RESAMPLE_CHUNK` pixels."""
    if out is None:
        out = np.empty((ay.shape[0], ax.shape[0]), np.float32)
    if not ay.shape[0] or not ax.shape[0]:
        return out
    lo_x, hi_x = _support(ax)
    c0, c1 = int(lo_x.min()), int(hi_x.max())
    axt = ax[:, c0:c1].T.tocsr()
    lo, hi = _support(ay)
    span = int((hi - lo).max()) + max(1, -(-ay.shape[1] // max(1, ay.shape[0])))
    step = max(1, RESAMPLE_CHUNK // max((c1 - c0) * span, ax.shape[0]))
    for r0 in range(0, ay.shape[0], step):
        r1 = min(r0 + step, ay.shape[0])
        s0, s1 = int(lo[r0:r1].min()), int(hi[r0:r1].max())
        block = np.asarray(source[s0:s1, c0:c1], dtype=np.float64)
        y = (ay[r0:r1, s0:s1] @ block) @ axt
        if clip is not None:
            np.clip(y, clip[0], clip[1], out=y)
        out[r0:r1, :] = y
    return out


def _axis_index(key, n: int) -> np.ndarray:
    if isinstance(key, slice):
        return np.arange(n)[key]
    idx = np.asarray(key).ravel()
    if idx.dtype.kind not in "iu":
        raise TypeError(f"resampled planes take slices or integer index arrays, not {key!r}")
    return np.where(idx < 0, idx + n, idx)


class ResampledPlane:
    """A 2-D plane resampled to `shape` (as `engine._resize`), computed only where indexed:
    `plane[y0:y1, x0:x1]`, `plane[np.ix_(iy, ix)]` and strided views read just the source pixels
    under them. The tiler takes it as its input plane, so a pixel-size rescale streams tile by
    tile instead of holding the whole resampled plane (up to 64× the input's pixels)."""

    def __init__(self, source, shape: tuple[int, int]):
        self.source = source
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(np.float32)
        self.ndim = 2
        self.ops = tuple(resample_operator(n, m) for n, m in zip(source.shape, self.shape))

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if key and key[0] is Ellipsis:
            key = key[1:]
        key = key + (slice(None),) * (2 - len(key))
        iy, ix = (_axis_index(k, n) for k, n in zip(key, self.shape))
        return _resample_block(self.source, self.ops[0][iy], self.ops[1][ix])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self[:, :]
        return a if dtype is None else a.astype(dtype, copy=False)


class _RowWindow:
    """`target` seen from row `y0` on: `window[r0:r1, :] = rows` writes target rows y0+r0.."""

    def __init__(self, target, y0: int):
        self.target, self.y0 = target, y0

    def __setitem__(self, key, value) -> None:
        rows, cols = key
        self.target[self.y0 + rows.start : self.y0 + rows.stop, cols] = value


class ResampleSink:
    """Output that resamples as it fills: takes full-width row blocks of an `in_shape` plane top
    to bottom (as `iter_predict_tiled` writes its bands), and writes each row of the plane
    resampled to `target`'s shape (or `shape`), clipped to `clip`, into `target` as soon as the
    rows it reads have arrived. Holds only the rows some output row still needs."""

    def __init__(self, in_shape, target, clip: tuple[float, float] | None = None, shape=None):
        self.in_shape = (int(in_shape[0]), int(in_shape[1]))
        # `shape`: the output's, for targets without one (a write-through view of a zarr plane)
        self.shape = tuple(int(s) for s in (target.shape if shape is None else shape))
        self.target, self.clip = target, clip
        self.ay = resample_operator(self.in_shape[0], self.shape[0])
        self.ax = resample_operator(self.in_shape[1], self.shape[1])
        lo, hi = _support(self.ay)
        self.ready = np.maximum.accumulate(hi)  # rows received before output row j can go
        self.keep = np.minimum.accumulate(lo[::-1])[::-1]  # first row rows j.. still read
        self.buf = np.zeros((0, self.in_shape[1]), np.float32)
        self.buf_y0 = self.received = self.done = 0

    def __setitem__(self, key, block) -> None:
        rows, cols = key
        if rows.start != self.received or cols.start not in (0, None) or (
            (cols.stop or self.in_shape[1]) != self.in_shape[1]
        ):  # fmt: skip
            raise ValueError("ResampleSink takes full-width row blocks in order, top to bottom")
        self.buf = np.concatenate([self.buf, np.asarray(block, np.float32)])
        self.received = rows.stop
        j1 = int(np.searchsorted(self.ready, self.received, side="right"))
        if j1 > self.done:
            ay = self.ay[self.done : j1, self.buf_y0 : self.received]
            window = _RowWindow(self.target, self.done)
            _resample_block(self.buf, ay, self.ax, out=window, clip=self.clip)
            self.done = j1
        first = int(self.keep[self.done]) if self.done < self.shape[0] else self.received
        if first > self.buf_y0:
            self.buf = self.buf[first - self.buf_y0 :].copy()
            self.buf_y0 = first


def extract_tile(image: np.ndarray, y0: int, x0: int, th: int, tw: int) -> np.ndarray:
    """One tile of the reflect-padded canvas, without building the padded canvas."""
    h, w = image.shape
    if y0 + th <= h and x0 + tw <= w:
        return image[y0 : y0 + th, x0 : x0 + tw]
    iy = reflect_indices(h, y0, th)
    ix = reflect_indices(w, x0, tw)
    return image[np.ix_(iy, ix)]


def make_noise_canvas(predictor, padded: tuple[int, int], seed: int) -> torch.Tensor | None:
    """Latent noise for the whole padded canvas, drawn once from `seed` (None for Pix2Pix)."""
    shape = predictor.noise_shape(int(padded[0]), int(padded[1]))
    if shape is None:
        return None
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(tuple(int(s) for s in shape), generator=g, dtype=torch.float32)


def _noise_factor(noise: torch.Tensor | np.ndarray | None, grid: TileGrid) -> int:
    if noise is None:
        return 0
    hp, wp = grid.padded
    nh, nw = noise.shape[-2:]
    if hp % nh or wp % nw or hp // nh != wp // nw:
        raise ValueError(
            f"noise canvas {tuple(noise.shape)} does not match the padded canvas {grid.padded}: "
            "build it with make_noise_canvas(predictor, grid.padded, seed)"
        )
    f = hp // nh
    if grid.multiple % f:
        raise ValueError(
            f"predictor.multiple {grid.multiple} is not a multiple of latent factor {f}"
        )
    return f


def _noise_crop(noise, f: int, y0: int, x0: int, th: int, tw: int):
    return noise[..., y0 // f : (y0 + th) // f, x0 // f : (x0 + tw) // f]


def _run_batch(predictor, tiles: np.ndarray, noises) -> np.ndarray:
    """Call the predictor on a (B, h, w) stack; returns (B, h, w) float32 numpy."""
    x = torch.from_numpy(np.ascontiguousarray(tiles, dtype=np.float32)[:, None])
    nz = None
    if noises is not None:
        nz = torch.stack([torch.as_tensor(n) for n in noises])
    with torch.inference_mode():
        y = predictor(x, nz)
    y = torch.as_tensor(y)
    if tuple(y.shape) != tuple(x.shape):
        raise RuntimeError(f"predictor returned shape {tuple(y.shape)} for input {tuple(x.shape)}")
    if not bool(torch.isfinite(y).all()):  # clipping keeps NaN: never pass it off as a stain
        raise ValueError(
            "the model returned NaN/Inf pixels: the input has values it cannot handle (e.g. "
            "beyond ±1e38, or overflowing half precision on a GPU); rescale the image to its "
            "usual phase range or use device='cpu'"
        )
    return y[:, 0].detach().float().cpu().numpy()


def _weighted_batch(predictor, grid: TileGrid, items, tiles, noises) -> list[np.ndarray]:
    preds = _run_batch(predictor, tiles, noises)
    return [p * grid.tile_weight(i, j) for (i, j, _y, _x), p in zip(items, preds)]


def _tile_batch(image, chunk, th, tw, transform) -> np.ndarray:
    tiles = []
    for _i, _j, y0, x0 in chunk:
        t = extract_tile(image, y0, x0, th, tw)  # the input's dtype: `transform` casts
        tiles.append(np.asarray(transform(t) if transform is not None else t, dtype=np.float32))
    return np.stack(tiles)


def iter_predict_tiled(
    image: np.ndarray,
    predictor,
    tile: int = 512,
    overlap: int = 32,
    noise_canvas: torch.Tensor | None = None,
    batch: int = 4,
    out=None,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    clip: tuple[float, float] | None = None,
    context: int = 0,
) -> Iterator[tuple[int, int]]:
    """Generator form of `predict_tiled`: yields (tiles done, tiles total); returns the (H, W) map.

    Memory stays at one band of tile rows: weighted tiles accumulate in a (tile × width) buffer,
    and rows that no later tile touches are normalised and written to `out` (numpy, memmap,
    or anything accepting `out[r0:r1, c0:c1] = block`) as soon as a new tile row starts.
    `transform` (e.g. `predictor.normalize`) is applied per tile, so a raw plane never has to
    be normalised as a whole.
    """
    image = (
        image if hasattr(image, "shape") and hasattr(image, "__getitem__") else np.asarray(image)
    )
    if len(image.shape) != 2:
        raise ValueError(f"predict_tiled needs a 2-D plane, got shape {tuple(image.shape)}")
    batch = max(1, int(batch))
    grid = make_grid(image.shape, predictor.multiple, tile, overlap, context)
    f = _noise_factor(noise_canvas, grid)
    th, tw = grid.tile
    h, w = grid.shape
    sy, sx = grid.weight_sums
    res = out if out is not None else np.empty((h, w), np.float32)
    band = np.zeros((th, grid.padded[1]), np.float32)
    band_y0 = 0

    def emit(y_end: int) -> None:  # rows [band_y0, y_end) are final
        r1 = min(y_end, h)
        if r1 <= band_y0:
            return
        block = band[: r1 - band_y0, :w] / sy[band_y0:r1, None]
        block /= sx[None, :w]
        if clip is not None:
            np.clip(block, clip[0], clip[1], out=block)
        res[band_y0:r1, :w] = block

    items = grid.tiles()
    total = len(items)
    done = 0
    for b0 in range(0, total, batch):
        chunk = items[b0 : b0 + batch]
        tiles = _tile_batch(image, chunk, th, tw, transform)
        noises = None
        if noise_canvas is not None:
            noises = [_noise_crop(noise_canvas, f, y0, x0, th, tw) for _i, _j, y0, x0 in chunk]
        weighted = _weighted_batch(predictor, grid, chunk, tiles, noises)
        for (_i, _j, y0, x0), wp in zip(chunk, weighted):
            if y0 != band_y0:  # a new tile row: rows above it are complete
                emit(y0)
                shift = y0 - band_y0
                band[: th - shift] = band[shift:]
                band[th - shift :] = 0.0
                band_y0 = y0
            band[:, x0 : x0 + tw] += wp
        done += len(chunk)
        yield done, total
    emit(band_y0 + th)
    return res


def predict_tiled(
    image2d_normalized: np.ndarray,
    predictor,
    tile: int = 512,
    overlap: int = 32,
    noise_canvas: torch.Tensor | None = None,
    batch: int = 4,
    progress_cb: Callable[[int, int], None] | None = None,
    cancel_check: Callable[[], bool] | None = None,
    out=None,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    clip: tuple[float, float] | None = None,
    context: int = 0,
) -> np.ndarray:
    """Blend the predictor's output over overlapping tiles of one normalised 2-D plane.

    `noise_canvas` comes from `make_noise_canvas(predictor, make_grid(...).padded, seed)`.
    Raises `Cancelled` if `cancel_check()` turns True between batches.
    """
    gen = iter_predict_tiled(
        image2d_normalized,
        predictor,
        tile,
        overlap,
        noise_canvas,
        batch,
        out,
        transform,
        clip,
        context,
    )
    while True:
        if cancel_check is not None and cancel_check():
            gen.close()
            raise Cancelled("tiled prediction cancelled")
        try:
            done, total = next(gen)
        except StopIteration as stop:
            return stop.value
        if progress_cb is not None:
            progress_cb(done, total)


# --------------------------------------------------------------------------------------------
# dask graph: the same computation, one task per tile batch and one per output chunk


_WORKER_PREDICTORS: dict[str, object] = {}


def _worker_predictor(predictor, loader):
    """The predictor object, or one built once per worker process from a picklable `loader`."""
    if loader is None:
        return predictor
    from dask.base import tokenize

    key = getattr(loader, "cache_key", None) or tokenize(loader)
    if key not in _WORKER_PREDICTORS:
        _WORKER_PREDICTORS[key] = loader()
    return _WORKER_PREDICTORS[key]


def _dask_batch(crops, index_maps, noises, predictor, loader, grid, items, normalize):
    pred = _worker_predictor(predictor, loader)
    tiles = []
    for c, (iy, ix) in zip(crops, index_maps):
        t = np.asarray(c)[np.ix_(iy, ix)]  # the input's dtype: normalize casts
        if isinstance(normalize, dict):  # the whole plane's statistics (engine.norm_stats)
            t = pred.normalize(t, normalize)
        elif normalize:
            t = pred.normalize(t)
        tiles.append(np.asarray(t, dtype=np.float32))
    return _weighted_batch(pred, grid, items, np.stack(tiles), noises)


def _dask_assemble(grid, y_seg, x_seg, contribs, clip):
    """Sum the weighted tiles touching one output chunk (row-major tile order, as locally)."""
    (ya, yb), (xa, xb) = y_seg, x_seg
    th, tw = grid.tile
    acc = np.zeros((yb - ya, xb - xa), np.float32)
    for wp, y0, x0 in contribs:
        r0, r1 = max(ya, y0), min(yb, y0 + th)
        c0, c1 = max(xa, x0), min(xb, x0 + tw)
        acc[r0 - ya : r1 - ya, c0 - xa : c1 - xa] += wp[r0 - y0 : r1 - y0, c0 - x0 : c1 - x0]
    sy, sx = grid.weight_sums
    acc /= sy[ya:yb, None]
    acc /= sx[None, xa:xb]
    if clip is not None:
        np.clip(acc, clip[0], clip[1], out=acc)
    return acc


def _segments(starts: tuple[int, ...], t: int, n: int, limit: int) -> list[tuple[int, int]]:
    """Partition [0, limit) at the middle of each overlap (limit = original size <= n)."""
    cuts = [0] + [(starts[k - 1] + t + starts[k]) // 2 for k in range(1, len(starts))] + [n]
    segs = [(a, min(b, limit)) for a, b in zip(cuts[:-1], cuts[1:]) if a < limit]
    return segs


def predict_tiled_dask(
    image2d_normalized,
    predictor,
    tile: int = 512,
    overlap: int = 32,
    noise_canvas: torch.Tensor | None = None,
    batch: int = 4,
    loader: Callable[[], object] | None = None,
    normalize: bool | dict = False,
    clip: tuple[float, float] | None = None,
    context: int = 0,
):
    """`predict_tiled` as a lazy dask array (for `dask.distributed`; same tiles, same sums).

    `predictor` gives the grid (multiple); with `loader` (a picklable zero-argument callable, e.g.
    `functools.partial(sampling.load_predictor, "lcm", 1, "cpu")`) each worker builds its own
    predictor once instead of receiving a pickled model in the graph. `normalize=True` applies
    `predictor.normalize` per tile on the workers (pass the raw plane); a dict passes the whole
    plane's statistics (`predictor.norm_stats`) with it; `clip` as in predict_tiled.
    """
    import dask
    import dask.array as da

    img = image2d_normalized
    if not isinstance(img, da.Array):
        img = np.asarray(img)
    if img.ndim != 2:
        raise ValueError(f"predict_tiled_dask needs a 2-D plane, got shape {img.shape}")
    grid = make_grid(img.shape, predictor.multiple, tile, overlap, context)
    if not isinstance(img, da.Array):
        img = da.from_array(img, chunks=grid.tile)
    f = _noise_factor(noise_canvas, grid)
    noise_np = None if noise_canvas is None else np.asarray(noise_canvas, dtype=np.float32)
    h, w = grid.shape
    th, tw = grid.tile
    graph_pred = None if loader is not None else predictor
    items = grid.tiles()
    tile_results = {}
    for b0 in range(0, len(items), max(1, int(batch))):
        chunk = items[b0 : b0 + max(1, int(batch))]
        crops, maps, noises = [], [], []
        for _i, _j, y0, x0 in chunk:
            iy, ix = reflect_indices(h, y0, th), reflect_indices(w, x0, tw)
            r0, r1, c0, c1 = iy.min(), iy.max() + 1, ix.min(), ix.max() + 1
            crops.append(img[r0:r1, c0:c1])
            maps.append((iy - r0, ix - c0))
            if noise_np is not None:
                noises.append(_noise_crop(noise_np, f, y0, x0, th, tw).copy())
        res = dask.delayed(_dask_batch)(
            crops,
            maps,
            noises if noise_np is not None else None,
            graph_pred,
            loader,
            grid,
            chunk,
            normalize,
        )
        for k, (i, j, y0, x0) in enumerate(chunk):
            tile_results[(i, j)] = (dask.delayed(operator.getitem, pure=True)(res, k), y0, x0)
    ysegs = _segments(grid.starts[0], th, grid.padded[0], h)
    xsegs = _segments(grid.starts[1], tw, grid.padded[1], w)
    rows = []
    for ys in ysegs:
        row = []
        for xs in xsegs:
            contribs = [
                tile_results[(i, j)]
                for i, j, y0, x0 in items
                if y0 < ys[1] and y0 + th > ys[0] and x0 < xs[1] and x0 + tw > xs[0]
            ]
            blk = dask.delayed(_dask_assemble)(grid, ys, xs, contribs, clip)
            row.append(da.from_delayed(blk, (ys[1] - ys[0], xs[1] - xs[0]), dtype=np.float32))
        rows.append(row)
    return da.block(rows)
