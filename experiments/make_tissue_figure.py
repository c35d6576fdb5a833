"""Figure of the simulator's tissue families (docs/images/tissue_families.png): qOBM phase,
true DAPI and the instance outlines of one field per family (brain-20x optics, 0.414 µm/px).

    python experiments/make_tissue_figure.py [--out docs/images/tissue_families.png]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from skimage.segmentation import find_boundaries  # noqa: E402

from napari_lcm_stain import simulate as S  # noqa: E402
from napari_lcm_stain.tissue import FAMILIES, HELD_OUT_FAMILIES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/images/tissue_families.png")
    ap.add_argument("--size", type=int, default=192)
    a = ap.parse_args()
    fig, ax = plt.subplots(3, len(FAMILIES), figsize=(2.2 * len(FAMILIES), 6.8))
    for j, fam in enumerate(FAMILIES):
        p = replace(S.get_preset("brain-20x"), layout=fam, rim_p=0.4, fine_texture_rms=0.01)
        s = S.simulate_pair(p, size=a.size, seed=3)
        lo, hi = np.percentile(s.qobm, [1, 99.5])
        ax[0, j].imshow(s.qobm, cmap="gray", vmin=lo, vmax=hi)
        ax[1, j].imshow(s.dapi, cmap="magma", vmin=0, vmax=np.percentile(s.dapi, 99.8))
        ax[2, j].imshow(find_boundaries(s.nuclei), cmap="gray")
        title = fam + (" (held out)" if fam in HELD_OUT_FAMILIES else "")
        ax[0, j].set_title(title, fontsize=9)
    for k, lab in enumerate(("qOBM phase", "DAPI", "instances")):
        ax[k, 0].set_ylabel(lab)
    for x in ax.ravel():
        x.set_xticks([])
        x.set_yticks([])
    fig.tight_layout()
    fig.savefig(a.out, dpi=60)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
