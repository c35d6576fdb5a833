"""The fixed per-plane cost every stain pays before its tiles: the robust normalisation statistics
(`Predictor.norm_stats`) and the out-of-distribution score (`ood.ood_score`), on the bench image.

    python experiments/per_plane_overhead.py --size 2048
"""

from __future__ import annotations

import argparse
import statistics
import time

from napari_lcm_stain.bench import bench_image
from napari_lcm_stain.ood import ood_score
from napari_lcm_stain.sampling import load_predictor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    pred, x = load_predictor("lcm", device="cpu"), bench_image(a.size)
    for name, fn in (("robust statistics", pred.norm_stats), ("OOD score", ood_score)):
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
        print(f"{name}: median {1000 * statistics.median(times):.0f} ms ({a.size}² plane)")


if __name__ == "__main__":
    main()
