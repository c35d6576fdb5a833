"""`lcm-stain evaluate`: every model on one fixed, versioned, held-out simulated benchmark.

The benchmark is generated on demand (nothing to download): ``n`` fields from
`simulate.simulate_pair` with seeds ``BENCHMARK_SEED0 + i`` (far from any training seed), presets
alternating between ``BENCHMARK_PRESETS``. Each row stains the qOBM with one model through the
public `napari_lcm_stain.stain` and scores it with `metrics.image_metrics`; the oracle row runs the
same nuclei pipeline on the TRUE DAPI (the ceiling of the object metrics) and "threshold-phase" is
a trivial baseline (smoothed phase rescaled to 0-1) that any model must beat clearly.

Changing the fields, the presets, the normalisation or the segmentation pipeline changes the
numbers: bump ``BENCHMARK_VERSION`` when you do.

``--suite instruments`` (`run_instrument_suite`) scores oracle, LCM-1, LCM-4, teacher-1 and Pix2Pix
on the same tissue seen by instruments that training never samples (``INSTRUMENT_VARIANTS``, each
with a one-line description) and in-domain, with seeds ``SUITE_SEED0 + i``; bump ``SUITE_VERSION``
when a variant changes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from . import metrics as M

__all__ = [
    "BENCHMARK_VERSION",
    "BENCHMARK_SEED0",
    "BENCHMARK_PRESETS",
    "DEFAULT_N",
    "DEFAULT_SIZE",
    "QUICK_N",
    "QUICK_SIZE",
    "COLUMNS",
    "Row",
    "FULL_ROWS",
    "QUICK_ROWS",
    "benchmark_fields",
    "threshold_phase",
    "evaluate_rows",
    "compare_rows",
    "format_table",
    "run_evaluate",
    "SUITE_VERSION",
    "SUITE_SEED0",
    "SUITE_ROWS",
    "IN_DOMAIN",
    "INSTRUMENT_VARIANTS",
    "InstrumentVariant",
    "suite_fields",
    "format_suite_table",
    "format_suite_markdown",
    "run_instrument_suite",
]

BENCHMARK_VERSION = 1
#: Field i uses seed BENCHMARK_SEED0 + i; training uses small seeds, so these are never seen.
BENCHMARK_SEED0 = 900_000
#: Presets alternate field by field (even i: first, odd i: second).
BENCHMARK_PRESETS: tuple[str, ...] = ("brain-20x", "tumour-dense-20x")
DEFAULT_N, DEFAULT_SIZE = 8, 256
QUICK_N, QUICK_SIZE = 2, 128
#: Smoothing of the trivial phase baseline (µm).
BASELINE_SIGMA_UM = 1.0

#: Table/JSON columns: per-image mean, with the per-image standard deviation under "std".
COLUMNS: tuple[str, ...] = (
    "pearson",
    "ssim",
    "psnr",
    "nrmse",
    "recall",
    "precision",
    "f1",
    "missed",
    "hallucinated",
    "realism",
    "edge_sharpness",
    "rim_slope",
    "hard_recall",
    "hallu_near_distractors",
)
#: Columns that may be NaN on a field (edge_sharpness: no true nuclei); means and stds skip those
#: fields, and a column NaN on every field stays NaN (null in the JSON, "n/a" in the table).
NAN_SKIPPED: tuple[str, ...] = ("edge_sharpness", "rim_slope")
#: Extra per-image quantities averaged into each row (not printed).
EXTRA_COLUMNS: tuple[str, ...] = (
    "hard_f1",
    "hallu_near_distractors_rate",
    "mean_iou",
    "n_pred",
    "n_true",
    "n_ignored",
)
#: Per-field values kept in every row (JSON "per_field"), so two rows can be compared field by field.
PER_FIELD: tuple[str, ...] = (
    "pearson",
    "ssim",
    "f1",
    "realism",
    "edge_sharpness",
    "rim_slope",
    "tp_hard",
    "n_hard",
    "hallu_near_distractors",
)
#: Row pairs (candidate, reference) whose differences the report gives with a bootstrap interval.
COMPARISONS: tuple[tuple[str, str], ...] = (
    ("lcm-1", "pix2pix"),
    ("lcm-1", "teacher-1"),
    ("lcm-1-texture", "lcm-1"),  # what the texture decoder's grain costs and buys
)
#: Bootstrap resamples (of fields) for those intervals.
N_BOOTSTRAP = 2000

#: Counts summed over the benchmark for pooled (micro-averaged) scores.
_COUNTS = (
    "tp",
    "fp",
    "fn",
    "n_pred",
    "n_true",
    "n_ignored",
    "n_hard",
    "tp_hard",
    "n_low_contrast",
    "tp_low_contrast",
    "n_out_of_section",
    "tp_out_of_section",
    "hallu_near_distractors",
    "n_distractors",
)


@dataclass(frozen=True)
class Row:
    """One table row: JSON key, the `stain` model name (None: computed here), its steps,
    whether a texture decoder draws its grain (True; default False: the smooth mean, as
    `engine.iter_stain` gives it) and its guidance (None: the run's, else the model's default)."""

    name: str
    model: str | None = None
    steps: int | None = None
    texture: bool = False
    guidance: float | None = None


ORACLE = Row("oracle")
BASELINE = Row("threshold-phase")
VAE_RECON = Row("vae-recon")
FULL_ROWS: tuple[Row, ...] = (
    ORACLE,
    VAE_RECON,
    BASELINE,
    Row("lcm-1", "lcm", 1),
    Row("lcm-1-texture", "lcm", 1, texture=True),
    Row("lcm-2", "lcm", 2),
    Row("lcm-4", "lcm", 4),
    Row("teacher-1", "teacher", 1),
    Row("teacher-4", "teacher", 4),
    Row("teacher-50", "teacher", 50),
    Row("pix2pix", "pix2pix", None),
)
QUICK_ROWS: tuple[Row, ...] = (
    ORACLE,
    BASELINE,
    Row("lcm-1", "lcm", 1),
    Row("teacher-4", "teacher", 4),
    Row("pix2pix", "pix2pix", None),
)


def guidance_rows(weights_dir: Path | None = None) -> tuple[Row, ...]:
    """Rows at other guidances than the default for the latent models that accept guidance
    (checkpoint config `guidance`): LCM-1/2/4 at the trained range's ends, teacher-50 at one
    more; none for models without guidance (so older weights evaluate as before)."""
    from ._params import guidance_range, model_config

    rows: list[Row] = []
    for kind, steps in (("lcm", (1, 2, 4)), ("teacher", (50,))):
        try:  # the JSON config only: no weights loaded for a table's row list
            g = guidance_range(model_config(_resolve_model(kind, weights_dir)))
        except FileNotFoundError:
            continue  # its plain rows report why
        if g is None:
            continue
        lo, hi, default = g["min"], g["max"], g["default"]
        # the teacher (two branches a step at 50 steps: the costly rows) once more: unguided
        # when its default is guided, else at the top of the range
        ends = (lo, hi) if kind == "lcm" else ((lo,) if default != lo else (hi,))
        for w in sorted({w for w in ends if w != default}):
            rows += [Row(f"{kind}-{n}-g{w:g}", kind, n, guidance=w) for n in steps]
    return tuple(sorted(rows, key=lambda r: (r.model != "lcm", r.steps, r.guidance)))


# --------------------------------------------------------------------------- benchmark fields


def benchmark_fields(
    n: int = DEFAULT_N, size: int = DEFAULT_SIZE
) -> Iterator[tuple[int, str, Any]]:
    """Yield ``(seed, preset, SimSample)`` for the fixed benchmark, one field at a time."""
    from . import simulate

    for i in range(n):
        preset = BENCHMARK_PRESETS[i % len(BENCHMARK_PRESETS)]
        seed = BENCHMARK_SEED0 + i
        yield seed, preset, simulate.simulate_pair(preset=preset, size=size, seed=seed)


def threshold_phase(qobm: np.ndarray, pixel_size: float) -> np.ndarray:
    """Trivial baseline: phase smoothed by ``BASELINE_SIGMA_UM`` and its 1-99.8 % range mapped to 0-1.

    It "stains" whatever is optically dense (nuclei with positive contrast, but also red blood cells
    and lipid droplets) and misses nuclei with zero or negative contrast: the floor to beat.
    """
    q = np.asarray(qobm, dtype=np.float64)
    s = ndi.gaussian_filter(q, BASELINE_SIGMA_UM / float(pixel_size))
    lo, hi = np.percentile(s, M.NORM_PERCENTILES)
    if hi - lo <= 0:
        return np.zeros(q.shape, np.float32)
    return np.clip((s - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _stain(image: np.ndarray, **kwargs: Any) -> np.ndarray:
    """The public API call (looked up at call time, so tests can substitute a stub)."""
    import napari_lcm_stain

    return napari_lcm_stain.stain(image, **kwargs)


def _resolve_model(model: str, weights_dir: Path | None) -> str:
    """A packaged model name, or ``weights_dir/<name>.safetensors`` (searched recursively)."""
    if weights_dir is None:
        return model
    direct = weights_dir / f"{model}.safetensors"
    if direct.is_file():
        return str(direct)
    found = sorted(weights_dir.rglob(f"{model}.safetensors"))
    if not found:
        raise FileNotFoundError(f"no {model}.safetensors under {weights_dir}")
    return str(found[0])


def _predict(
    row: Row,
    sample: Any,
    device: str,
    weights_dir: Path | None,
    pixel_size_known: bool = True,
    guidance: float | None = None,
) -> np.ndarray:
    if row is ORACLE or row.name == ORACLE.name:
        return np.asarray(sample.dapi, dtype=np.float32)
    if row.name == BASELINE.name:
        return threshold_phase(sample.qobm, sample.pixel_size)
    if row.name == VAE_RECON.name:
        return vae_reconstruction(sample.dapi, _resolve_model("lcm", weights_dir))
    if row.model is None:
        raise ValueError(f"row {row.name!r} has no model to run")
    g = row.guidance if row.guidance is not None else guidance
    guided = {} if g is None else {"guidance": g}  # None: the model's default
    out = _stain(
        sample.qobm,
        model=_resolve_model(row.model, weights_dir),
        steps=row.steps,
        pixel_size=sample.pixel_size if pixel_size_known else "auto",
        seed=0,
        device=device,
        texture=row.texture,
        **guided,
    )
    out = np.asarray(out, dtype=np.float32)
    if out.shape != np.shape(sample.dapi):
        raise ValueError(
            f"model {row.name} returned shape {out.shape} for a {np.shape(sample.qobm)} input"
        )
    return out


def vae_reconstruction(dapi: np.ndarray, model: str = "lcm") -> np.ndarray:
    """decode(encode(true DAPI)) with the LCM checkpoint's VAE: the ceiling of any latent model
    (a texture decoder's mean: no grain is drawn here)."""
    import torch

    from . import checkpoints as ck
    from .models import build

    c = ck.load_packaged(model) if model in ck.PACKAGED else ck.load_checkpoint(Path(model))
    vae = build(c.config["architecture"]["vae"])
    ck.load_into(vae.encoder, c.sub("encoder"), "VAE encoder")
    ck.load_into(vae.decoder, c.sub("decoder"), "VAE decoder")
    x = torch.from_numpy(np.asarray(dapi, dtype=np.float32))[None, None]
    h, w = x.shape[-2:]
    x = torch.nn.functional.pad(x, (0, (-w) % 4, 0, (-h) % 4), mode="replicate")
    with torch.inference_mode():
        mean, _ = vae.eval().encode(x)
        rec = vae.decode(mean)[0, 0, :h, :w].clamp(0, 1)
    return rec.numpy().astype(np.float32)


def _is_unavailable(err: BaseException) -> bool:
    """Missing engine or weights: the row is reported as skipped (with the reason) instead of
    aborting the whole table; any other error is a bug and propagates."""
    if isinstance(err, (ImportError, FileNotFoundError)):
        return True
    try:
        from .checkpoints import CheckpointError
    except ImportError:  # pragma: no cover - checkpoints is part of the package
        return False
    return isinstance(err, CheckpointError)


# --------------------------------------------------------------------------- scoring


def _score(pred: np.ndarray, sample: Any, ignore: np.ndarray | None) -> dict[str, Any]:
    labels = M.segment_nuclei(pred, sample.pixel_size)
    d = M.image_metrics(pred, sample.dapi, sample=sample, pred_labels=labels, ignore=ignore)
    m = M.match_nuclei(labels, sample.nuclei, ignore=ignore)
    d["_bins"] = M.recall_by_contrast(m, sample.nucleus_cnr)
    d["_bright"] = M.nuclear_brightness(pred, sample.dapi, sample.nuclei, sample.nucleus_cnr)
    return d


def _aggregate(per_image: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    row: dict[str, Any] = {}
    std: dict[str, float] = {}
    for k in COLUMNS + EXTRA_COLUMNS:
        v = np.array([float(d[k]) for d in per_image])
        if k in NAN_SKIPPED:
            v = v[~np.isnan(v)]
        row[k] = float(v.mean()) if len(v) else float("nan")
        std[k] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    row["std"] = std
    row["per_field"] = {k: [float(d[k]) for d in per_image] for k in PER_FIELD}
    tot = {k: int(sum(int(d[k]) for d in per_image)) for k in _COUNTS}
    tp, fp, fn = tot["tp"], tot["fp"], tot["fn"]
    row["pooled"] = {
        **tot,
        "recall": tp / tot["n_true"] if tot["n_true"] else 1.0,
        "precision": tp / tot["n_pred"] if tot["n_pred"] else (1.0 if tot["n_true"] == 0 else 0.0),
        "f1": 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 1.0,
    }
    bins: list[dict[str, Any]] = []
    for j, b in enumerate(per_image[0]["_bins"]):
        n = sum(d["_bins"][j]["n_true"] for d in per_image)
        k = sum(d["_bins"][j]["n_matched"] for d in per_image)
        bins.append(
            {
                "lo": b["lo"],
                "hi": b["hi"],
                "n_true": n,
                "n_matched": k,
                "recall": k / n if n else None,
            }
        )
    row["recall_by_contrast"] = bins
    # prediction ÷ truth contrast of the true nuclei, pooled: "clear" = |CNR| >= 4 (issue #24)
    bright = M.pool_brightness([d["_bright"] for d in per_image])
    row["brightness_clear"], row["brightness_all"] = bright["clear"], bright["all"]
    row["seconds"] = float(seconds)
    return row


def _hard_summary(row: dict[str, Any]) -> dict[str, Any]:
    """Pooled hard-subset numbers of one row (sums over all fields, then ratios)."""
    p = row["pooled"]
    near, n_hard, tp_hard = p["hallu_near_distractors"], p["n_hard"], p["tp_hard"]

    def ratio(a: int, b: int) -> float:
        return a / b if b else 1.0

    return {
        "hard_recall": ratio(tp_hard, n_hard),
        "hard_f1": _pooled_hard_f1(tp_hard, n_hard, near),
        "low_contrast_recall": ratio(p["tp_low_contrast"], p["n_low_contrast"]),
        "out_of_section_recall": ratio(p["tp_out_of_section"], p["n_out_of_section"]),
        "hallu_near_distractors": near,
        "hallu_near_distractors_rate": near / p["n_pred"] if p["n_pred"] else 0.0,
        "hallu_per_distractor": near / p["n_distractors"] if p["n_distractors"] else 0.0,
        "n_hard": n_hard,
        "n_low_contrast": p["n_low_contrast"],
        "n_out_of_section": p["n_out_of_section"],
        "n_distractors": p["n_distractors"],
    }


def _pooled_hard_f1(tp: Any, n_hard: Any, near: Any) -> float:
    """Hard-subset F1 from counts (ints or per-field arrays, summed): 2TP / (2TP + FP + FN)."""
    tp_s, n_s, near_s = float(np.sum(tp)), float(np.sum(n_hard)), float(np.sum(near))
    denom = 2 * tp_s + near_s + (n_s - tp_s)
    return 2 * tp_s / denom if denom else 1.0


def compare_rows(
    a: dict[str, Any], b: dict[str, Any], n_resamples: int = N_BOOTSTRAP, seed: int = 0
) -> dict[str, dict[str, float | None]]:
    """Row `a` minus row `b` on the same fields: per-field means of Pearson / SSIM / F1 / realism /
    edge sharpness and the pooled hard-subset F1, each with a 95 % paired percentile bootstrap
    interval over fields (scipy). With 8 fields a difference is resolved only if its interval
    excludes 0; the interval is None when there are fewer than 2 fields. Edge sharpness uses only
    the fields where both rows have a value (not NaN), and is left out for rows scored before it
    existed (no per-field values)."""
    from scipy.stats import bootstrap

    fa, fb = a["per_field"], b["per_field"]
    n = len(fa["f1"])
    if len(fb["f1"]) != n:
        raise ValueError(f"rows were scored on different fields ({n} vs {len(fb['f1'])})")

    def interval(data: tuple[np.ndarray, ...], stat: Any) -> dict[str, float | None]:
        diff = float(stat(*data))
        if len(data[0]) < 2:
            return {"diff": diff, "lo": None, "hi": None}
        res = bootstrap(
            data,
            stat,
            paired=True,
            vectorized=False,
            n_resamples=n_resamples,
            method="percentile",
            random_state=np.random.default_rng(seed),
        )
        lo, hi = res.confidence_interval
        return {"diff": diff, "lo": float(lo), "hi": float(hi)}

    out: dict[str, dict[str, float | None]] = {}
    for key in ("pearson", "ssim", "f1", "realism", "edge_sharpness", "rim_slope"):
        if key not in fa or key not in fb:
            continue
        x, y = np.asarray(fa[key], dtype=float), np.asarray(fb[key], dtype=float)
        both = ~(np.isnan(x) | np.isnan(y))
        if key in NAN_SKIPPED and not both.all():
            x, y = x[both], y[both]
            if not len(x):
                out[key] = {"diff": float("nan"), "lo": None, "hi": None}
                continue
        out[key] = interval((x, y), lambda x, y: np.mean(x) - np.mean(y))
    hard = [
        np.asarray(f[k]) for f in (fa, fb) for k in ("tp_hard", "n_hard", "hallu_near_distractors")
    ]
    out["hard_f1"] = interval(
        tuple(hard), lambda *h: _pooled_hard_f1(*h[:3]) - _pooled_hard_f1(*h[3:])
    )
    return out


def evaluate_rows(
    samples: Sequence[Any],
    rows: Sequence[Row],
    device: str = "auto",
    weights_dir: Path | None = None,
    log: Any = None,
    pixel_size_known: bool = True,
    guidance: float | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Score every row on every sample: ``({name: aggregated row}, {name: reason skipped})``.

    ``pixel_size_known=False`` stains without a pixel size (an image with no metadata); scoring
    always uses the true one. ``guidance``: the latent models' guidance where a row sets none
    (None: each model's default); Pix2Pix rows never get one."""
    models: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    # DAPI-visible objects the labels do not list depend only on the field: compute them once.
    ignores = [M.unlabelled_mask(s.dapi, s.nuclei, s.pixel_size) for s in samples]
    for row in rows:
        per_image: list[dict[str, Any]] = []
        seconds = 0.0
        try:
            for s, ignore in zip(samples, ignores):
                t0 = time.perf_counter()
                g = guidance if row.model in ("lcm", "teacher") else None
                pred = _predict(row, s, device, weights_dir, pixel_size_known, g)
                seconds += time.perf_counter() - t0
                per_image.append(_score(pred, s, ignore))
        except Exception as e:
            if not _is_unavailable(e):
                raise
            skipped[row.name] = f"{type(e).__name__}: {e}"
            if log:
                log(f"  {row.name:<16s} skipped ({skipped[row.name]})")
            continue
        models[row.name] = _aggregate(per_image, seconds)
        if log:
            log(f"  {row.name:<16s} {seconds:7.2f} s   f1 {models[row.name]['f1']:.3f}")
    return models, skipped


# --------------------------------------------------------------------------- report


_HEAD = {
    "pearson": "Pearson",
    "ssim": "SSIM",
    "psnr": "PSNR",
    "nrmse": "NRMSE",
    "recall": "recall",
    "precision": "precis.",
    "f1": "F1",
    "missed": "missed",
    "hallucinated": "halluc.",
    "realism": "realism↓",
    "edge_sharpness": "edge",
    "rim_slope": "rim slope",
    "hard_recall": "hard rec.",
    "hallu_near_distractors": "FP@distr.",
    "brightness_clear": "bright",
}


def _cell(key: str, mean: float | None, sd: float | None) -> str:
    if mean is None or not math.isfinite(mean):  # no value (NaN, or a row scored before the column)
        return "n/a"
    if key == "psnr":
        return f"{mean:.1f}±{sd:.1f}"
    if sd is None:  # pooled over fields: no per-field spread
        return f"{mean:.2f}"
    if key in ("realism", "hallu_near_distractors"):
        return f"{mean:.2f}±{sd:.2f}"
    return f"{mean:.3f}±{sd:.3f}"


def format_table(result: dict[str, Any]) -> str:
    """The benchmark as one text table: rows = models (oracle first), cells = mean±std per image."""
    models = result["models"]
    cols = (*COLUMNS, "brightness_clear")
    cells = {
        name: [_cell(k, r.get(k), r["std"].get(k)) for k in COLUMNS]
        + [_cell("brightness_clear", r.get("brightness_clear"), None)]
        for name, r in models.items()
    }
    w0 = max([len("model")] + [len(n) for n in models])
    widths = [
        max(len(_HEAD[k]), *(len(c[i]) for c in cells.values())) if cells else len(_HEAD[k])
        for i, k in enumerate(cols)
    ]
    presets = ", ".join(dict.fromkeys(f["preset"] for f in result.get("fields", [])))
    lines = [
        f"lcm-stain evaluate · benchmark v{result['benchmark_version']} · {result['n']} fields "
        f"of {result['size']}² ({presets}) · device {result['device']}",
        "  ".join(["model".ljust(w0)] + [_HEAD[k].rjust(w) for k, w in zip(cols, widths)]),
    ]
    lines.append("-" * len(lines[-1]))
    for name, c in cells.items():
        lines.append("  ".join([name.ljust(w0)] + [v.rjust(w) for v, w in zip(c, widths)]))
    lines.append(
        "mean±std over fields. Pixel metrics after mapping the target's 1–99.8 % to 0–1; nuclei "
        "matched at IoU≥0.5; realism = spectral log-distance (lower is better); edge = mean gradient "
        "on the true nuclear rims, prediction ÷ truth (1 = as sharp, <1 blurrier or fainter); rim slope = "
        "the same along the rims' normal (noise averages out); hard rec. = recall "
        f"of nuclei with |CNR|<{M.HARD_CNR_THRESHOLD:g} or in-section<{M.HARD_IN_SECTION_THRESHOLD:g}; "
        f"FP@distr. = unmatched objects within {M.DISTRACTOR_RADIUS_UM:g} µm of a distractor, per field; "
        f"bright = contrast of the true nuclei with |CNR|≥{M.CLEAR_CNR:g}, prediction ÷ truth, pooled."
    )
    for pair, diffs in result.get("comparisons", {}).items():
        lines.append(
            f"difference {pair} (95 % bootstrap interval over fields): " + _comparison(diffs)
        )
    for name, why in result.get("skipped", {}).items():
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)


def _comparison(diffs: dict[str, dict[str, float | None]]) -> str:
    parts = []
    for key, d in diffs.items():
        ci = "" if d["lo"] is None else f" [{d['lo']:+.3f}, {d['hi']:+.3f}]"
        parts.append(f"{key} {d['diff']:+.3f}{ci}")
    return ", ".join(parts)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        f = float(x)
        return f if math.isfinite(f) else None
    return x


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_jsonable(data), indent=2, allow_nan=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _device_name(device: str) -> str:
    try:
        from .device import resolve_device

        return str(resolve_device(device).type)
    except ImportError:  # pragma: no cover - torch is a dependency
        return str(device)


def _check_int(name: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {v!r}")
    if v < lo:
        raise ValueError(f"{name} must be at least {lo}, got {v}")
    return int(v)


def _run_settings(
    n: Any, size: Any, quick: bool, weights_dir: Any, device: str, default_n: int, default_size: int
) -> tuple[int, int, Path | None, str]:
    """Validated (n, size, weights folder, device name) of a run, before minutes of work."""
    n = _check_int("n", n if n is not None else (QUICK_N if quick else default_n), 1)
    size = _check_int(
        "size", size if size is not None else (QUICK_SIZE if quick else default_size), 64
    )
    wdir = None
    if weights_dir is not None:
        wdir = Path(weights_dir)
        if not wdir.is_dir():
            raise FileNotFoundError(
                f"weights_dir {wdir} is not a folder of .safetensors checkpoints"
            )
    return n, size, wdir, _device_name(device)


def _log(msg: str) -> None:
    """Progress line on stderr (the table goes to stdout)."""
    print(msg, file=sys.stderr, flush=True)


def run_evaluate(
    json_path: str | os.PathLike | None = None,
    n: int | None = None,
    size: int | None = None,
    device: str = "auto",
    quick: bool = False,
    weights_dir: str | os.PathLike | None = None,
    guidance: float | None = None,
) -> dict[str, Any]:
    """Run the benchmark, print the table, optionally write JSON (atomically); return the result.

    ``quick`` uses ``QUICK_N`` fields of ``QUICK_SIZE``² and ``QUICK_ROWS`` (unless n/size are given);
    ``weights_dir`` evaluates ``lcm/teacher/pix2pix.safetensors`` from a training run instead of the
    packaged weights; ``guidance``: the latent rows' guidance (None: each model's default; the
    full table adds rows at other guidances, `guidance_rows`).
    """
    t_start = time.perf_counter()
    n, size, wdir, dev = _run_settings(n, size, quick, weights_dir, device, DEFAULT_N, DEFAULT_SIZE)
    rows = QUICK_ROWS if quick else FULL_ROWS + guidance_rows(wdir)
    _log(f"lcm-stain evaluate: generating {n} benchmark fields of {size}² (v{BENCHMARK_VERSION})")
    fields = list(benchmark_fields(n, size))
    samples = [s for _, _, s in fields]
    models, skipped = evaluate_rows(
        samples, rows, device=device, weights_dir=wdir, log=_log, guidance=guidance
    )
    result: dict[str, Any] = {
        "benchmark_version": BENCHMARK_VERSION,
        "n": n,
        "size": size,
        "fields": [{"seed": seed, "preset": preset} for seed, preset, _ in fields],
        "models": models,
        "hard_subset": {
            "definition": {
                "cnr_below": M.HARD_CNR_THRESHOLD,
                "in_section_below": M.HARD_IN_SECTION_THRESHOLD,
                "distractor_radius_um": M.DISTRACTOR_RADIUS_UM,
                "iou": 0.5,
            },
            "models": {name: _hard_summary(r) for name, r in models.items()},
        },
        "settings": {
            "norm_percentiles": list(M.NORM_PERCENTILES),
            "ssim": {
                "gaussian_weights": True,
                "sigma": 1.5,
                "use_sample_covariance": False,
                "data_range": 1.0,
            },
            "segmentation": {
                "sigma_px": M.SEG_SIGMA_PX,
                "peak_min_distance_um": M.SEG_PEAK_MIN_DISTANCE_UM,
                "peak_h_um": M.SEG_PEAK_H_UM,
                "min_area_um2": M.SEG_MIN_AREA_UM2,
                "min_contrast": M.SEG_MIN_CONTRAST,
            },
            "weights_dir": str(wdir) if wdir else None,
            "quick": bool(quick),
            "guidance": guidance,
        },
        "comparisons": {
            f"{a} - {b}": compare_rows(models[a], models[b])
            for a, b in COMPARISONS
            if a in models and b in models
        },
        "skipped": skipped,
        "device": dev,
    }
    result["seconds"] = round(time.perf_counter() - t_start, 2)
    print(format_table(result), flush=True)
    if json_path is not None:
        _write_json_atomic(Path(json_path), result)
        _log(f"wrote {json_path}")
    _require_a_model(rows, skipped)
    return result


def _require_a_model(rows: Sequence[Row], skipped: dict[str, str]) -> None:
    """Raise when every model row was skipped (the table would hold only oracle/baseline)."""
    model_rows = [r.name for r in rows if r.model is not None]
    if model_rows and all(name in skipped for name in model_rows):
        raise FileNotFoundError(
            "no model could be evaluated (only the oracle and the baseline ran): "
            f"{skipped[model_rows[0]]}. Build weights with `lcm-stain train --package`, or pass "
            "weights_dir= a training output folder"
        )


# ------------------------------------------------------------------ held-out instrument suite

#: Bump when a variant, the seeds or the fields change. v2: held-out tissue families,
#: through-focus retrieval outside training's settings, 0.25 and 1.24 µm/px with and without
#: metadata (without: the pixel-size estimator), everything at once.
SUITE_VERSION = 2
#: Field i of every variant uses seed SUITE_SEED0 + i and preset BENCHMARK_PRESETS[i % 2]: the
#: same tissue under every instrument. Disjoint from training (seed·100 000 + i, i < a few
#: hundred) and from the v1 benchmark (900 000 + i).
SUITE_SEED0 = 950_000
SUITE_DEFAULT_N, SUITE_DEFAULT_SIZE = 8, 256
SUITE_ROWS: tuple[Row, ...] = (
    ORACLE,
    Row("lcm-1", "lcm", 1),
    Row("lcm-4", "lcm", 4),
    Row("teacher-1", "teacher", 1),
    Row("pix2pix", "pix2pix", None),
)
#: rad → nm of optical path at the benchmark's 720 nm: φ·λ/2π.
NM_PER_RAD = 720.0 / (2 * math.pi)


@dataclass(frozen=True)
class InstrumentVariant:
    """An instrument that training never samples (outside `simulate.DOMAIN_RANGES`, or a
    structurally different forward model / input convention)."""

    name: str
    description: str  # one line, for the model card table
    overrides: tuple[tuple[str, Any], ...] = ()  # SimParams fields replaced on each preset
    phase_scale: float = 1.0  # the phase handed to the model is multiplied by this (units)
    coarsen: int = 1  # native sampling this many times coarser, over the same area
    # False: stain() gets no pixel size (no metadata) and estimates it (pixel_size="auto")
    pixel_size_known: bool = True
    pixel_size_um: float | None = None  # native µm/px over the same area (instead of coarsen)


#: Through-focus settings outside `simulate.TISSUE_RANGES` (the suite's held-out retrieval).
#: No speckle: at the suite's brain-20x optics speckle of rms ≥ 0.04 already drowns the phase
#: contrast of the stack (the retrieved phase correlates 0.34 with the DPC phase of the same field,
#: 0.76 without speckle at these settings), which would test the noise, not the retrieval.
TF_HELD_OUT: tuple[tuple[str, Any], ...] = (
    ("reconstruction", "through-focus"),
    ("tf_defocus_um", 6.0),
    ("tf_residual_defocus_um", 0.8),
    ("tf_speckle", 0.0),
    ("tf_alpha", 0.08),
    ("tf_lowcut_um", 5.0),
)

IN_DOMAIN = InstrumentVariant(
    "in-domain",
    "the benchmark presets (brain-20x / tumour-dense-20x): 0.414 µm/px, phase in rad, pixel "
    "size given",
)
INSTRUMENT_VARIANTS: tuple[InstrumentVariant, ...] = (
    InstrumentVariant(
        "single-axis-dpc",
        "one DPC axis (x pair only): structure that varies only along y is invisible",
        overrides=(("dpc_axes", "x"),),
    ),
    InstrumentVariant(
        "gradient-recon",
        "another reconstruction: DPC integrated as a pure phase gradient, no WOTF deconvolution",
        overrides=(("reconstruction", "gradient"),),
    ),
    InstrumentVariant(
        "phase-nm",
        f"phase given as optical path in nm (×λ/2π = ×{NM_PER_RAD:.1f}), not rad",
        phase_scale=NM_PER_RAD,
    ),
    InstrumentVariant(
        "coarse-2x-meta",
        "2× coarser sampling (0.828 µm/px, training ≤ 0.8) with the pixel size given: the "
        "engine resamples",
        coarsen=2,
    ),
    InstrumentVariant(
        "coarse-2x-nometa",
        "2× coarser sampling with no pixel size: nuclei look half their size (training ×0.75–1.35)",
        coarsen=2,
        pixel_size_known=False,
    ),
    InstrumentVariant(
        "low-light",
        "300 photons per pixel and capture, 8 e⁻ read noise (training 2 000–30 000, ≤ 6 e⁻)",
        overrides=(("photons", 300.0), ("read_noise_e", 8.0)),
    ),
    InstrumentVariant(
        "rosettes",
        "tissue family never trained on: rings of radially oriented nuclei around a fibrillary "
        "core (tissue.HELD_OUT_FAMILIES)",
        overrides=(("layout", "rosette"),),
    ),
    InstrumentVariant(
        "perivascular-cuffs",
        "tissue family never trained on: vessels wrapped in layers of packed small round "
        "lymphocytes",
        overrides=(("layout", "cuff"),),
    ),
    InstrumentVariant(
        "through-focus",
        "through-focus stack at ±6 µm (training ±1–4), focus error 0.8 µm (≤ 0.5), α 0.08 (≤ "
        "0.05), low cut 5 µm (≥ 6)",
        overrides=TF_HELD_OUT,
    ),
    InstrumentVariant(
        "px-0.25-meta",
        "0.25 µm/px (40×-class) with the pixel size given: the engine resamples",
        pixel_size_um=0.25,
    ),
    InstrumentVariant(
        "px-0.25-nometa",
        "0.25 µm/px with no pixel size: the engine estimates it",
        pixel_size_um=0.25,
        pixel_size_known=False,
    ),
    InstrumentVariant(
        "px-1.24-meta",
        "1.24 µm/px (3× the model's, training ≤ 1.0) with the pixel size given",
        pixel_size_um=1.24,
    ),
    InstrumentVariant(
        "px-1.24-nometa",
        "1.24 µm/px with no pixel size: the engine estimates it",
        pixel_size_um=1.24,
        pixel_size_known=False,
    ),
    InstrumentVariant(
        "everything",
        "rosettes, the held-out through-focus retrieval, 0.83 µm/px without metadata and 1 000 "
        "photons, at once",
        overrides=(("layout", "rosette"), *TF_HELD_OUT, ("photons", 1000.0)),
        pixel_size_um=0.828,
        pixel_size_known=False,
    ),
)


def suite_fields(variant: InstrumentVariant, n: int, size: int) -> list[Any]:
    """The ``n`` fields of one variant: ``size``² at 0.414 µm/px, or the same area at the
    variant's pixel size."""
    import dataclasses

    from . import simulate

    out = []
    for i in range(n):
        base = simulate.get_preset(BENCHMARK_PRESETS[i % len(BENCHMARK_PRESETS)])
        px = variant.pixel_size_um or base.pixel_size * variant.coarsen
        p = dataclasses.replace(base, pixel_size=px, **dict(variant.overrides))
        side = max(8, round(size * base.pixel_size / px))
        s = simulate.simulate_pair(p, size=side, seed=SUITE_SEED0 + i)
        if variant.phase_scale != 1.0:
            s = dataclasses.replace(s, qobm=(s.qobm * variant.phase_scale).astype(np.float32))
        out.append(s)
    return out


def _estimator_errors(samples: Sequence[Any]) -> dict[str, Any]:
    """The pixel-size estimator on fields whose true pixel size is known: relative errors."""
    from .pixel_size_estimate import estimate_pixel_size

    samples = [s for s in samples if min(np.shape(s.qobm)[-2:]) >= 32]  # (tiny test fields)
    est = [estimate_pixel_size(s.qobm) for s in samples]
    err = [abs(e / s.pixel_size - 1) for e, s in zip(est, samples)]
    return {
        "true_um": [float(s.pixel_size) for s in samples],
        "estimated_um": [round(float(e), 4) for e in est],
        "rel_errors": [round(float(e), 4) for e in err],
        "median_rel_error": float(np.median(err)) if err else None,
        "p90_rel_error": float(np.quantile(err, 0.9)) if err else None,
    }


def _suite_summary(in_domain: dict[str, Any], models: dict[str, Any]) -> dict[str, Any]:
    """LCM-1 F1 / oracle F1 on a variant vs in-domain (target ≥ 0.8), and LCM-1 vs Pix2Pix F1."""

    def rel(m: dict[str, Any]) -> float | None:
        if "lcm-1" not in m or "oracle" not in m or m["oracle"]["f1"] <= 0:
            return None
        return m["lcm-1"]["f1"] / m["oracle"]["f1"]

    r, r0 = rel(models), rel(in_domain)
    out: dict[str, Any] = {
        "lcm1_f1_over_oracle": r,
        "vs_in_domain": (r / r0) if (r is not None and r0) else None,
        "lcm1_minus_pix2pix_f1": (
            models["lcm-1"]["f1"] - models["pix2pix"]["f1"]
            if "lcm-1" in models and "pix2pix" in models
            else None
        ),
    }
    out["meets_target"] = (
        out["vs_in_domain"] is not None
        and out["lcm1_minus_pix2pix_f1"] is not None
        and out["vs_in_domain"] >= 0.8
        and out["lcm1_minus_pix2pix_f1"] > 0
    )
    return out


def format_suite_table(result: dict[str, Any]) -> str:
    """One line per variant: F1 (and SSIM) of every model, LCM-1's relative F1 and the target."""
    names = [r.name for r in SUITE_ROWS]
    groups = {"in-domain": result["in_domain"], **result["variants"]}
    w0 = max(len(k) for k in groups)
    head = ["variant".ljust(w0)] + [f"{m:>13s}" for m in names] + ["  rel.F1", " ÷in-dom", " ok"]
    lines = [
        f"lcm-stain evaluate --suite instruments · v{result['suite_version']} · {result['n']} "
        f"fields of {result['size']}² per variant · device {result['device']}",
        " ".join(head),
    ]
    lines.append("-" * len(lines[-1]))
    for name, g in groups.items():
        cells = []
        for m in names:
            r = g["models"].get(m)
            cells.append(f"{'skipped':>13s}" if r is None else f"{r['f1']:.3f} / {r['ssim']:.3f}")
        sm = g.get("summary") or _suite_summary(result["in_domain"]["models"], g["models"])
        rel = (
            "     n/a" if sm["lcm1_f1_over_oracle"] is None else f"{sm['lcm1_f1_over_oracle']:8.3f}"
        )
        vs = "     n/a" if sm["vs_in_domain"] is None else f"{sm['vs_in_domain']:8.3f}"
        ok = "" if name == "in-domain" else (" yes" if sm["meets_target"] else "  no")
        lines.append(" ".join([name.ljust(w0), *(f"{c:>13s}" for c in cells), rel, vs, ok]))
    lines.append(
        "cells: nuclei F1 / SSIM (mean over fields); rel.F1 = LCM-1 F1 / oracle F1; ÷in-dom = "
        "that over the in-domain rel.F1; ok = ÷in-dom ≥ 0.8 and LCM-1 F1 > Pix2Pix F1."
    )
    pe = result.get("pixel_size_estimator")
    if pe:
        lines.append(
            f"pixel-size estimator on the {pe['n']} fields without metadata: median error "
            f"{pe['median_rel_error']:.1%}, 90th percentile {pe['p90_rel_error']:.1%} "
            "(target ≤ 10 % / ≤ 25 %)"
        )
    for name, g in groups.items():
        lines.append(f"  {name}: {g['description']}")
        for row, why in g.get("skipped", {}).items():
            lines.append(f"    skipped {row}: {why}")
    return "\n".join(lines)


def format_suite_markdown(result: dict[str, Any]) -> str:
    """The suite as a markdown table for the model card: one row per variant with its one-line
    description, nuclei F1 of every model, LCM-1 SSIM and the target columns."""
    names = [r.name for r in SUITE_ROWS]
    head = ["variant", "what it is", *(f"{m} F1" for m in names), "lcm-1 SSIM"]
    head += ["LCM-1/oracle F1", "÷ in-domain", "target met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups = {"in-domain": result["in_domain"], **result["variants"]}
    for name, g in groups.items():
        m = g["models"]
        sm = g.get("summary") or _suite_summary(result["in_domain"]["models"], m)
        cells = [f"`{name}`", g["description"]]
        cells += [f"{m[k]['f1']:.3f}" if k in m else "skipped" for k in names]
        cells.append(f"{m['lcm-1']['ssim']:.3f}" if "lcm-1" in m else "skipped")
        for key in ("lcm1_f1_over_oracle", "vs_in_domain"):
            cells.append("n/a" if sm[key] is None else f"{sm[key]:.2f}")
        cells.append("—" if name == "in-domain" else ("yes" if sm["meets_target"] else "no"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_instrument_suite(
    json_path: str | os.PathLike | None = None,
    n: int | None = None,
    size: int | None = None,
    device: str = "auto",
    quick: bool = False,
    weights_dir: str | os.PathLike | None = None,
    guidance: float | None = None,
) -> dict[str, Any]:
    """Score ``SUITE_ROWS`` on the in-domain fields and every held-out instrument variant; print
    the table, optionally write JSON (atomically); return the result. ``guidance``: the latent
    rows' guidance (None: each model's default)."""
    t_start = time.perf_counter()
    n, size, wdir, dev = _run_settings(
        n, size, quick, weights_dir, device, SUITE_DEFAULT_N, SUITE_DEFAULT_SIZE
    )
    cache: dict[tuple[Any, ...], list[Any]] = {}
    groups: dict[str, dict[str, Any]] = {}
    for v in (IN_DOMAIN, *INSTRUMENT_VARIANTS):
        key = (v.overrides, v.coarsen, v.phase_scale, v.pixel_size_um)
        if key not in cache:
            cache[key] = suite_fields(v, n, size)
        _log(f"lcm-stain evaluate --suite instruments: {v.name} ({n} fields)")
        models, skipped = evaluate_rows(
            cache[key], SUITE_ROWS, device=device, weights_dir=wdir, log=_log,
            pixel_size_known=v.pixel_size_known, guidance=guidance,
        )  # fmt: skip
        groups[v.name] = {"description": v.description, "models": models, "skipped": skipped}
        if not v.pixel_size_known:
            groups[v.name]["pixel_size_estimator"] = _estimator_errors(cache[key])
    in_domain = groups.pop(IN_DOMAIN.name)
    for g in groups.values():
        g["summary"] = _suite_summary(in_domain["models"], g["models"])
    result: dict[str, Any] = {
        "suite": "instruments",
        "suite_version": SUITE_VERSION,
        "n": n,
        "size": size,
        "fields": [
            {"seed": SUITE_SEED0 + i, "preset": BENCHMARK_PRESETS[i % len(BENCHMARK_PRESETS)]}
            for i in range(n)
        ],
        "variants": groups,
        "in_domain": in_domain,
        "weights_dir": str(wdir) if wdir else None,
        "guidance": guidance,
        "device": dev,
    }
    pooled = [e for g in groups.values() for e in g.get("pixel_size_estimator", {}).get(
        "rel_errors", [])]  # fmt: skip
    if pooled:  # target: median ≤ 10 %, 90th percentile ≤ 25 %
        result["pixel_size_estimator"] = {
            "n": len(pooled),
            "median_rel_error": float(np.median(pooled)),
            "p90_rel_error": float(np.quantile(pooled, 0.9)),
        }
    result["seconds"] = round(time.perf_counter() - t_start, 2)
    print(format_suite_table(result), flush=True)
    if json_path is not None:
        _write_json_atomic(Path(json_path), result)
        _log(f"wrote {json_path}")
    _require_a_model(SUITE_ROWS, in_domain["skipped"])
    return result


# ------------------------------------------------------------------ fine-tuning on a new instrument

SHIFT_PRESET = "shifted-20x"
SHIFT_TRAIN_SEED = 777
#: the pairs of a several-pair check (since 0.1.0): the one pair first, then seeds after the held ones
SHIFT_TRAIN_SEEDS: tuple[int, ...] = (SHIFT_TRAIN_SEED, 794, 795, 796)
#: 16 held-out fields (since 0.0.7; it was 4): on four 256² fields a model's per-field F1 swung by
#: up to ±0.4 after one-pair fine-tuning, which decided the check alone (docs/experiments.md)
SHIFT_HELD_SEEDS: tuple[int, ...] = tuple(range(778, 794))


def finetune_shift_check(
    model: str = "lcm",
    steps: int = 300,
    lr: float = 2e-4,
    patch: int = 128,
    train_size: int = 512,
    held_size: int = 256,
    device: str = "cpu",
    pairs: int = 1,
) -> dict[str, Any]:
    """Fine-tune on paired fields of the shifted instrument; score held-out fields of it.

    The fixed protocol behind the "fine-tuning helps" claim: `pairs` `train_size`² pairs (seeds
    `SHIFT_TRAIN_SEEDS`; one = seed 777, validated on its bottom strip; four = one whole pair
    validates, as `finetune` holds out every fourth) as a user would give, and 16 `held_size`²
    fields (seeds 778-793) never seen in fine-tuning. Returns mean and per-field Pearson / nuclei
    F1 before and after, plus the run's validation record.
    """
    from . import simulate
    from .finetune import run_finetune
    from .sampling import load_predictor

    if not 1 <= pairs <= len(SHIFT_TRAIN_SEEDS):
        raise ValueError(f"pairs must be 1-{len(SHIFT_TRAIN_SEEDS)}, got {pairs}")
    train = [simulate.simulate_pair(SHIFT_PRESET, size=train_size, seed=s)
             for s in SHIFT_TRAIN_SEEDS[:pairs]]  # fmt: skip
    held = [simulate.simulate_pair(SHIFT_PRESET, size=held_size, seed=s) for s in SHIFT_HELD_SEEDS]
    res = run_finetune(
        [t.qobm for t in train], [t.dapi for t in train],
        model=model, steps=steps, lr=lr, patch=patch, seed=0, device=device,
    )  # fmt: skip

    def score(predictor) -> dict[str, Any]:
        rows = []
        for s in held:
            pred = _stain(s.qobm, model=predictor, pixel_size=s.pixel_size, device=device)
            m = M.image_metrics(pred, s.dapi, true_labels=s.nuclei, pixel_size=s.pixel_size)
            rows.append({"pearson": float(m["pearson"]), "f1": float(m["f1"])})
        return {
            "pearson": float(np.mean([r["pearson"] for r in rows])),
            "f1": float(np.mean([r["f1"] for r in rows])),
            "per_field": rows,
        }

    return {
        "protocol": {
            "preset": SHIFT_PRESET,
            "train_seeds": list(SHIFT_TRAIN_SEEDS[:pairs]),
            "train_size": train_size,
            "held_seeds": list(SHIFT_HELD_SEEDS),
            "held_size": held_size,
            "steps": steps,
            "lr": lr,
            "patch": patch,
        },
        "before": score(load_predictor(model, 1, device)),
        "after": score(res.predictor(device)),
        "best_step": res.best_step,
        "validation_before": res.metrics_before,
        "validation_after": res.metrics_after,
        "result": res,
    }
