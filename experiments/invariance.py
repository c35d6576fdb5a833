"""The invariance number of the model card: max |stain(a·x + b) − stain(x)| of the packaged LCM-1
on the 512² brain-20x field (seed 4242) of `tests/test_normalization.py`, over its a, b grid.

    python experiments/invariance.py
"""

from __future__ import annotations

import numpy as np

from napari_lcm_stain import stain
from napari_lcm_stain.simulate import simulate_pair

AFFINE = [(a, b) for a in (0.01, 0.1, 3.0, 100.0) for b in (-5.0, 0.0, 7.0)]


def main() -> None:
    x = simulate_pair("brain-20x", size=512, seed=4242).qobm.astype(np.float32)
    ref = stain(x, model="lcm", device="cpu")
    worst = 0.0
    for a, b in AFFINE:
        d = float(
            np.abs(stain((a * x + b).astype(np.float32), model="lcm", device="cpu") - ref).max()
        )
        print(f"a={a:<6g} b={b:<5g} max abs diff {d:.5f}")
        worst = max(worst, d)
    print(f"worst {worst:.5f} (target <= 0.02)")


if __name__ == "__main__":
    main()
