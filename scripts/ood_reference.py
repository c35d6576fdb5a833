"""Build and measure the out-of-distribution reference, `weights/ood_reference.json`.

    python scripts/ood_reference.py                # build from the training presets, write JSON
    python scripts/ood_reference.py --measure      # false alarms and detections of that JSON
    python scripts/ood_reference.py --measure --json docs/results/ood.json

The reference is the per-feature median and robust spread (1.4826 MAD, floored) of
`napari_lcm_stain.ood.features` on simulated training-like fields, and a threshold on the score
(the larger of the value and spatial features' root-mean-square robust z-scores, `ood.GROUPS`):
THRESHOLD_FACTOR × the largest score among the reference fields themselves, rounded up to 0.1.

The training distribution is a parameter: ``--presets`` (simulator presets, alternating field by
field) or ``--sampler module:function``, a callable ``f(seed, size) -> (phase 2-D array, µm/px)``
(e.g. a domain-randomised sampler), so the reference can be re-made for new training data. Use the
same ``--presets``/``--sampler`` with ``--measure`` to score held-out fields of that distribution.

Seeds: reference fields REFERENCE_SEED0 + i, held-out in-domain fields HOLDOUT_SEED0 + i, wrong
inputs WRONG_SEED0 + ...: all disjoint from training (seed·100000 + i, small seeds), the v1
benchmark (900000 + i) and the fine-tune check (777-781).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from napari_lcm_stain import ood
from napari_lcm_stain._version import __version__

REFERENCE_SEED0 = 500_000
HOLDOUT_SEED0 = 600_000
WRONG_SEED0 = 610_000
DEFAULT_PRESETS = ("brain-20x", "tumour-dense-20x")
#: Reference field sizes, cycled: mostly the training field size, some larger fields.
REFERENCE_SIZES = (256, 256, 256, 512)
HOLDOUT_SIZE = 256
#: Floors on a feature's spread (the fraction of equal neighbours is exactly 0 on float data).
SPREAD_FLOORS = {"flat": 0.05}
MIN_SPREAD = 1e-3
#: threshold = THRESHOLD_FACTOR × the largest reference score, rounded up to 0.1.
THRESHOLD_FACTOR = 1.25

Sampler = Callable[[int, int], tuple[np.ndarray, float]]


def preset_sampler(presets: tuple[str, ...]) -> Sampler:
    """Fields of the simulator presets, alternating by seed (seed % len(presets))."""
    from napari_lcm_stain.simulate import simulate_pair

    def sample(seed: int, size: int) -> tuple[np.ndarray, float]:
        s = simulate_pair(presets[seed % len(presets)], size=size, seed=seed)
        return s.qobm, s.pixel_size

    return sample


def load_sampler(spec: str) -> Sampler:
    """``module:function`` -> the callable."""
    mod, _, fn = spec.partition(":")
    if not mod or not fn:
        raise SystemExit(f"--sampler must be module:function, got {spec!r}")
    return getattr(importlib.import_module(mod), fn)


def build_reference(sampler: Sampler, n: int, describe: str, quantile: float = 1.0) -> dict:
    """Median/spread per feature over n fields, and the threshold (see module docstring).

    ``quantile`` < 1 bases the threshold on that quantile of the reference scores instead of their
    maximum (for a very diverse training set whose rare extreme fields would loosen it too much).
    """
    rows, pxs = [], []
    for i in range(n):
        plane, px = sampler(REFERENCE_SEED0 + i, REFERENCE_SIZES[i % len(REFERENCE_SIZES)])
        pxs.append(float(px))
        rows.append(plane)
    ref_px = float(np.median(pxs))
    feats = np.array(
        [[ood.features(p, px, ref_px)[f] for f in ood.FEATURES] for p, px in zip(rows, pxs)]
    )
    stats = {}
    for j, name in enumerate(ood.FEATURES):
        col = feats[:, j][np.isfinite(feats[:, j])]
        center = float(np.median(col))
        spread = max(1.4826 * float(np.median(np.abs(col - center))), SPREAD_FLOORS.get(name, 0.0))
        stats[name] = {"center": round(center, 6), "spread": round(max(spread, MIN_SPREAD), 6)}
    ref = {"pixel_size": ref_px, "threshold": math.inf, "features": stats}
    scores = [ood.ood_score(p, px, ref)["score"] for p, px in zip(rows, pxs)]
    base = float(np.quantile(scores, quantile))
    ref["threshold"] = math.ceil(THRESHOLD_FACTOR * base * 10) / 10
    ref.update(
        version=1,
        package_version=__version__,
        score="max over ood.GROUPS of the root-mean-square robust z-score (value - center) / spread",
        threshold_rule=(
            f"{THRESHOLD_FACTOR} x the largest reference score, rounded up to 0.1"
            if quantile >= 1.0
            else f"{THRESHOLD_FACTOR} x the {quantile:g} quantile of the reference scores, "
            "rounded up to 0.1"
        ),
        reference_max_score=round(max(scores), 3),
        built_from={
            "sampler": describe,
            "n": n,
            "seeds": [REFERENCE_SEED0, REFERENCE_SEED0 + n - 1],
            "sizes": list(REFERENCE_SIZES),
        },
    )
    return ref


# ------------------------------------------------------------------------------ measurement
def _brightfield(nuclei, distractors, rng, falloff: bool) -> np.ndarray:
    """Positive transmitted intensity: absorbing nuclei and debris, shot noise, optional vignette."""
    from scipy import ndimage

    absorb = ndimage.gaussian_filter((nuclei > 0) * 0.5 + (distractors > 0) * 0.3, 1.0)
    h, w = nuclei.shape
    yy, xx = np.mgrid[:h, :w]
    illum = 1 - 0.4 * ((yy / h - 0.5) ** 2 + (xx / w - 0.5) ** 2) if falloff else 1.0
    return rng.poisson(2000 * illum * np.exp(-absorb)).astype(np.float32) / 2000


def wrong_inputs(n: int, presets: tuple[str, ...]) -> dict[str, list[tuple[np.ndarray, float]]]:
    """Inputs the score must flag (and, last, the mild shift it reports): name -> (plane, px)."""
    from skimage.transform import rescale

    from napari_lcm_stain.simulate import PRESETS, get_preset, simulate_pair

    cases: dict[str, list] = {}
    fixed = [p for p in presets if p in PRESETS] or list(DEFAULT_PRESETS)  # not "domain-random"

    def add(name, plane, px=None):
        cases.setdefault(name, []).append((plane, px))

    for i in range(n):
        p = fixed[i % len(fixed)]
        rng = np.random.default_rng(WRONG_SEED0 + i)
        s = simulate_pair(p, size=256, seed=WRONG_SEED0 + i)
        add("DAPI image as phase", s.dapi)
        add(
            "brightfield-like (absorption, fall-off)",
            _brightfield(s.nuclei, s.distractors, rng, True),
        )
        add(
            "brightfield-like (absorption, even light)",
            _brightfield(s.nuclei, s.distractors, rng, False),
        )
        add("pure noise (Gaussian, float)", rng.standard_normal((256, 256)).astype(np.float32))
        add("pure noise (Poisson counts, uint16)", rng.poisson(50, (256, 256)).astype(np.uint16))
        add("label image (nuclei labels)", s.nuclei)
        coarse = dataclasses.replace(get_preset(p), pixel_size=3 * get_preset(p).pixel_size)
        add(
            "pixel size 3x coarser, no metadata",
            simulate_pair(coarse, 256, WRONG_SEED0 + n + i).qobm,
        )
        big = simulate_pair(p, size=768, seed=WRONG_SEED0 + 2 * n + i).qobm
        add("down-sampled by 3, no metadata", rescale(big, 1 / 3, anti_aliasing=True))
    return cases


def other_inputs(n: int, presets: tuple[str, ...]) -> dict[str, list[tuple[np.ndarray, float]]]:
    """Reported, not required: a mild shift, and in-domain data in other guises."""
    from skimage.transform import rescale

    from napari_lcm_stain.simulate import simulate_pair

    cases: dict[str, list] = {}
    for i in range(n):
        seed = WRONG_SEED0 + 3 * n + i
        s = simulate_pair("shifted-20x", size=256, seed=seed)
        cases.setdefault("shifted-20x (mild shift)", []).append((s.qobm, None))
        q = simulate_pair(presets[i % len(presets)], size=512, seed=seed).qobm
        cases.setdefault("in-domain 512² fields", []).append((q, None))
        u8 = np.round((q - q.min()) / (q.max() - q.min()) * 255).astype(np.uint8)
        cases.setdefault("in-domain, 8-bit quantised", []).append((u8, None))
        cases.setdefault("in-domain, x100 + 7 (nm-like units)", []).append((q * 100 + 7, None))
        s60 = simulate_pair("brain-60x", size=768, seed=seed)
        cases.setdefault("brain-60x, pixel size given", []).append((s60.qobm, s60.pixel_size))
        cases.setdefault("brain-60x, no metadata (3x finer)", []).append((s60.qobm, None))
        del s60
        cases.setdefault("in-domain down-sampled by 2, pixel size given", []).append(
            (rescale(q, 1 / 2, anti_aliasing=True), 2 * s.pixel_size)
        )
    return cases


def _rate(planes, ref) -> dict:
    res = [ood.ood_score(p, px, ref) for p, px in planes]
    scores = np.array([r["score"] for r in res], float)
    return {
        "n": len(res),
        "flagged": int(sum(r["flag"] for r in res)),
        "rate": round(float(np.mean([r["flag"] for r in res])), 4),
        "score_min": round(float(scores.min()), 2),
        "score_median": round(float(np.median(scores)), 2),
        "score_max": round(float(scores.max()), 2),
    }


def measure(ref: dict, sampler: Sampler, n_holdout: int, n_case: int, presets) -> dict:
    t0 = time.perf_counter()
    hold = [sampler(HOLDOUT_SEED0 + i, HOLDOUT_SIZE) for i in range(n_holdout)]
    out = {
        "threshold": ref["threshold"],
        "reference": ref.get("built_from"),
        "false_alarms": {"in-domain held-out fields": _rate(hold, ref)},
        "must_flag": {k: _rate(v, ref) for k, v in wrong_inputs(n_case, presets).items()},
        "reported": {k: _rate(v, ref) for k, v in other_inputs(n_case, presets).items()},
    }
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def format_table(result: dict) -> str:
    """Markdown table of a `measure` result (also: `format_table(json.load(open(PATH)))`)."""
    lines = [
        f"threshold {result['threshold']:g} (score = max over groups of RMS robust z-scores)",
        "",
        "| case | input | fields | flagged | score min / median / max |",
        "|---|---|---:|---:|---|",
    ]
    for group, title in (
        ("false_alarms", "in-domain"),
        ("must_flag", "must flag"),
        ("reported", "reported"),
    ):
        for name, r in result[group].items():
            lines.append(
                f"| {title} | {name} | {r['n']} | {r['flagged']} ({100 * r['rate']:.0f} %) | "
                f"{r['score_min']:.1f} / {r['score_median']:.1f} / {r['score_max']:.1f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--measure", action="store_true", help="measure rates instead of building")
    ap.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS))
    ap.add_argument("--sampler", default=None, help="module:function(seed, size) -> (plane, px)")
    ap.add_argument("--n", type=int, default=128, help="reference fields (build)")
    ap.add_argument(
        "--threshold-quantile",
        type=float,
        default=1.0,
        help="threshold from this quantile of the reference scores (default 1: their maximum)",
    )
    ap.add_argument("--n-holdout", type=int, default=64, help="held-out in-domain fields")
    ap.add_argument("--n-case", type=int, default=32, help="fields per wrong-input case")
    ap.add_argument("--out", default=str(ood.REFERENCE_PATH), help="reference JSON (build)")
    ap.add_argument(
        "--reference", default=None, help="reference JSON to measure (default: packaged)"
    )
    ap.add_argument("--json", default=None, help="write the measurement here")
    a = ap.parse_args(argv)
    presets = tuple(a.presets)
    sampler = load_sampler(a.sampler) if a.sampler else preset_sampler(presets)
    describe = a.sampler or "presets:" + ",".join(presets)
    if not a.measure:
        from napari_lcm_stain.checkpoints import atomic_write_bytes

        ref = build_reference(sampler, a.n, describe, a.threshold_quantile)
        atomic_write_bytes(Path(a.out), (json.dumps(ref, indent=2) + "\n").encode())
        print(f"wrote {a.out}: threshold {ref['threshold']} (max reference score "
              f"{ref['reference_max_score']})")  # fmt: skip
        return 0
    ref = ood.load_reference(a.reference)
    result = measure(ref, sampler, a.n_holdout, a.n_case, presets)
    print(format_table(result))
    if a.json:
        from napari_lcm_stain.checkpoints import atomic_write_bytes

        atomic_write_bytes(Path(a.json), (json.dumps(result, indent=2) + "\n").encode())
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
