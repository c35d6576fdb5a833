"""The numbers behind `EDGE_SIGMA_PX` in docs/metrics.md ("Edge sharpness").

    python experiments/edge_sharpness_probe.py             # 4 brain-20x fields, 256², seeds 800 000+i
    python experiments/edge_sharpness_probe.py --teacher   # also LCM-4 and teacher-50 (slow on a CPU)

For each field and pre-smoothing sigma: the noisy simulated truth scored against the same field
simulated without visible shot noise (``dapi_photons = 1e9``, same seed and scene), and the packaged
models scored against the noisy truth; then per model the nucleus-minus-background contrast, to
tell a faint prediction from a blurry one.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from napari_lcm_stain import metrics as M
from napari_lcm_stain import simulate, stain

SIGMAS = (0.0, 0.5, 1.0, 2.0)
PRESET = "brain-20x"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fields", type=int, default=4)
    ap.add_argument("--teacher", action="store_true", help="also LCM-4 and teacher-50")
    a = ap.parse_args(argv)
    models = {"lcm-1": {"model": "lcm", "steps": 1}, "pix2pix": {"model": "pix2pix"}}
    if a.teacher:
        models |= {"lcm-4": {"model": "lcm", "steps": 4}, "teacher-50": {"model": "teacher", "steps": 50}}  # fmt: skip
    quiet = dataclasses.replace(simulate.get_preset(PRESET), dapi_photons=1e9)
    means: dict[str, list[list[float]]] = {}
    for i in range(a.fields):
        seed = 800_000 + i
        s = simulate.simulate_pair(PRESET, size=256, seed=seed)
        clean = simulate.simulate_pair(quiet, size=256, seed=seed)
        assert np.array_equal(clean.nuclei, s.nuclei), "the noise-free twin must be the same scene"
        nuc = s.nuclei > 0
        contrast_true = s.dapi[nuc].mean() - s.dapi[~nuc].mean()
        print(f"seed {seed}: {len(np.unique(s.nuclei)) - 1} nuclei")
        rows = {"noisy÷clean truth": [M.edge_sharpness(s.dapi, clean.dapi, s.nuclei, sg) for sg in SIGMAS]}  # fmt: skip
        for name, kw in models.items():
            p = stain(s.qobm, pixel_size=s.pixel_size, seed=0, device="cpu", **kw)
            rows[name] = [M.edge_sharpness(p, s.dapi, s.nuclei, sg) for sg in SIGMAS]
            ratio = (p[nuc].mean() - p[~nuc].mean()) / contrast_true
            rows[name].append(ratio)
        for name, v in rows.items():
            means.setdefault(name, []).append(v[: len(SIGMAS)])
            extra = f"  contrast ×{v[-1]:.2f}" if len(v) > len(SIGMAS) else ""
            print(
                f"  {name:18s}" + "".join(f"  σ{sg:g} {x:.3f}" for sg, x in zip(SIGMAS, v)) + extra
            )
    print("mean over fields:")
    for name, v in means.items():
        m = np.mean(v, axis=0)
        print(f"  {name:18s}" + "".join(f"  σ{sg:g} {x:.3f}" for sg, x in zip(SIGMAS, m)))


if __name__ == "__main__":
    main()
