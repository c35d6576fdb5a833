"""Ablation of the instrument-robustness changes on the `small` preset (resumable runs).

Arms (all the same seed, the same `small` budget):
  fixed     the recipe before robustness: training-set mean/std, simulator presets, no augmentation
  robust    per-image median/MAD normalisation only
  robust+aug  plus blur / noise / gamma augmentation of the qOBM crops
  full      plus half the fields domain-randomised (the default preset then; it now has a quarter)

    python experiments/ablate_robustness.py --arms fixed robust --out runs/ablate
    lcm-stain evaluate --weights-dir runs/ablate/fixed --json runs/ablate/fixed/eval.json
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from napari_lcm_stain.training import get_train_preset, run_recipe

STAGES = ["vae", "decoder", "teacher", "lcm", "polish", "pix2pix"]


def arm_preset(arm: str):
    p = get_train_preset("small")
    if arm == "fixed":
        return replace(p, input_norm="fixed", augment=False)
    if arm == "robust":
        return replace(p, input_norm="robust", augment=False)
    if arm == "robust+aug":
        return replace(p, input_norm="robust", augment=True)
    if arm == "full":
        mix = ("brain-20x", "tumour-dense-20x", "domain-random", "domain-random")  # half
        return replace(p, input_norm="robust", augment=True, data_presets=mix)
    raise SystemExit(f"unknown arm {arm!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", nargs="+", default=["fixed", "robust", "robust+aug", "full"])
    ap.add_argument("--out", type=Path, default=Path("runs/ablate"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stages", nargs="+", default=STAGES, help="e.g. leave out pix2pix")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: preset)")
    a = ap.parse_args()
    for arm in a.arms:
        print(f"== arm {arm}", flush=True)
        run_recipe(arm_preset(arm), a.out / arm, seed=a.seed, stages=a.stages, threads=a.threads)


if __name__ == "__main__":
    main()
