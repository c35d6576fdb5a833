"""Tissue architecture for the simulator: where nuclei sit and how they are shaped.

Scattered, independently placed nuclei teach a model our simulator's nuclei, not nuclei: real
tissue packs them into glands and ducts (a lumen ringed by columnar, polarised, touching nuclei),
dense sheets, streams of spindle nuclei that follow an orientation field, clusters, rosettes,
perivascular cuffs and necrotic cavities. Each family here returns the geometry of its nuclei
(µm, radians) and the few scene elements that come with it (lumens, a vessel); ``simulate.make_scene``
gives every nucleus its optical and DNA properties as for any other nucleus, so labels stay exact
instances (the renderer paints each nucleus with its own id, the nearer one on top where two
overlap).

Two families are never sampled in training (``HELD_OUT_FAMILIES``): the held-out suite
(`evaluate --suite instruments`) scores them to test that the model learned nuclei in
arrangements, not the arrangements it was shown.

Pure numpy/scipy; no torch, Qt or napari.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

__all__ = [
    "FAMILIES",
    "HELD_OUT_FAMILIES",
    "TRAIN_FAMILIES",
    "Arrangement",
    "arrange",
]

#: Every layout family ("scattered" = the independent placement of ``simulate.make_scene``).
FAMILIES = ("scattered", "gland", "sheet", "stream", "cluster", "necrosis", "rosette", "cuff")
#: Families training samples (``simulate.sample_tissue``).
TRAIN_FAMILIES = ("scattered", "gland", "sheet", "stream", "cluster", "necrosis")
#: Families only the held-out suite shows: ring-like rosettes and lymphocyte cuffs around vessels
#: are close enough to glands and clusters that a model of nuclei should read them, and different
#: enough in scale and packing that a model of our layouts would not.
HELD_OUT_FAMILIES = ("rosette", "cuff")

# scene kind codes (simulate.py): GLIA, NEURON, LYMPHOCYTE, ENDOTHELIAL, TUMOUR, MITOTIC; RBC
_GLIA, _LYMPHOCYTE, _TUMOUR = 0, 2, 4
_RBC, _DEBRIS = 0, 3
_VESSEL = 5


@dataclass
class Arrangement:
    """Nuclei of one layout (µm; ``theta`` is the long axis' angle, ``a`` ≥ ``b`` semi-axes),
    with what the layout adds to the scene. ``kind`` −1 = drawn from the preset's mix."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    a: np.ndarray
    b: np.ndarray
    theta: np.ndarray
    lobe: np.ndarray  # multiplier of the outline harmonics (>1: irregular, lobed)
    kind: np.ndarray
    # phase-only ellipses (x, y, a, b, theta, Δn over the section): lumens, necrotic cavities
    regions: list = field(default_factory=list)
    # ellipses (x, y, a, b, theta) where the scattered population is removed
    exclude: list = field(default_factory=list)
    tubes: list = field(default_factory=list)  # scene tube dicts (vessels)
    blobs: list = field(default_factory=list)  # (x, y, z, a, b, c, theta, dn, kind) tuples

    def __len__(self) -> int:
        return len(self.x)


class _Builder:
    """Collects nuclei; rejects a new one that would overlap an existing one by more than
    ``overlap`` (a fraction of the smaller extent along the line joining the centres)."""

    def __init__(self, overlap: float):
        self.rows: list[tuple] = []
        self.overlap = overlap
        self._g = np.zeros((0, 5))  # x, y, a, b, theta

    @staticmethod
    def _extent(a, b, theta, phi):
        """Radius of an ellipse in direction ``phi``."""
        psi = phi - theta
        return a * b / np.sqrt((b * np.cos(psi)) ** 2 + (a * np.sin(psi)) ** 2)

    def fits(self, x, y, a, b, theta) -> bool:
        g = self._g
        if not len(g):
            return True
        dx, dy = g[:, 0] - x, g[:, 1] - y
        d = np.hypot(dx, dy)
        near = d < (g[:, 2] + a)
        if not near.any():
            return True
        phi = np.arctan2(dy[near], dx[near])
        r_new = self._extent(a, b, theta, phi)
        r_old = self._extent(g[near, 2], g[near, 3], g[near, 4], phi + np.pi)
        need = r_new + r_old - self.overlap * np.minimum(r_new, r_old)
        return bool(np.all(d[near] >= need))

    def add(self, x, y, z, a, b, theta, lobe=1.0, kind=-1, check=True) -> bool:
        if check and not self.fits(x, y, a, b, theta):
            return False
        self.rows.append((x, y, z, a, b, theta, lobe, kind))
        self._g = np.vstack([self._g, [x, y, a, b, theta]])
        return True

    def arrangement(self, **extra) -> Arrangement:
        cols = np.asarray(self.rows, float).reshape(-1, 8).T
        x, y, z, a, b, th, lobe, kind = cols
        return Arrangement(x, y, z, a, b, th, lobe, kind.astype(int), **extra)


def _shape(long_um, aspect):
    """Semi-axes (a ≥ b) of a nucleus of long diameter ``long_um`` and ``aspect`` = a/b."""
    a = float(np.clip(long_um / 2, 2.0, 7.5))  # long diameters 4–15 µm
    return a, a / max(aspect, 1.0)


def _lobe(rng, p_lobed=0.25):
    """Outline irregularity: most nuclei smooth-ish, some lobed (tumour, activated cells)."""
    return float(rng.uniform(2.0, 3.5)) if rng.random() < p_lobed else float(rng.uniform(0.7, 1.5))


def _z(rng, depth):
    return float(rng.uniform(-depth, depth))


def _ring(cx, cy, ra, rb, th, offset, step):
    """Points every ``step`` µm along the curve ``offset`` µm outside an ellipse, with the outward
    normal angle at each (the direction a columnar nucleus' long axis points)."""
    t = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    ex, ey = ra * np.cos(t), rb * np.sin(t)
    nx, ny = rb * np.cos(t), ra * np.sin(t)  # outward normal of the ellipse (unnormalised)
    nn = np.hypot(nx, ny)
    nx, ny = nx / nn, ny / nn
    px_, py_ = ex + offset * nx, ey + offset * ny
    c, s = math.cos(th), math.sin(th)
    X = cx + c * px_ - s * py_
    Y = cy + s * px_ + c * py_
    ang = np.arctan2(s * nx + c * ny, c * nx - s * ny)
    seg = np.hypot(np.diff(X, append=X[:1]), np.diff(Y, append=Y[:1]))
    arc = np.concatenate([[0.0], np.cumsum(seg)[:-1]])
    total = float(seg.sum())
    n = max(int(total // step), 3)
    at = (np.arange(n) + 0.5) * (total / n)
    k = np.searchsorted(arc, at).clip(0, len(t) - 1)
    return X[k], Y[k], ang[k]


def _gland(rng, W, H, depth, b: _Builder, ring_like=False) -> dict:
    """Glands and ducts (``ring_like``: rosettes): a lumen lined by 1–3 layers of columnar,
    radially oriented, palisading nuclei."""
    regions, centres = [], []
    long_um = rng.uniform(7.0, 13.0)  # per field: one epithelium
    for _ in range(60):
        if ring_like:
            rl = rng.uniform(2.0, 6.0)
            asp_l = rng.uniform(1.0, 1.3)
            layers = 1
        else:
            rl = rng.uniform(4.0, 28.0)
            asp_l = rng.uniform(1.0, 3.0) if rng.random() < 0.35 else rng.uniform(1.0, 1.5)
            layers = 1 if rng.random() < 0.65 else int(rng.integers(2, 4))
        ra, rb = rl * math.sqrt(asp_l), rl / math.sqrt(asp_l)
        outer = max(ra, rb) + layers * long_um + 3.0
        cx, cy = rng.uniform(-10, W + 10), rng.uniform(-10, H + 10)
        if any(math.hypot(cx - x, cy - y) < outer + o for x, y, o in centres):
            continue
        centres.append((cx, cy, outer))
        th = rng.uniform(0, np.pi)
        apical = rng.uniform(1.0, 5.0)  # apical cytoplasm between lumen and nuclei
        if not ring_like:  # lumen fluid is below the epithelium's refractive index
            regions.append((cx, cy, ra, rb, th, float(rng.uniform(-0.018, -0.006))))
        else:  # a rosette's centre: fibrillary neuropil, slightly denser
            regions.append((cx, cy, ra, rb, th, float(rng.uniform(0.0, 0.006))))
        for layer in range(layers):
            asp = rng.uniform(1.6, 4.0) if not ring_like else rng.uniform(1.3, 2.5)
            a, bb = _shape(long_um * rng.uniform(0.85, 1.1), asp)
            off = apical + a + layer * 2 * a * rng.uniform(0.8, 0.95)
            X, Y, ang = _ring(cx, cy, ra, rb, th, off, 2 * bb * rng.uniform(0.95, 1.3))
            for x, y, t in zip(X, Y, ang):
                jit = rng.normal(0, 0.12 * a)  # palisade: small radial stagger
                b.add(x + jit * math.cos(t), y + jit * math.sin(t), _z(rng, depth),
                      a * rng.uniform(0.85, 1.15), bb * rng.uniform(0.85, 1.15),
                      t + rng.normal(0, 0.12), _lobe(rng, 0.15), -1)  # fmt: skip
    return {"regions": regions}


def _sheet(rng, W, H, depth, b: _Builder, coverage=None) -> dict:
    """A dense sheet: a jittered hexagonal packing with touching and overlapping nuclei, over a
    smooth random part of the field."""
    r0 = rng.uniform(2.5, 6.5)
    spacing = 2 * r0 * rng.uniform(0.8, 1.05)
    mask_field = ndimage.gaussian_filter(rng.standard_normal((32, 32)), 4, mode="wrap")
    cov = rng.uniform(0.5, 1.0) if coverage is None else coverage
    thr = np.quantile(mask_field, 1 - cov)
    rows = int(H / (spacing * 0.866)) + 3
    cols = int(W / spacing) + 3
    for i in range(rows):
        for j in range(cols):
            x = (j + 0.5 * (i % 2)) * spacing - spacing + rng.normal(0, 0.15 * spacing)
            y = i * spacing * 0.866 - spacing + rng.normal(0, 0.15 * spacing)
            mi = int(np.clip(y / max(H, 1) * 32, 0, 31))
            mj = int(np.clip(x / max(W, 1) * 32, 0, 31))
            if mask_field[mi, mj] < thr:
                continue
            asp = rng.uniform(1.0, 2.2)
            a, bb = _shape(2 * r0 * rng.uniform(0.8, 1.25) * math.sqrt(asp), asp)
            b.add(x, y, _z(rng, depth), a, bb, rng.uniform(0, np.pi), _lobe(rng, 0.35), -1)
    return {}


def _orientation_field(rng, W, H):
    """A smooth random angle field over the field (streams bend over ~50–150 µm)."""
    n = 16
    ang0 = rng.uniform(0, np.pi)
    f = ndimage.gaussian_filter(rng.standard_normal((n, n)), rng.uniform(2.0, 4.0), mode="wrap")
    f = f / (f.std() + 1e-9) * rng.uniform(0.2, 0.7)

    def at(x, y):
        i = int(np.clip(y / max(H, 1) * n, 0, n - 1))
        j = int(np.clip(x / max(W, 1) * n, 0, n - 1))
        return ang0 + float(f[i, j])

    return at


def _stream(rng, W, H, depth, b: _Builder) -> dict:
    """Streams of spindle nuclei (stroma, glioma) aligned with a smooth orientation field;
    nuclei follow each other head to tail along streamlines."""
    at = _orientation_field(rng, W, H)
    long_um = rng.uniform(9.0, 15.0)
    asp_hi = rng.uniform(3.0, 5.0)
    gap = rng.uniform(1.5, 4.0)  # between streamlines, × the nuclear width
    n_lines = int(rng.uniform(0.6, 1.2) * W * H / (long_um * 2 * long_um / asp_hi * gap)) // 4
    for _ in range(max(n_lines, 4)):
        x, y = rng.uniform(-10, W + 10), rng.uniform(-10, H + 10)
        for direction in (1, -1):
            px_, py_ = x, y
            for _ in range(40):
                t = at(px_, py_)
                asp = rng.uniform(2.5, asp_hi)
                a, bb = _shape(long_um * rng.uniform(0.8, 1.1), asp)
                if not b.add(px_, py_, _z(rng, depth), a, bb, t + rng.normal(0, 0.08),
                             _lobe(rng, 0.1), -1):  # fmt: skip
                    break
                step = 2 * a * rng.uniform(1.05, 1.6)
                px_ += direction * step * math.cos(t)
                py_ += direction * step * math.sin(t)
                if not (-20 < px_ < W + 20 and -20 < py_ < H + 20):
                    break
    return {}


def _cluster(rng, W, H, depth, b: _Builder) -> dict:
    """Clusters of round-to-oval nuclei (nests, lymphoid aggregates), touching inside a nest."""
    area = W * H
    for _ in range(max(1, rng.poisson(area / 4000))):
        cx, cy = rng.uniform(0, W), rng.uniform(0, H)
        sig = rng.uniform(6.0, 20.0)
        r0 = rng.uniform(2.2, 6.0)
        for _ in range(int(rng.uniform(6, 40))):
            x, y = cx + rng.normal(0, sig), cy + rng.normal(0, sig)
            asp = rng.uniform(1.0, 1.6)
            a, bb = _shape(2 * r0 * rng.uniform(0.85, 1.2) * math.sqrt(asp), asp)
            b.add(x, y, _z(rng, depth), a, bb, rng.uniform(0, np.pi), _lobe(rng, 0.3), -1)
    return {}


def _necrosis(rng, W, H, depth, b: _Builder) -> dict:
    """Necrotic or empty cavities in a dense sheet: no nuclei, a lower refractive index,
    debris and a few pyknotic (small, dense) nuclei."""
    regions, exclude, blobs = [], [], []
    holes = []
    for _ in range(int(rng.integers(1, 3))):
        ha, hb = 0.45 * max(W, 30), 0.35 * max(H, 30)  # small fields: smaller cavities
        ra, rb = rng.uniform(min(15, ha), ha), rng.uniform(min(15, hb), hb)
        holes.append((rng.uniform(0, W), rng.uniform(0, H), ra, rb, rng.uniform(0, np.pi)))
    sub = _Builder(b.overlap)
    _sheet(rng, W, H, depth, sub, coverage=1.0)
    for row in sub.rows:
        if not any(inside_ellipse(row[0], row[1], *h) for h in holes):
            b.add(*row, check=False)
    for cx, cy, ra, rb, th in holes:
        regions.append((cx, cy, ra, rb, th, float(rng.uniform(-0.012, -0.003))))
        exclude.append((cx, cy, ra, rb, th))
        for _ in range(int(ra * rb / 40)):
            x, y = _point_in(rng, cx, cy, ra, rb, th)
            r = rng.uniform(0.8, 3.0)
            blobs.append((x, y, rng.uniform(-2, 2), r, r * rng.uniform(0.4, 1.0), r * 0.6,
                          rng.uniform(0, np.pi), float(rng.uniform(-0.01, 0.03)), _DEBRIS))  # fmt: skip
        for _ in range(int(ra * rb / 400)):
            x, y = _point_in(rng, cx, cy, ra, rb, th)
            r = rng.uniform(1.2, 2.2)
            b.add(x, y, _z(rng, depth), r, r * rng.uniform(0.8, 1.0), 0.0, 0.5, -1)
    return {"regions": regions, "exclude": exclude, "blobs": blobs}


def _cuff(rng, W, H, depth, b: _Builder) -> dict:
    """Perivascular cuffs: a vessel with red cells, wrapped in 2–4 layers of small round
    lymphocyte nuclei."""
    tubes, blobs = [], []
    for _ in range(int(rng.integers(1, 3))):
        start = np.array([rng.uniform(0, W), rng.uniform(0, H)])
        ang = rng.uniform(0, 2 * np.pi)
        n = int(max(W, H) * 1.5)
        turns = ndimage.gaussian_filter1d(np.cumsum(rng.normal(0, 0.02, n)), 3.0)
        pts = start + np.cumsum(np.stack([np.cos(ang + turns), np.sin(ang + turns)], 1), 0)
        pts = pts - pts[n // 2] + start  # centred on the start point
        rad = rng.uniform(4.0, 10.0)
        tubes.append({"points": pts, "z": np.zeros(len(pts)), "radius": rad, "dn": -0.012,
                      "kind": _VESSEL})  # fmt: skip
        for i in range(0, len(pts) - 1, int(rng.integers(6, 14))):
            rr = rng.uniform(3.4, 4.0)
            blobs.append((pts[i, 0] + rng.normal(0, rad / 3), pts[i, 1] + rng.normal(0, rad / 3),
                          0.0, rr, rr * rng.uniform(0.4, 1.0), 1.0, rng.uniform(0, np.pi),
                          float(rng.uniform(0.035, 0.06)), _RBC))  # fmt: skip
        layers = rng.uniform(2, 4)
        band = rad + 1.0 + layers * 6.0
        for _ in range(int(len(pts) * layers * 2.5)):
            k = int(rng.integers(len(pts)))
            t = rng.uniform(0, 2 * np.pi)
            d = rng.uniform(rad + 2.5, band)
            r = rng.uniform(2.2, 3.3)
            b.add(pts[k, 0] + d * math.cos(t), pts[k, 1] + d * math.sin(t), _z(rng, depth),
                  r * rng.uniform(1.0, 1.1), r, rng.uniform(0, np.pi), _lobe(rng, 0.05),
                  _LYMPHOCYTE)  # fmt: skip
    return {"tubes": tubes, "blobs": blobs}


def inside_ellipse(x, y, cx, cy, a, b, th):
    """Whether (x, y) (scalars or arrays) lies inside the ellipse centred (cx, cy), semi-axes
    a, b, rotated by th."""
    c, s = math.cos(th), math.sin(th)
    u = ((x - cx) * c + (y - cy) * s) / a
    v = (-(x - cx) * s + (y - cy) * c) / b
    return u * u + v * v < 1.0


def _point_in(rng, cx, cy, a, b, th):
    r, t = math.sqrt(rng.uniform(0, 1)), rng.uniform(0, 2 * np.pi)
    u, v = a * r * math.cos(t), b * r * math.sin(t)
    c, s = math.cos(th), math.sin(th)
    return cx + c * u - s * v, cy + s * u + c * v


_BUILDERS = {
    "gland": _gland,
    "sheet": _sheet,
    "stream": _stream,
    "cluster": _cluster,
    "necrosis": _necrosis,
    "rosette": lambda rng, W, H, depth, b: _gland(rng, W, H, depth, b, ring_like=True),
    "cuff": _cuff,
}


def arrange(family: str, rng: np.random.Generator, width_um: float, height_um: float,
            depth_um: float, size_scale: float = 1.0) -> Arrangement:  # fmt: skip
    """The nuclei of one ``family`` over a ``width_um`` × ``height_um`` field, centres within
    ±``depth_um`` of focus; ``size_scale`` multiplies every nuclear size. Touching nuclei overlap
    by at most a quarter of the smaller radius (sheets and necrosis: a third)."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown tissue family {family!r}; choose one of: {', '.join(FAMILIES)}")
    b = _Builder(overlap=0.33 if family in ("sheet", "necrosis") else 0.25)
    extra = _BUILDERS[family](rng, float(width_um), float(height_um), float(depth_um), b)
    arr = b.arrangement(**extra)
    if size_scale != 1.0:
        arr.a = arr.a * size_scale
        arr.b = arr.b * size_scale
    return arr
