"""Picture and numbers for docs/simulator.md.

    python experiments/make_sim_figure.py                 # writes docs/images/simulated_pair.png
    python experiments/make_sim_figure.py --bench         # timing of one 512² pair per preset
    python experiments/make_sim_figure.py --stats         # hard-subset statistics per preset
    python experiments/make_sim_figure.py --domain        # writes docs/images/domain_random.png
    python experiments/make_sim_figure.py --domain-table  # the DOMAIN_RANGES table (markdown)
    python experiments/make_sim_figure.py --domain-bench  # timing of simulate_training_pair, 256²

The figure shows, per row (brain-20x, tumour-dense-20x), the qOBM phase, the DAPI ground truth and
the nucleus labels (colours) with distractor outlines (red) and hard nuclei outlined in yellow.
The domain figure shows qOBM | DAPI pairs of `simulate_training_pair` for six seeds, each with the
instrument it drew.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from napari_lcm_stain import simulate as S

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "images" / "simulated_pair.png"
DOMAIN_OUT = ROOT / "docs" / "images" / "domain_random.png"
HARD_CNR = 1.0  # |CNR| below this: "near-zero contrast" (metrics.HARD_CNR_THRESHOLD)
HARD_IN_SECTION = 0.5  # in-section fraction below this (metrics.HARD_IN_SECTION_THRESHOLD)


def make_figure(out: Path = OUT, size: int = 320, seed: int = 7) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.color import label2rgb
    from skimage.segmentation import find_boundaries

    rows = ["brain-20x", "tumour-dense-20x"]
    fig, axes = plt.subplots(len(rows), 3, figsize=(9.6, 3.3 * len(rows)), dpi=100)
    for r, preset in enumerate(rows):
        s = S.simulate_pair(preset, size=size, seed=seed)
        ext = [0, size * s.pixel_size, size * s.pixel_size, 0]
        ax = axes[r]
        ax[0].imshow(s.qobm, cmap="gray", vmin=-0.3, vmax=0.5, extent=ext)
        ax[0].set_title(f"{preset}: qOBM phase (−0.3…0.5 rad)", fontsize=9)
        ax[1].imshow(s.dapi, cmap="gray", vmin=0, vmax=1, extent=ext)
        ax[1].set_title("DAPI ground truth (fixed 0–1 scale)", fontsize=9)
        rgb = label2rgb(s.nuclei, bg_label=0, bg_color=(0, 0, 0))
        hard = (np.abs(s.nucleus_cnr) < HARD_CNR) | (s.nucleus_in_section < HARD_IN_SECTION)
        hard_mask = np.isin(s.nuclei, np.flatnonzero(hard) + 1)
        rgb[find_boundaries(s.nuclei * hard_mask, mode="inner")] = (1, 1, 0)
        rgb[find_boundaries(s.distractors, mode="inner")] = (1, 0, 0)
        ax[2].imshow(rgb, extent=ext, interpolation="nearest")
        ax[2].set_title(
            f"{s.nuclei.max()} nuclei ({hard.sum()} hard, yellow); distractors red", fontsize=9
        )
        for a in ax:
            a.set_xticks([])
            a.set_yticks([])
        ax[0].set_ylabel(f"{size * s.pixel_size:.0f} µm", fontsize=8)
    return _save(fig, out)


def _save(fig, out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=88)
    plt.close(fig)
    _quantise_png(Path(tmp))
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    return out


def _quantise_png(path: Path) -> None:
    """Shrink the PNG with a 256-colour palette if Pillow is available (keeps the doc repo small)."""
    try:
        from PIL import Image
    except ImportError:
        return
    im = Image.open(path).convert("RGB").quantize(colors=256, dither=Image.Dither.NONE)
    im.save(path, optimize=True)


def bench(size: int = 512, repeats: int = 5) -> None:
    """Wall and CPU time of one simulate_pair call per preset (median of ``repeats`` seeds)."""
    print(f"simulate_pair size={size}, median of {repeats} seeds (after one warm-up call)")
    for preset in S.PRESETS:
        S.simulate_pair(preset, size=size, seed=0)
        wall, cpu = [], []
        for seed in range(1, repeats + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            S.simulate_pair(preset, size=size, seed=seed)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        print(
            f"  {preset:18s} wall {np.median(wall):.3f} s (min {min(wall):.3f})  "
            f"cpu {np.median(cpu):.3f} s"
        )


def stats(size: int = 512, n: int = 8) -> None:
    """Per preset: nuclei per field, near-zero-CNR / out-of-section / hard fractions."""
    print(f"hard subset over {n} fields of {size}² (seeds 0..{n - 1})")
    for preset in S.PRESETS:
        cnr, ins, counts, nd = [], [], [], []
        for seed in range(n):
            s = S.simulate_pair(preset, size=size, seed=seed)
            cnr.append(s.nucleus_cnr)
            ins.append(s.nucleus_in_section)
            counts.append(int(s.nuclei.max()))
            nd.append(int(s.distractors.max()))
        c, i = np.concatenate(cnr), np.concatenate(ins)
        lo = np.abs(c) < HARD_CNR
        out = i < HARD_IN_SECTION
        print(
            f"  {preset:18s} nuclei/field {np.mean(counts):6.1f}  distractors/field "
            f"{np.mean(nd):5.1f}  |CNR|<{HARD_CNR:g}: {lo.mean():.2f}  CNR>0: {(c > 0).mean():.2f}"
            f"  in_section<{HARD_IN_SECTION:g}: {out.mean():.2f}  hard (either): "
            f"{(lo | out).mean():.2f}  median |CNR| {np.median(np.abs(c)):.1f}"
        )


def make_domain_figure(out: Path = DOMAIN_OUT, size: int = 256, seeds=range(6)) -> Path:
    """qOBM | DAPI of `simulate_training_pair(seed, size)` for each seed, three pairs per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = list(seeds)
    rows = (len(seeds) + 2) // 3
    fig, axes = plt.subplots(rows, 6, figsize=(15.0, 3.2 * rows), dpi=100, squeeze=False)
    for k, seed in enumerate(seeds):
        s = S.simulate_training_pair(seed, size)
        p = s.params
        ax = axes[k // 3, 2 * (k % 3) : 2 * (k % 3) + 2]
        lo, hi = np.percentile(s.qobm, (1, 99))
        ax[0].imshow(s.qobm, cmap="gray", vmin=lo, vmax=hi)
        ax[0].set_title(
            f"seed {seed}: qOBM, {p.qobm_pixel_size or p.pixel_size:.2f} µm/px camera\n"
            f"NA {p.na_objective:.2f}, "
            f"λ {p.wavelength_um:.2f} µm, α {p.tikhonov_alpha:.0e}\n{p.photons / 1e3:.1f}k "
            f"photons, section {p.optical_section_um:.1f} µm",
            fontsize=7,
        )
        sp = p.nucleus_sign_p
        ax[1].imshow(s.dapi, cmap="gray", vmin=0, vmax=1)
        ax[1].set_title(
            f"DAPI: {s.nuclei.max()} nuclei, size ×{p.nucleus_size_scale:.2f}\n"
            f"P(contrast +/−/0) {sp[0]:.2f}/{sp[1]:.2f}/{sp[2]:.2f}\n|Δn| × "
            f"{p.nucleus_dn_positive[1] / 0.010:.2f}, phase 1–99 % {hi - lo:.2f} rad",
            fontsize=7,
        )
    for a in axes.ravel():
        a.set_xticks([])
        a.set_yticks([])
    return _save(fig, out)


def domain_table() -> str:
    """Markdown table of `simulate.DOMAIN_RANGES` (docs/simulator.md)."""
    lines = ["| quantity | range | drawn | why |", "|---|---|---|---|"]
    for name, r in S.DOMAIN_RANGES.items():
        lines.append(
            f"| `{name}` | {r.lo:g} – {r.hi:g} | {'log-uniform' if r.log else 'uniform'} "
            f"| {r.why} |"
        )
    a = ", ".join(f"{x:g}" for x in S.NUCLEUS_SIGN_DIRICHLET)
    lines.append(
        f"| `nucleus_sign_p` | P(positive, negative, ≈0) | Dirichlet({a}) | nuclear contrast "
        "sign mix varies per field from mostly positive (fixed tissue) to mostly negative; "
        "brackets (0.35, 0.40, 0.25) and (0.65, 0.15, 0.20) |"
    )
    return "\n".join(lines)


def domain_bench(size: int = 256, n: int = 24) -> None:
    """Wall and CPU time of `simulate_training_pair(seed, size)` over seeds 1..n (after a warm-up)."""
    S.simulate_training_pair(0, size)
    wall, cpu = [], []
    for seed in range(1, n + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        S.simulate_training_pair(seed, size)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    print(
        f"simulate_training_pair size={size}, seeds 1..{n}: wall mean {np.mean(wall):.3f} s, "
        f"median {np.median(wall):.3f} s, max {max(wall):.3f} s; cpu mean {np.mean(cpu):.3f} s; "
        f"load average {os.getloadavg()[0]:.1f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--stats", action="store_true")
    ap.add_argument("--domain", action="store_true")
    ap.add_argument("--domain-table", action="store_true")
    ap.add_argument("--domain-bench", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if a.bench:
        bench()
    if a.stats:
        stats()
    if a.domain_table:
        print(domain_table())
    if a.domain_bench:
        domain_bench()
    if a.domain:
        p = make_domain_figure(a.out or DOMAIN_OUT)
        print(f"wrote {p} ({p.stat().st_size / 1024:.0f} KB)")
    if not (a.bench or a.stats or a.domain or a.domain_table or a.domain_bench):
        p = make_figure(a.out or OUT)
        print(f"wrote {p} ({p.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
