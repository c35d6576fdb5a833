"""Give checkpoints trained with the fixed (training-set mean/std) normalisation the per-image
robust normalisation, calibrated so in-domain inputs stay on the scale the weights were trained on.

The fixed normalisation divides every image by one training-set std; the robust one divides each
image by `mad_scale`·MAD of that image. Setting `mad_scale` = median over the recipe's own training
fields of (training std / field MAD) keeps a typical training field where it was, while any
affine change of the phase values (units, regulariser, gain) now cancels.

    python experiments/robust_norm_for_fixed.py --src src/napari_lcm_stain/weights --out /tmp/w-robust
    lcm-stain evaluate --weights-dir /tmp/w-robust      # compare with the fixed weights first
    python experiments/robust_norm_for_fixed.py --in-place   # then repackage (records new hashes)
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from napari_lcm_stain import checkpoints as ckpt
from napari_lcm_stain.normalization import plane_stats, robust_config
from napari_lcm_stain.simulate import simulate_pair
from napari_lcm_stain.training import get_train_preset


def calibrate(std: float, preset: str = "default", seed: int = 0) -> float:
    """median over the preset's training fields of std / (the robust spread with mad_scale 1),
    the recipe's own seeds."""
    p = get_train_preset(preset)
    unit = robust_config(mad_scale=1.0)
    ratios = []
    for i in range(p.n_fields):
        name = p.data_presets[i % len(p.data_presets)]
        q = simulate_pair(name, size=p.field_size, seed=seed * 100_000 + i).qobm
        ratios.append(std / plane_stats(unit, q)["scale"])
    return float(np.median(ratios))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=ckpt.WEIGHTS_DIR)
    ap.add_argument("--out", type=Path, help="folder for the converted checkpoints")
    ap.add_argument("--in-place", action="store_true", help="rewrite the packaged configs")
    ap.add_argument("--preset", default="v4", help="the recipe the weights were trained with")
    a = ap.parse_args()
    if not a.in_place and a.out is None:
        ap.error("give --out DIR or --in-place")
    out = ckpt.WEIGHTS_DIR if a.in_place else a.out
    out.mkdir(parents=True, exist_ok=True)
    scale = None
    for name in ("lcm", "teacher", "pix2pix"):
        cfg = json.loads((a.src / f"{name}.json").read_text())
        norm = cfg["normalization"]
        if norm.get("type", "fixed") != "fixed":  # converted before: start from the original
            norm = norm.get("converted_from") or {}
        if norm.get("type", "fixed") != "fixed" or "qobm_std" not in norm:
            raise SystemExit(f"{name}.json has no fixed normalisation to convert")
        scale = scale or calibrate(float(norm["qobm_std"]), a.preset)
        cfg["normalization"] = {**robust_config(mad_scale=scale), "converted_from": norm}
        if not a.in_place:
            shutil.copy(a.src / f"{name}.safetensors", out / f"{name}.safetensors")
        text = json.dumps(cfg, indent=2, sort_keys=True).encode()
        ckpt.atomic_write_bytes(out / f"{name}.json", text)
        print(f"{name}: robust normalisation, mad_scale {scale:.4f}")
    if a.in_place:
        ckpt.record_packaged_hashes()


if __name__ == "__main__":
    main()
