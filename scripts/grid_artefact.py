"""Strength of the latent-period (8 px) grid in LCM-1 outputs (smooth, and with texture),
against truth, VAE and Pix2Pix.

`python scripts/grid_artefact.py` prints, per 512² brain-20x field (seeds 0-2), the power of the
column-mean spectrum at period 8 divided by the spectrum's median (docs/model-card.md), and the
mean over the fields. `--lcm PATH` scores a training run's LCM checkpoint instead of the packaged
one (its own VAE for the vae-recon column).
"""

from __future__ import annotations

import argparse

import numpy as np

from napari_lcm_stain import stain
from napari_lcm_stain.evaluate import vae_reconstruction
from napari_lcm_stain.simulate import simulate_pair


def period_power(img: np.ndarray, period: int = 8) -> float:
    col = img.mean(axis=0)
    spec = np.abs(np.fft.rfft(col - col.mean()))
    return float(spec[len(col) // period] / np.median(spec))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lcm", default="lcm", help="'lcm' (packaged) or an LCM checkpoint path")
    lcm = ap.parse_args(argv).lcm
    print("seed  truth  vae-recon  lcm-1  lcm-1-texture  pix2pix")
    rows = []
    for seed in range(3):
        s = simulate_pair("brain-20x", 512, seed)
        rows.append([
            period_power(s.dapi),
            period_power(vae_reconstruction(s.dapi, lcm)),
            period_power(stain(s.qobm, model=lcm, pixel_size=s.pixel_size)),
            period_power(stain(s.qobm, model=lcm, pixel_size=s.pixel_size, texture=True)),
            period_power(stain(s.qobm, model="pix2pix", pixel_size=s.pixel_size)),
        ])  # fmt: skip
        print(f"{seed:4d}  " + "  ".join(f"{v:6.1f}" for v in rows[-1]))
    print("mean  " + "  ".join(f"{v:6.1f}" for v in np.mean(rows, axis=0)))


if __name__ == "__main__":
    main()
