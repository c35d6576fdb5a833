"""Ablation of the decoder's realism term (issue #14) on a small budget, on validation fields.

Every arm starts from the same trained model (`--init`: "packaged" or a run folder with
lcm/teacher checkpoints) and re-runs only the two decoder stages with its own critic weights
(`training.stages.DecoderCritic`): the thin decoder is refitted on encoder latents
(`--decoder-steps`), then polished on half LCM-1 latents (`--polish-steps`). The U-Net is not
touched, so the arms differ only in how the same 1-step latents are drawn as an image.

    python scripts/ablate_realism.py --out runs/realism --arms l1 adv adv+fm
    python scripts/ablate_realism.py --out runs/realism --score   # the table, validation seeds

Scores (validation fields, seeds 800 000+, never the benchmark): Pearson, SSIM, nuclei F1,
spectral realism distance (lower is better), nuclear edge sharpness (1 = the truth's) and the
8-px grid strength (`scripts/grid_artefact.py`), for each arm's LCM-1 and for Pix2Pix.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from napari_lcm_stain import metrics, stain
from napari_lcm_stain.simulate import simulate_pair
from napari_lcm_stain.training import get_train_preset, run_recipe

#: arm -> (adv_weight, fm_weight, grid_weight)
ARMS = {
    "l1": (0.0, 0.0, 0.0),
    "adv": (0.05, 0.0, 0.0),
    "adv+fm": (0.05, 0.5, 0.0),
    "weak": (0.01, 0.0, 0.0),
    "adv+grid": (0.05, 0.0, 1.0),
    "strong": (0.2, 2.0, 0.0),
}
VAL_SEED0 = 800_000
KEYS = ("pearson", "ssim", "f1", "realism", "edge_sharpness", "grid8")


def init_files(init: str) -> Path:
    if init == "packaged":
        return Path(__file__).resolve().parents[1] / "src" / "napari_lcm_stain" / "weights"
    return Path(init)


def train_arm(arm: str, init: str, out: Path, decoder_steps: int, polish_steps: int, threads):
    adv, fm, grid = ARMS[arm]
    out.mkdir(parents=True, exist_ok=True)
    src = init_files(init)
    for name in ("teacher", "lcm"):  # polish needs the LCM beside it; nothing retrains them
        for ext in ("safetensors", "json"):
            if not (out / f"{name}.{ext}").exists():
                shutil.copy(src / f"{name}.{ext}", out / f"{name}.{ext}")
    p = replace(
        get_train_preset("v4"),
        name="realism-ablation",  # not in presets.TRANSFER: the steps below are kept
        decoder_steps=decoder_steps,
        polish_steps=polish_steps,
        adv_weight=adv,
        fm_weight=fm,
        grid_weight=grid,
    )
    run_recipe(p, out, seed=0, stages=["decoder", "polish"], init=init, quiet=True, threads=threads)


def grid8(img: np.ndarray) -> float:
    col = img.mean(axis=0)
    spec = np.abs(np.fft.rfft(col - col.mean()))
    return float(spec[len(col) // 8] / np.median(spec))


def score(models: dict[str, str], n: int, size: int) -> dict:
    presets = ("brain-20x", "tumour-dense-20x")
    samples = [simulate_pair(presets[i % 2], size=size, seed=VAL_SEED0 + i) for i in range(n)]
    rows = {}
    for name, model in {"truth": None, **models}.items():
        vals = []
        for s in samples:
            pred = s.dapi if model is None else stain(s.qobm, model=model, pixel_size=s.pixel_size)
            m = metrics.image_metrics(pred, s.dapi, sample=s)
            vals.append({**{k: m.get(k) for k in KEYS[:-1]}, "grid8": grid8(pred)})
        rows[name] = {k: float(np.nanmean([v[k] for v in vals])) for k in KEYS}
        print(f"{name:16s} " + "  ".join(f"{k} {rows[name][k]:.3f}" for k in KEYS), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--out", type=Path, default=Path("runs/realism"))
    ap.add_argument("--init", default="packaged", help="'packaged' or a run folder")
    ap.add_argument("--decoder-steps", type=int, default=1000)
    ap.add_argument("--polish-steps", type=int, default=500)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--score", action="store_true", help="score the arms found in --out")
    ap.add_argument("--n", type=int, default=8, help="validation fields to score")
    ap.add_argument("--size", type=int, default=256)
    a = ap.parse_args()
    if not a.score:
        for arm in a.arms:
            print(f"== arm {arm} {ARMS[arm]}", flush=True)
            train_arm(arm, a.init, a.out / arm, a.decoder_steps, a.polish_steps, a.threads)
        return
    found = [arm for arm in ARMS if (a.out / arm / "lcm.safetensors").exists()]
    models = {arm: str(a.out / arm / "lcm.safetensors") for arm in found}
    models["pix2pix"] = str(init_files(a.init) / "pix2pix.safetensors")
    rows = score(models, a.n, a.size)
    (a.out / "score.json").write_text(json.dumps({"arms": ARMS, "rows": rows}, indent=2))
    print(f"wrote {a.out / 'score.json'}")


if __name__ == "__main__":
    main()
