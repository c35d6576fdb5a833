"""A folder of the lab's own qOBM/DAPI pairs -> training data at the model's pixel size.

Layout (either):
- by name: ``NAME_qobm.ext`` with ``NAME_dapi.ext`` (ext: .tif, .tiff, .ome.tif, .ome.tiff, .zarr);
  other files (``*_nuclei.ome.tif``, ``*_meta.json`` as `lcm-stain simulate` writes) are skipped;
- ``pairs.csv`` with columns ``qobm,dapi[,pixel_size]`` (paths relative to the CSV's folder).

2-D images and stacks (every Z/T plane is one sample). The pixel size comes from the files'
metadata (`io.read_image`), else the CSV's ``pixel_size``, else it is assumed to be the model's
(with a note); every pair is resampled to the model's pixel size, and one `stain` would refuse
(`engine.rescale_factor`: more than 8x either way) is refused, naming the file or CSV line. A
file in two pairs, or as both qOBM and DAPI, is refused (`check_distinct`). `lcm-stain finetune`
reads its pairs with the same functions. DAPI is mapped to the model's
0-1 scale per pair exactly as fine-tuning does (`finetune.dapi_to_model_units`), qOBM is normalised
per plane with the model's `normalization` config.

Registration check: the model's predicted DAPI (1-step LCM) of each pair is phase-correlated with
the measured DAPI (`skimage.registration.phase_cross_correlation`); the shift is reported, and
with ``register=True`` corrected by shifting the DAPI (shifts up to ``max_shift`` px; larger ones
are refused) and cropping the border the shift leaves invalid.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..normalization import normalize
from .data import PairedData

#: Image suffixes a pair may use (longest first, so ``.ome.tif`` wins over ``.tif``).
SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".zarr")
ROLES = {"_qobm": "qOBM", "_dapi": "DAPI"}
CSV_NAME = "pairs.csv"
LAYOUT_HINT = (
    "expected NAME_qobm.tif + NAME_dapi.tif pairs (.tif/.tiff/.ome.tif/.zarr) or a pairs.csv "
    "with columns qobm,dapi[,pixel_size]"
)
#: Default bound (px at the model's pixel size) of the shift `--register` corrects.
MAX_SHIFT = 8.0
#: Shifts below this (px) are reported but not corrected: the estimate recovers a known shift to
#: ~0.1 px, but on aligned simulated pairs the packaged model's prediction itself sits a median
#: ~1.1 px from the DAPI (worst of 8 fields: 2.3 px at 512², 3.9 px at 256²), so smaller shifts
#: are within the precision of registering against the model.
MIN_SHIFT = 3.0
#: Hold out about one pair in this many for validation (at least one when there are >= 2).
VAL_EVERY = 8


@dataclass
class Pair:
    """One registered pair at the model's pixel size, in the files' own units (not normalised)."""

    name: str
    qobm_path: Path
    dapi_path: Path
    qobm: np.ndarray  # (planes, H, W) float32
    dapi: np.ndarray  # (planes, H, W) float32
    pixel_size: float  # µm/px of the files (the model's when unknown)
    pixel_size_source: str  # "metadata" | "pairs.csv" | "assumed"
    report: dict = field(default_factory=dict)  # registration check results

    def summary(self) -> dict:
        return {
            "name": self.name,
            "qobm": str(self.qobm_path),
            "dapi": str(self.dapi_path),
            "planes": int(self.qobm.shape[0]),
            "shape": [int(s) for s in self.qobm.shape[1:]],
            "pixel_size": self.pixel_size,
            "pixel_size_source": self.pixel_size_source,
            **self.report,
        }


# --------------------------------------------------------------------------------- discovery


class PairRow(NamedTuple):
    """One pair as found: its name, files, the pixel size pairs.csv gives (None: none), and
    where it was listed (``"pairs.csv line 3"``, ``"pair 'a'"``), for messages."""

    name: str
    qobm: Path
    dapi: Path
    pixel_size: float | None
    where: str


def _split_name(path: Path) -> tuple[str, str] | None:
    """(NAME, role) for ``NAME_qobm.ext`` / ``NAME_dapi.ext``; None for any other file."""
    low = path.name.lower()
    if low.startswith("."):
        return None
    for suf in SUFFIXES:
        if low.endswith(suf):
            base = path.name[: -len(suf)]
            for tag in ROLES:
                if base.lower().endswith(tag):
                    return base[: -len(tag)], tag
    return None


def find_pairs(folder) -> list[PairRow]:
    """Every pair of `folder` (sorted by name, or in pairs.csv's order); a file in two pairs or
    used as both qOBM and DAPI is refused (`check_distinct`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"training data folder {folder} not found (or not a folder)")
    csv_file = folder / CSV_NAME
    rows = _pairs_from_csv(csv_file) if csv_file.exists() else _pairs_by_name(folder)
    check_distinct(rows)
    return rows


def check_distinct(rows: list[PairRow]) -> None:
    """Refuse a file (the same file under two names too: symlinks, hard links) listed in two
    pairs or as both qOBM and DAPI of one: it would be trained on and held out at once."""
    from ..finetune import check_distinct_pairs

    def identity(path: Path):
        st = os.stat(path)
        return st.st_dev, st.st_ino

    check_distinct_pairs(
        [(r.qobm, r.dapi) for r in rows], kind="file", key=identity, label=lambda i: rows[i].where
    )


def _pairs_by_name(folder: Path) -> list[PairRow]:
    found: dict[str, dict[str, list[Path]]] = {}
    for p in sorted(folder.iterdir()):
        hit = _split_name(p)
        if hit:
            found.setdefault(hit[0], {"_qobm": [], "_dapi": []})[hit[1]].append(p)
    pairs = []
    for name, roles in sorted(found.items()):
        for tag, paths in roles.items():
            if len(paths) > 1:
                raise ValueError(
                    f"{ROLES[tag]} of pair {name!r} is ambiguous: "
                    f"{', '.join(p.name for p in paths)}; keep one of them in {folder}"
                )
        q, d = roles["_qobm"], roles["_dapi"]
        if not q or not d:
            have, tag = (q[0], "_dapi") if q else (d[0], "_qobm")
            raise ValueError(
                f"{have} has no partner: add {name}{tag}.tif (or .tiff/.ome.tif/.zarr) to "
                f"{folder}, or move the file out of the folder"
            )
        pairs.append(PairRow(name, q[0], d[0], None, f"pair {name!r}"))
    if not pairs:
        raise ValueError(f"no training pairs found in {folder}: {LAYOUT_HINT}")
    return pairs


def _pairs_from_csv(path: Path) -> list[PairRow]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "qobm" not in cols or "dapi" not in cols:
            raise ValueError(
                f"{path} needs the columns qobm,dapi[,pixel_size]; its header is {cols or 'empty'}"
            )
        rows = [{k.strip().lower(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    pairs, names = [], set()
    for i, r in enumerate(rows, start=2):  # line 1 is the header
        if not r.get("qobm") and not r.get("dapi"):
            continue
        q, d = (path.parent / r.get(k, "") for k in ("qobm", "dapi"))
        for role, p in (("qOBM", q), ("DAPI", d)):
            if not r.get(role.lower()) or not p.exists():
                raise FileNotFoundError(f"{path} line {i}: {role} file {p} not found")
        px = None
        if r.get("pixel_size"):
            try:
                px = float(r["pixel_size"])
            except ValueError:
                px = -1.0
            if not (px > 0 and math.isfinite(px)):
                raise ValueError(
                    f"{path} line {i}: pixel_size {r['pixel_size']!r} is not a positive number "
                    "(µm/px)"
                )
        hit = _split_name(q)
        name = hit[0] if hit else q.name.split(".")[0]
        if name in names:
            name = f"{name}-{i}"
        names.add(name)
        pairs.append(PairRow(name, q, d, px, f"{path} line {i}"))
    if not pairs:
        raise ValueError(f"no training pairs found in {path}: it has a header but no rows")
    return pairs


# ----------------------------------------------------------------------------------- reading


def _read_planes(path: Path, role: str) -> tuple[np.ndarray, float | None]:
    """(planes, pixel size) of one file: leading axes flattened to planes, channels refused."""
    from ..io import read_image

    arr, meta = read_image(path)
    try:
        a = np.asarray(arr)
    finally:
        if meta.get("_handle") is not None:
            meta["_handle"].close()
    axes = meta.get("axes") or ""
    rgb = a.ndim == 3 and a.shape[-1] in (3, 4) and a.shape[0] > 4 and "S" not in axes
    for ax in "SC":
        if ax in axes and len(axes) == a.ndim:
            k = axes.index(ax)
            if a.shape[k] != 1:
                rgb = True
                break
            a, axes = np.squeeze(a, k), axes.replace(ax, "")
    if rgb:
        raise ValueError(
            f"{path}: the {role} image has colour/channel axes (shape {a.shape}, axes {axes!r}); "
            f"save the {role} channel alone as a single-channel (grayscale) image"
        )
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{path}: the {role} image is not numeric (dtype {a.dtype})")
    if a.ndim < 2:
        raise ValueError(f"{path}: the {role} image must be 2-D or a stack, got shape {a.shape}")
    a = a.reshape(-1, *a.shape[-2:]).astype(np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"{path}: the {role} image has NaN/Inf pixels; clean or crop them")
    return a, meta.get("pixel_size")


def read_pair(row: PairRow, model_px: float, notes: list[str]) -> Pair:
    """Read one pair, check it, and resample it to `model_px` (µm/px); a pixel size `stain`
    would refuse (`engine.rescale_factor`) is refused, naming where it came from."""
    from ..engine import PIXEL_SIZE_TOLERANCE, _resize, rescale_factor

    name, qobm_path, dapi_path, csv_px, where = row
    q, q_px = _read_planes(Path(qobm_path), "qOBM")
    d, d_px = _read_planes(Path(dapi_path), "DAPI")
    if q.shape != d.shape:
        raise ValueError(
            f"{qobm_path} ({_shape(q)}) and its partner {dapi_path} ({_shape(d)}) differ in "
            "shape: a pair must show the same field with the same planes"
        )
    px, source = q_px or d_px, "metadata"
    if px and csv_px and abs(px / csv_px - 1) > PIXEL_SIZE_TOLERANCE:
        notes.append(
            f"{name}: metadata says {px:g} µm/px, pairs.csv says {csv_px:g}; using the metadata"
        )
    origin = f"the metadata of {qobm_path if q_px else dapi_path}"
    if not px and csv_px:
        px, source = csv_px, "pairs.csv"
        origin = f"pixel_size in {where}, for {Path(qobm_path).name}"
    if not px:
        px, source = model_px, "assumed"
        notes.append(
            f"{name}: pixel size unknown (no metadata, no pixel_size in pairs.csv): assumed the "
            f"model's {model_px:g} µm/px"
        )
    scale = rescale_factor(px, model_px, origin)
    if scale != 1.0:
        shape = (max(1, round(q.shape[1] * scale)), max(1, round(q.shape[2] * scale)))
        notes.append(
            f"{name}: resampled {q.shape[1]}x{q.shape[2]} px at {px:g} µm/px to "
            f"{shape[0]}x{shape[1]} px at the model's {model_px:g} µm/px"
        )
        q = np.stack([_resize(p, shape) for p in q])
        d = np.stack([_resize(p, shape) for p in d])
    return Pair(name, Path(qobm_path), Path(dapi_path), q, d, float(px), source)


def _shape(a: np.ndarray) -> str:
    return "x".join(str(s) for s in (a.shape[1:] if a.shape[0] == 1 else a.shape))


def load_folder(folder, model_px: float, notes: list[str] | None = None) -> list[Pair]:
    """Every pair of `folder`, read and resampled to `model_px`."""
    notes = [] if notes is None else notes
    return [read_pair(row, model_px, notes) for row in find_pairs(folder)]


def content_hash(path: Path) -> str:
    """SHA-256 of a file, or of a folder's files (a zarr: relative names and contents)."""
    from ..checkpoints import sha256

    path = Path(path)
    if not path.is_dir():
        return sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{sha256(f)}\n".encode())
    return h.hexdigest()


def data_files(folder, register: bool = False, max_shift: float = MAX_SHIFT) -> dict:
    """What a run is trained on, for resuming it (`training.resume`): every pair's files with
    their content SHA-256, the pixel size pairs.csv gives, and the registration settings."""
    rows = find_pairs(folder)
    return {
        "folder": str(Path(folder).resolve()),
        "pairs": [
            {
                "name": r.name,
                "qobm": str(r.qobm.resolve()),
                "dapi": str(r.dapi.resolve()),
                "qobm_sha256": content_hash(r.qobm),
                "dapi_sha256": content_hash(r.dapi),
                "pixel_size": r.pixel_size,
            }
            for r in rows
        ],
        "register": bool(register),
        "max_shift": float(max_shift),
    }


# ------------------------------------------------------------------------------ registration


def estimate_shift(predicted: np.ndarray, dapi: np.ndarray, upsample: int = 10) -> np.ndarray:
    """(dy, dx) that moves `dapi` onto `predicted` (`scipy.ndimage.shift(dapi, shift)`), in px;
    for stacks the median over planes.

    Both images are band-passed (Gaussian 1.5 px minus Gaussian 10 px: nuclei, not background),
    Hann-windowed (no wrap-around edge) and cross-correlated without phase normalisation: on
    predicted-vs-measured DAPI, phase normalisation whitens the noise and locked onto zero shift
    in our probes, while this recovers a known shift to ~0.1 px (tests/test_train_folder.py)."""
    from scipy.ndimage import gaussian_filter
    from skimage.filters import window
    from skimage.registration import phase_cross_correlation

    def prep(x):
        y = gaussian_filter(x, 1.5) - gaussian_filter(x, 10.0)
        return (y - y.mean()) * window("hann", y.shape)

    planes = zip(*(np.reshape(a, (-1, *np.shape(a)[-2:])) for a in (predicted, dapi)))
    shifts = [
        phase_cross_correlation(prep(p), prep(d), upsample_factor=upsample, normalization=None)[0]
        for p, d in planes
    ]
    return np.median(np.array(shifts), axis=0)


def _valid(shape, shift) -> tuple[slice, slice]:
    """The rows and columns that a DAPI shifted by `shift` (dy, dx) still fills with data."""
    (h, w), (dy, dx) = shape[-2:], shift
    ys = slice(math.ceil(dy), h) if dy > 0 else slice(0, h - math.ceil(-dy))
    xs = slice(math.ceil(dx), w) if dx > 0 else slice(0, w - math.ceil(-dx))
    return ys, xs


def _shift_planes(planes: np.ndarray, shift) -> np.ndarray:
    from scipy.ndimage import shift as nd_shift

    shift = tuple(float(v) for v in shift)
    return np.stack([nd_shift(p, shift, order=1, mode="nearest") for p in planes])


def shift_pair(pair: Pair, shift) -> Pair:
    """Shift the DAPI by `shift` (dy, dx) px and crop both images to the part that stays valid."""
    ys, xs = _valid(pair.dapi.shape, shift)
    d = _shift_planes(pair.dapi, shift)
    pair.qobm, pair.dapi = pair.qobm[:, ys, xs].copy(), d[:, ys, xs].astype(np.float32)
    return pair


def check_registration(
    pairs: list[Pair],
    model="lcm",
    pixel_size: float | None = None,
    device="auto",
    register: bool = False,
    max_shift: float = MAX_SHIFT,
    log=print,
) -> None:
    """Estimate every pair's shift against `model`'s 1-step prediction, record it in
    `pair.report` and log it; with `register`, correct it (refusing shifts over `max_shift`).
    `pixel_size`: the pairs' µm/px (None: the model's)."""
    from ..engine import get_predictor, stain
    from ..metrics import pearson

    if not max_shift >= 0:
        raise ValueError(f"--max-shift must be >= 0 px, got {max_shift}")
    pred_model = get_predictor(model, 1, device)
    px = float(pixel_size or pred_model.pixel_size)
    for pair in pairs:
        predicted = stain(pair.qobm, pred_model, pixel_size=px, device=device)
        dy, dx = (round(float(v), 2) for v in estimate_shift(predicted, pair.dapi))
        worst = max(abs(dy), abs(dx))
        # An estimate counts only if the prediction correlates better with the shifted DAPI than
        # with the DAPI as it is (same region): a flat correlation peak gives random shifts.
        ys, xs = _valid(pair.dapi.shape, (dy, dx))
        r0 = r1 = pearson(predicted, pair.dapi)
        reliable = worst < min(pair.dapi.shape[1:]) / 4
        if reliable and worst > 0:
            region = predicted[:, ys, xs]
            r0 = pearson(region, pair.dapi[:, ys, xs])
            r1 = pearson(region, _shift_planes(pair.dapi, (dy, dx))[:, ys, xs])
            reliable = r1 > r0
        pair.report = {
            "shift_px": [dy, dx],
            "shift_um": [round(dy * px, 3), round(dx * px, 3)],
            "shift_reliable": bool(reliable),
            "pearson_vs_model": round(r0, 4),
            "pearson_vs_model_shifted": round(r1, 4),
            "registered": False,
        }
        msg = f"[register] {pair.name}: DAPI shift to the model's prediction dy {dy:+.1f} dx {dx:+.1f} px"
        if not reliable:
            msg += " (unreliable: the prediction correlates no better at that shift; left as is)"
        elif register and worst > max_shift:
            raise ValueError(
                f"{pair.dapi_path} is shifted by ({dy:+.1f}, {dx:+.1f}) px against the model's "
                f"prediction from {pair.qobm_path.name}, more than --max-shift {max_shift:g} px: "
                "register this pair by hand, raise --max-shift, or remove it"
            )
        elif worst < MIN_SHIFT:
            msg += f" (under {MIN_SHIFT:g} px, within the estimate's precision: left as is)"
        elif register:
            shift_pair(pair, (dy, dx))
            pair.report["registered"] = True
            msg += f" -> corrected (Pearson to the prediction {r0:.3f} -> {r1:.3f})"
        else:
            msg += " (pass --register to correct it)"
        log(msg)


# ------------------------------------------------------------------------ split and training data


def split_by_pair(n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """(training, validation) pair indices: about one pair in `VAL_EVERY` held out (at least one
    when there are two or more), chosen by `seed`; every plane of a pair stays on one side."""
    if n < 2:
        return list(range(n)), []
    k = max(1, round(n / VAL_EVERY))
    val = sorted(int(i) for i in np.random.default_rng(seed).permutation(n)[:k])
    return [i for i in range(n) if i not in val], val


def model_targets(pair: Pair) -> np.ndarray:
    """The pair's DAPI on the model's 0-1 scale (the same percentile mapping fine-tuning uses)."""
    from ..finetune import dapi_to_model_units

    return dapi_to_model_units(pair.dapi, f"DAPI image {pair.dapi_path} (pair {pair.name!r})")[0]


def paired_data(
    pairs: list[Pair], normalization: dict, pixel_size: float, multiple: int, augment=False
) -> PairedData:
    """Training data from `pairs`: one plane per sample (planes may differ in size), each cropped
    to a multiple of `multiple` px (the networks' tile multiple); `augment`: the preset's qOBM
    crop augmentation (`training/augment.py`)."""
    qs, ds = [], []
    for pair in pairs:
        h, w = pair.qobm.shape[1:]
        if min(h, w) < multiple:
            raise ValueError(
                f"{pair.qobm_path}: {h}x{w} px at the model's pixel size is smaller than the "
                f"networks' {multiple} px minimum; use larger fields"
            )
        hh, ww = h - h % multiple, w - w % multiple
        qn = normalize(normalization, pair.qobm)
        dn = model_targets(pair)
        qs += [np.ascontiguousarray(p[:hh, :ww]) for p in qn]
        ds += [np.ascontiguousarray(p[:hh, :ww]) for p in dn]
    return PairedData(
        qobm=qs, dapi=ds, pixel_size=pixel_size, normalization=dict(normalization), augment=augment
    )


def validate(pairs: list[Pair], model, pixel_size: float, device="auto") -> dict:
    """LCM-1 scores (finetune's validation metrics: Pearson, SSIM, nuclei F1...) per held-out
    pair and their mean."""
    from ..engine import get_predictor, stain
    from ..finetune import _val_metrics

    pred_model = get_predictor(model, 1, device)
    rows = []
    for pair in pairs:
        pred = stain(pair.qobm, pred_model, pixel_size=pixel_size, device=device)
        rows.append({"name": pair.name, **_val_metrics(pred, model_targets(pair), pixel_size)})
    keys = [k for k in rows[0] if k != "name"] if rows else []
    return {"pairs": rows, "mean": {k: float(np.mean([r[k] for r in rows])) for k in keys}}


# ---------------------------------------------------------------------------- the whole path


@dataclass
class LabData:
    """A data folder split by pair, with what the run records about it."""

    folder: Path
    train: list[Pair]
    val: list[Pair]
    notes: list[str]

    def provenance(self) -> dict:
        return {
            "folder": str(self.folder.resolve()),
            "train_pairs": [p.summary() for p in self.train],
            "validation_pairs": [p.summary() for p in self.val],
        }


def prepare(
    folder,
    *,
    pixel_size: float,
    normalization: dict,
    multiple: int,
    augment: bool = False,
    seed: int = 0,
    check_model="lcm",
    device="auto",
    register: bool = False,
    max_shift: float = MAX_SHIFT,
    log=print,
) -> tuple[PairedData, LabData]:
    """Folder -> pairs at `pixel_size` -> registration check (and correction) -> split by pair ->
    the training pairs as `PairedData`."""
    notes: list[str] = []
    pairs = load_folder(folder, pixel_size, notes)
    for n in notes:
        log(f"[data] {n}")
    for pair in pairs:  # a DAPI without contrast is refused (naming it) before any model runs
        model_targets(pair)
    check_registration(pairs, check_model, pixel_size, device, register, max_shift, log)
    train_idx, val_idx = split_by_pair(len(pairs), seed)
    lab = LabData(Path(folder), [pairs[i] for i in train_idx], [pairs[i] for i in val_idx], notes)
    planes = sum(p.qobm.shape[0] for p in lab.train)
    log(
        f"[data] {len(pairs)} pairs in {folder}: {len(lab.train)} for training ({planes} planes), "
        f"{len(lab.val)} held out for validation ({', '.join(p.name for p in lab.val) or 'none'})"
    )
    if not lab.val:
        log("[data] only one pair: no held-out validation (add a second pair to get scores)")
    return paired_data(lab.train, normalization, pixel_size, multiple, augment), lab
