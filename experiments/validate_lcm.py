"""Pick between candidate LCM checkpoints on VALIDATION fields (seeds 800000+), never on the
benchmark (900000+): `python experiments/validate_lcm.py runs/v2/lcm.safetensors runs/v2-anchor1/lcm.safetensors`."""

from __future__ import annotations

import sys

import numpy as np

from napari_lcm_stain import metrics, stain
from napari_lcm_stain.simulate import simulate_pair

VAL_SEED0 = 800_000


def main(paths: list[str], n: int = 6, size: int = 256) -> None:
    fields = [
        simulate_pair(("brain-20x", "tumour-dense-20x")[i % 2], size=size, seed=VAL_SEED0 + i)
        for i in range(n)
    ]
    for path in paths:
        rows = []
        for s in fields:
            pred = stain(s.qobm, model=path, steps=1, pixel_size=s.pixel_size)
            m = metrics.image_metrics(pred, s.dapi, true_labels=s.nuclei, pixel_size=s.pixel_size)
            rows.append((m["pearson"], m["ssim"], m["f1"]))
        p, ss, f1 = np.mean(rows, axis=0)
        print(f"{path}: LCM-1 pearson {p:.3f} ssim {ss:.3f} f1 {f1:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
