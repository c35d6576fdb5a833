"""Why LCM-1 scores badly on realism, and what two obvious fixes cost (docs/experiments.md).

The realism distance compares radially averaged power spectra. True simulated DAPI carries Poisson
shot noise, a flat spectrum above ~0.15 cycles/px; LCM-1 predicts a smooth, mean-like image whose
high-frequency power sits at the metric's floor. This probe scores, on VALIDATION fields
(seeds 800000+, never the benchmark):

* ``lcm-1``: the model as shipped;
* ``lcm-1 + shot noise``: its output with Poisson noise at the simulator's own photon count (an
  upper bound on what a noise model can buy: it uses knowledge a real instrument would not give);
* each extra checkpoint given: e.g. one whose decoder was polished with a spectral term, built with
  ``python experiments/realism_probe.py --spectral-polish 0.05 runs/v4 runs/exp-spec0.05`` (copies the
  run's VAE / decoder / teacher / LCM and re-runs only the polish stage with the extra loss);
* ``pix2pix`` for reference.

`python experiments/realism_probe.py [CHECKPOINT ...]` prints Pearson, SSIM, nuclei F1 and realism
(lower is better) per row, and ``--save-png PATH`` writes a crop of each output side by side.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import torch

from napari_lcm_stain import metrics, stain
from napari_lcm_stain.simulate import get_preset, simulate_pair
from napari_lcm_stain.training import run_recipe, stages

VAL_SEED0 = 800_000
SPECTRAL_BINS = 16


def fields(n: int = 6, size: int = 256) -> list:
    presets = ("brain-20x", "tumour-dense-20x")
    return [simulate_pair(presets[i % 2], size=size, seed=VAL_SEED0 + i) for i in range(n)]


def shot_noise(img: np.ndarray, photons: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.poisson(np.clip(img, 0, None) * photons) / photons).astype(np.float32)


def score(rows: dict[str, list[np.ndarray]], samples: list) -> None:
    print(f"{'model':40s} pearson  ssim    f1   realism")
    for name, preds in rows.items():
        m = [metrics.image_metrics(p, s.dapi, sample=s) for p, s in zip(preds, samples)]
        mean = {k: float(np.mean([x[k] for x in m])) for k in ("pearson", "ssim", "f1", "realism")}
        print(
            f"{name[-40:]:40s} {mean['pearson']:.3f}   {mean['ssim']:.3f}  {mean['f1']:.3f}"
            f"  {mean['realism']:.3f}"
        )


def save_png(rows: dict[str, list[np.ndarray]], samples: list, path: str) -> None:
    from skimage import io

    t = samples[0].dapi
    lo, hi = np.percentile(t, metrics.NORM_PERCENTILES)
    crops = [t] + [preds[0] for preds in rows.values()]
    strip = np.concatenate([np.clip((c[64:192, 64:192] - lo) / (hi - lo), 0, 1) for c in crops], 1)
    io.imsave(path, (np.kron(strip, np.ones((3, 3))) * 255).astype(np.uint8), check_contrast=False)
    print(f"wrote {path}: truth, then " + ", ".join(rows))


def radial_log_power_torch(x: torch.Tensor, n_bins: int = SPECTRAL_BINS) -> torch.Tensor:
    """Differentiable twin of `metrics.radial_log_power` for (B, 1, H, W) crops."""
    _, _, h, w = x.shape
    win = torch.outer(torch.hann_window(h, periodic=False), torch.hann_window(w, periodic=False))
    r = torch.sqrt(torch.fft.fftfreq(h)[:, None] ** 2 + torch.fft.fftfreq(w)[None, :] ** 2).ravel()
    keep = (r > 0) & (r <= 0.5)
    idx = torch.clamp(torch.ceil(r / 0.5 * n_bins).long() - 1, 0, n_bins - 1)
    avg = torch.zeros(n_bins, h * w)
    avg[idx[keep], torch.nonzero(keep).ravel()] = 1.0
    avg = avg / avg.sum(1, keepdim=True)
    f = torch.fft.fft2((x - x.mean(dim=(-2, -1), keepdim=True)) * win)
    power = (f.real**2 + f.imag**2).reshape(len(x), -1) / float((win**2).sum())
    return torch.log10(torch.clamp(power @ avg.T, min=metrics.POWER_FLOOR / 10))


def spectral_polish(weight: float, run: Path, out: Path) -> None:
    """Re-run only the polish stage of `run` (copied into `out`) with a spectral-matching term."""
    out.mkdir(parents=True, exist_ok=True)
    for stage in ("vae", "decoder", "teacher", "lcm"):
        for ext in ("safetensors", "json"):
            shutil.copy(run / f"{stage}.{ext}", out / f"{stage}.{ext}")
    plain = stages.reconstruction_loss

    def with_spectrum(rec: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        gap = radial_log_power_torch(rec) - radial_log_power_torch(d)
        return plain(rec, d) + weight * gap.abs().mean()

    stages.reconstruction_loss = with_spectrum
    try:
        run_recipe("default", out=out, stages=["polish"], quiet=True)
    finally:
        stages.reconstruction_loss = plain
    print(f"wrote {out / 'lcm.safetensors'} (polish with spectral weight {weight})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoints", nargs="*", help="extra LCM checkpoints to score")
    ap.add_argument("--spectral-polish", nargs=3, metavar=("WEIGHT", "RUN", "OUT"))
    ap.add_argument("--save-png")
    args = ap.parse_args()
    if args.spectral_polish:
        w, run, out = args.spectral_polish
        spectral_polish(float(w), Path(run), Path(out))
        return
    samples = fields()
    lcm = [stain(s.qobm, model="lcm", pixel_size=s.pixel_size) for s in samples]
    photons = [get_preset(p).dapi_photons for p in ("brain-20x", "tumour-dense-20x")]
    rows = {
        "lcm-1": lcm,
        "lcm-1 + shot noise": [shot_noise(p, photons[i % 2], seed=i) for i, p in enumerate(lcm)],
    }
    for path in args.checkpoints:
        rows[path] = [stain(s.qobm, model=path, pixel_size=s.pixel_size) for s in samples]
    rows["pix2pix"] = [stain(s.qobm, model="pix2pix", pixel_size=s.pixel_size) for s in samples]
    score(rows, samples)
    if args.save_png:
        save_png(rows, samples, args.save_png)


if __name__ == "__main__":
    main()
