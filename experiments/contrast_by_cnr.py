"""How bright the models paint the true nuclei, by how visible each nucleus is in the phase.

    python experiments/contrast_by_cnr.py            # 6 brain-20x validation fields, seeds 800 000+
    python experiments/contrast_by_cnr.py --lcm runs/ablate/full runs/ablate/robust+aug
                                                 # LCM-1 of run folders, beside the packaged one

Per nucleus: mean prediction inside its true mask minus the prediction's background mean, over
the same for the true DAPI (1 = as bright as the truth), pooled per bin of the nucleus's phase
contrast-to-noise ratio (|`SimSample.nucleus_cnr`|, as `metrics.recall_by_contrast`). A nucleus the phase shows clearly (CNR >= 4)
but that comes out at half brightness is not an information limit of the input; the rows for
the teacher sampled with 50 steps tell whether the diffusion model's own samples do better than
its one-step mean. The VAE row (decode(encode(DAPI))) is the ceiling the latent space allows.
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import ndimage as ndi

from napari_lcm_stain import simulate, stain
from napari_lcm_stain.evaluate import vae_reconstruction

BINS = (0.0, 1.0, 4.0, np.inf)
MODELS = {
    "vae-recon": None,
    "lcm-1": dict(model="lcm", steps=1),
    "teacher-1": dict(model="teacher", steps=1),
    "teacher-50": dict(model="teacher", steps=50),
    "pix2pix": dict(model="pix2pix"),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fields", type=int, default=6)
    ap.add_argument("--lcm", nargs="+", default=None, metavar="RUN",
                    help="score only LCM-1: of these run folders (their lcm.safetensors) and the "
                    "packaged one")  # fmt: skip
    a = ap.parse_args(argv)
    models = dict(MODELS)
    if a.lcm:
        models = {run: dict(model=f"{run}/lcm.safetensors", steps=1) for run in a.lcm}
        models["packaged lcm-1"] = MODELS["lcm-1"]
    acc: dict[str, list[list[tuple[float, float]]]] = {m: [[] for _ in BINS[1:]] for m in models}
    for i in range(a.fields):
        s = simulate.simulate_pair("brain-20x", size=256, seed=800_000 + i)
        ids = np.arange(1, s.nuclei.max() + 1)
        bg = s.nuclei == 0
        truth = ndi.mean(s.dapi, s.nuclei, ids) - s.dapi[bg].mean()
        cnr = np.abs(np.asarray(s.nucleus_cnr, float))[: len(ids)]  # nucleus_cnr[label - 1]
        for name, kw in models.items():
            if kw is None:
                pred = vae_reconstruction(s.dapi)
            else:
                pred = stain(s.qobm, pixel_size=s.pixel_size, seed=0, device="cpu", **kw)
            painted = ndi.mean(pred, s.nuclei, ids) - pred[bg].mean()
            for k, (lo, hi) in enumerate(zip(BINS, BINS[1:])):
                sel = (cnr >= lo) & (cnr < hi) & np.isfinite(truth)
                acc[name][k] += list(zip(truth[sel], painted[sel]))
    print("brightness of the true nuclei, prediction ÷ truth, by phase CNR (n nuclei):")
    head = [f"CNR {lo:g}-{hi:g} (n={len(next(iter(acc.values()))[k])})" for k, (lo, hi) in
            enumerate(zip(BINS, BINS[1:]))]  # fmt: skip
    print(f"{'model':22s}" + "".join(f"{h:>20s}" for h in head))
    for name in models:
        vals = [np.array(b) for b in acc[name]]
        ratios = [v[:, 1].sum() / v[:, 0].sum() if len(v) else float("nan") for v in vals]
        print(f"{name:22s}" + "".join(f"{r:20.2f}" for r in ratios))


if __name__ == "__main__":
    main()
