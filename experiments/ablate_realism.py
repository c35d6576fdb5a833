"""Ablation of the decoder's realism term (issue #14) on a small budget, on validation fields.

Every arm starts from the same trained model (`--init`: "packaged" or a run folder with
lcm/teacher checkpoints). The decoder arms re-run only the two decoder stages with their own
critic weights (`training.stages.RealismCritic`): the thin decoder is refitted on encoder latents
(`--decoder-steps`), then polished on half LCM-1 latents (`--polish-steps`); the U-Net is not
touched, so they differ only in how the same 1-step latents are drawn as an image. The lcm-*
arms continue distillation from the init's LCM for `--lcm-steps` with a conditional critic on
the decoded output (adversarial distillation; lcm-0 is the same steps without it), decoder kept;
lcm-pix* the same with the pixel reconstruction loss of the decoded estimate instead.
The tex arms refit and polish a texture decoder (`models.Decoder(texture=True)`: learned noise
amplitude); a texture arm's row is its smooth mean (the default), "ARM:texture" its grain.

A texture init keeps its texture head (`presets.transfer_preset`), so the arms that must run
without one need a deterministic init. The texture arms ran from the 0.0.5 release:

    git archive 4135de7 src/napari_lcm_stain/weights | tar -x -C /tmp/w5
    python experiments/ablate_realism.py --init /tmp/w5/src/napari_lcm_stain/weights \
        --out runs/tex-abl --arms l1 tex tex+adv          # then --score
    python experiments/ablate_realism.py --init /tmp/w5/src/napari_lcm_stain/weights \
        --out runs/pix-abl --arms lcm-0 lcm-pix lcm-pix-strong   # then --score

    python experiments/ablate_realism.py --out runs/realism --arms l1 adv adv+fm
    python experiments/ablate_realism.py --out runs/realism --score   # the table, validation seeds
    python experiments/ablate_realism.py --out runs/realism --png docs/images/realism_ablation.png

Scores (validation fields, seeds 800 000+, never the benchmark): Pearson, SSIM, nuclei F1,
spectral realism distance (lower is better), nuclear edge sharpness (1 = the truth's) and the
8-px grid strength (`scripts/grid_artefact.py`), for each arm's LCM-1 and for Pix2Pix.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from grid_artefact import period_power  # noqa: E402 (scripts/grid_artefact.py)

from napari_lcm_stain import metrics, stain
from napari_lcm_stain.sampling import load_predictor
from napari_lcm_stain.simulate import simulate_pair
from napari_lcm_stain.training import get_train_preset, run_recipe

#: arm -> the preset fields it sets; "stages" the stages it re-runs (default: the decoder pair)
DECODER = ("decoder", "polish")
ARMS = {
    "l1": dict(adv_weight=0.0, fm_weight=0.0, grid_weight=0.0, texture=False),
    "adv": dict(adv_weight=0.05, fm_weight=0.0, grid_weight=0.0, texture=False),
    "adv+fm": dict(adv_weight=0.05, fm_weight=0.5, grid_weight=0.0, texture=False),
    "weak": dict(adv_weight=0.01, fm_weight=0.0, grid_weight=0.0, texture=False),
    "adv+grid": dict(adv_weight=0.05, fm_weight=0.0, grid_weight=1.0, texture=False),
    "strong": dict(adv_weight=0.2, fm_weight=2.0, grid_weight=0.0, texture=False),
    # texture decoder: per-pixel noise with a learned amplitude (models.Decoder(texture=True))
    "tex": dict(texture=True),
    "tex+adv": dict(texture=True, adv_weight=0.05, fm_weight=0.5),
    # the latent-grid penalty alone (no critic), on the texture decoder's stages
    "tex+grid": dict(texture=True, grid_weight=1.0),
    "tex+grid4": dict(texture=True, grid_weight=4.0),
    # adversarial distillation: only the LCM stage re-runs (from the init's LCM), same steps
    "lcm-0": dict(lcm_adv_weight=0.0, stages=("lcm",)),
    "lcm-adv": dict(lcm_adv_weight=0.05, stages=("lcm",)),
    "lcm-adv-strong": dict(lcm_adv_weight=0.2, stages=("lcm",)),
    # pixel-space distillation: L1 + gradient L1 of the decoded one-step estimate
    "lcm-pix": dict(lcm_pixel_weight=8.0, stages=("lcm",)),
    "lcm-pix-strong": dict(lcm_pixel_weight=32.0, stages=("lcm",)),
}
VAL_SEED0 = 800_000
KEYS = ("pearson", "ssim", "f1", "realism", "edge_sharpness", "rim_slope", "grid8")


def init_files(init: str) -> Path:
    if init == "packaged":
        return Path(__file__).resolve().parents[1] / "src" / "napari_lcm_stain" / "weights"
    return Path(init)


def train_arm(arm: str, init: str, out: Path, steps: dict, threads, base: str) -> None:
    fields = dict(ARMS[arm])
    stages = list(fields.pop("stages", DECODER))
    out.mkdir(parents=True, exist_ok=True)
    src = init_files(init)
    for name in ("teacher", "lcm"):  # polish needs the LCM beside it, the LCM its teacher
        for ext in ("safetensors", "json"):
            if not (out / f"{name}.{ext}").exists():
                shutil.copy(src / f"{name}.{ext}", out / f"{name}.{ext}")
    if "lcm" in stages:  # copied above only so that polish finds it: this arm remakes it
        (out / "lcm.safetensors").unlink()
    p = replace(
        get_train_preset(base),
        name="realism-ablation",  # not in presets.TRANSFER: the steps below are kept
        **steps,
        **fields,
    )
    run_recipe(p, out, seed=0, stages=stages, init=init, quiet=True, threads=threads)


def with_textures(models: dict[str, str]) -> dict:
    """Each texture model twice: as loaded by default (its decoder's smooth mean) and with its
    grain drawn ("ARM:texture")."""
    out = {}
    for name, path in models.items():
        out[name] = path
        pred = load_predictor(path, device="cpu", texture=True)
        if getattr(pred, "texture", False):
            out[f"{name}:texture"] = pred
    return out


def score(models: dict, n: int, size: int) -> dict:
    presets = ("brain-20x", "tumour-dense-20x")
    samples = [simulate_pair(presets[i % 2], size=size, seed=VAL_SEED0 + i) for i in range(n)]
    rows = {}
    for name, model in {"truth": None, **models}.items():
        vals = []
        for s in samples:
            pred = s.dapi if model is None else stain(s.qobm, model=model, pixel_size=s.pixel_size)
            m = metrics.image_metrics(pred, s.dapi, sample=s)
            vals.append({**{k: m.get(k) for k in KEYS[:-1]}, "grid8": period_power(pred)})
        rows[name] = {k: float(np.nanmean([v[k] for v in vals])) for k in KEYS}
        print(f"{name:16s} " + "  ".join(f"{k} {rows[name][k]:.3f}" for k in KEYS), flush=True)
    return rows


def save_png(out: Path, png: Path) -> None:
    """Two validation fields, 128² crops shown 2x (nearest): truth, then each trained arm."""
    from skimage import io

    arms = [arm for arm in ARMS if (out / arm / "lcm.safetensors").exists()]
    rows = []
    for i, preset in enumerate(("brain-20x", "tumour-dense-20x")):
        s = simulate_pair(preset, size=256, seed=VAL_SEED0 + i)
        lo, hi = np.percentile(s.dapi, metrics.NORM_PERCENTILES)
        preds = [stain(s.qobm, model=str(out / a / "lcm.safetensors"), pixel_size=s.pixel_size)
                 for a in arms]  # fmt: skip
        crops = [np.clip((c[64:192, 64:192] - lo) / (hi - lo), 0, 1) for c in [s.dapi, *preds]]
        rows.append(np.concatenate(crops, 1))
    img = np.kron(np.concatenate(rows, 0), np.ones((2, 2)))
    io.imsave(png, (img * 255).astype(np.uint8), check_contrast=False)
    print(f"wrote {png}: truth, then " + ", ".join(arms))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--out", type=Path, default=Path("runs/realism"))
    ap.add_argument("--init", default="packaged", help="'packaged' or a run folder")
    ap.add_argument("--decoder-steps", type=int, default=1000)
    ap.add_argument("--polish-steps", type=int, default=500)
    ap.add_argument("--lcm-steps", type=int, default=600, help="steps of the lcm-* arms")
    ap.add_argument("--base-preset", default="default", help="training preset the arms vary")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--score", action="store_true", help="score the arms found in --out")
    ap.add_argument("--n", type=int, default=8, help="validation fields to score")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--png", type=Path, default=None, help="write 128² crops: truth, then arms")
    a = ap.parse_args()
    if a.png:
        return save_png(a.out, a.png)
    if not a.score:
        for arm in a.arms:
            print(f"== arm {arm} {ARMS[arm]}", flush=True)
            steps = dict(
                decoder_steps=a.decoder_steps, polish_steps=a.polish_steps, lcm_steps=a.lcm_steps
            )
            train_arm(arm, a.init, a.out / arm, steps, a.threads, a.base_preset)
        return
    found = [arm for arm in ARMS if (a.out / arm / "lcm.safetensors").exists()]
    models = {arm: str(a.out / arm / "lcm.safetensors") for arm in found}
    models["pix2pix"] = str(init_files(a.init) / "pix2pix.safetensors")
    rows = score(with_textures(models), a.n, a.size)
    (a.out / "score.json").write_text(json.dumps({"arms": ARMS, "rows": rows}, indent=2))
    print(f"wrote {a.out / 'score.json'}")


if __name__ == "__main__":
    main()
