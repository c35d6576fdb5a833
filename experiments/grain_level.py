"""Is the texture decoder's grain at the true DAPI's noise level? (docs/experiments.md, texture decoder)

    python experiments/grain_level.py [--n 8]

On validation fields (seeds 800 000+, presets alternating, 256²), prints the std of the grain the
packaged LCM-1 draws (stain with texture=True minus the smooth stain) and the high-pass std
(image minus its 1-px Gaussian blur) of the textured stain, the smooth stain and the true DAPI.
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import ndimage as ndi

from napari_lcm_stain import stain
from napari_lcm_stain.simulate import simulate_pair


def high_pass_std(img: np.ndarray) -> float:
    return float(np.std(img - ndi.gaussian_filter(img, 1.0)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8)
    a = ap.parse_args()
    rows = []
    print("seed     grain std  high-pass std: textured  smooth  truth")
    for i in range(a.n):
        s = simulate_pair(("brain-20x", "tumour-dense-20x")[i % 2], size=256, seed=800_000 + i)
        grain = stain(s.qobm, pixel_size=s.pixel_size, texture=True)
        smooth = stain(s.qobm, pixel_size=s.pixel_size)
        row = [float(np.std(grain - smooth)), high_pass_std(grain), high_pass_std(smooth),
               high_pass_std(s.dapi)]  # fmt: skip
        rows.append(row)
        print(f"{800_000 + i}  " + "  ".join(f"{v:8.4f}" for v in row))
    print("mean    " + "  ".join(f"{v:8.4f}" for v in np.mean(rows, axis=0)))


if __name__ == "__main__":
    main()
