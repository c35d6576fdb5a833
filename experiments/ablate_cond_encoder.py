"""Ablation of the U-Net's conditioning encoder (`models.LatentUNet(cond_channels=...)`) on a
small budget, on validation fields (seeds 800 000+, never the benchmark).

Each arm trains only a teacher, from scratch, for `--teacher-steps` in its own folder beside a
copy of a finished run's VAE and decoder (the latent space and the decoder are shared, so the arms
differ only in how the U-Net sees the qOBM), then its one-step prediction (teacher-1, the
conditional mean the LCM distils; LCM-1 and teacher-1 differ by under 0.01 F1 on the benchmark)
is scored like `experiments/ablate_realism.py --score`. The run in docs/experiments.md:

    python experiments/ablate_cond_encoder.py --base runs/teacher20k --out runs/cond-abl --arms none --threads 1 &
    python experiments/ablate_cond_encoder.py --base runs/teacher20k --out runs/cond-abl --arms enc8 --threads 1
    python experiments/ablate_cond_encoder.py --out runs/cond-abl --score --n 16
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

from ablate_realism import score  # experiments/ is on the path when run as a script

from napari_lcm_stain.sampling import load_predictor
from napari_lcm_stain.training import get_train_preset, run_recipe

#: arm -> conditioning encoder channels (full resolution first, then one per halving)
ARMS = {"none": (), "enc8": (8, 16, 32, 64), "enc16": (16, 32, 48, 64)}


def train_arm(arm: str, base: Path, out: Path, steps: int, threads) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in ("vae", "decoder"):
        for ext in ("safetensors", "json"):
            if not (out / f"{name}.{ext}").exists():
                shutil.copy(base / f"{name}.{ext}", out / f"{name}.{ext}")
    p = replace(
        get_train_preset("default"),
        name="cond-ablation",
        teacher_steps=steps,
        unet_cond_channels=ARMS[arm],
    )
    run_recipe(p, out, seed=0, stages=["teacher"], quiet=True, threads=threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--base", type=Path, default=Path("runs/teacher20k"), help="finished run")
    ap.add_argument("--out", type=Path, default=Path("runs/cond-abl"))
    ap.add_argument("--teacher-steps", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--score", action="store_true", help="score the arms found in --out")
    ap.add_argument("--n", type=int, default=16, help="validation fields to score")
    ap.add_argument("--size", type=int, default=256)
    a = ap.parse_args()
    if not a.score:
        for arm in a.arms:
            print(f"== arm {arm} cond_channels={ARMS[arm]}", flush=True)
            train_arm(arm, a.base, a.out / arm, a.teacher_steps, a.threads)
        return
    found = [arm for arm in ARMS if (a.out / arm / "teacher.safetensors").exists()]
    models = {f"{arm} teacher-1": load_predictor(str(a.out / arm / "teacher.safetensors"), steps=1,
                                                 device="cpu") for arm in found}  # fmt: skip
    rows = score(models, a.n, a.size)
    (a.out / "score.json").write_text(json.dumps({"arms": ARMS, "rows": rows}, indent=2))
    print(f"wrote {a.out / 'score.json'}")


if __name__ == "__main__":
    main()
