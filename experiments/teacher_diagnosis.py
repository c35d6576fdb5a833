"""Diagnosis of the diffusion teacher (issue #24, part 1): where does its brightness go?

    python experiments/teacher_diagnosis.py            # 8 held-out fields, ~2 min on 1 thread
    python experiments/teacher_diagnosis.py --fields 4 --cnr-fields 2 --model runs/x/teacher.safetensors

Writes docs/results/teacher-diagnosis.json (`--out`) with three measurements:

1. **x̂0 brightness against t.** The teacher's one-evaluation estimate x̂0(z_t, t, qOBM) on noised
   *true* latents z_t = √ᾱ_t·z0 + √(1-ᾱ_t)·ε, decoded; per true nucleus, its mean inside the
   mask minus the background mean, over the same for decode(encode(truth)) (1 = as bright as the
   VAE's ceiling), pooled over nuclei (all, and those the phase shows clearly, |CNR| ≥ 4). Also
   the latent-space shrinkage std(x̂0) / std(z0). A teacher that regresses to the conditional
   mean at high noise loses brightness as t grows.
2. **Latent statistics.** Per-channel mean and std of encode(DAPI) × the checkpoint's
   `latent_scale`, on the held-out fields and on fields drawn as the release's training set was
   (`make_training_data` seeds and presets). The schedule assumes zero-mean, unit-variance latents.
3. **Teacher-50 brightness by CNR** (`scripts/contrast_by_cnr.py`, or `experiments/` after the
   move), on `--cnr-fields` brain-20x fields; its printed table is stored verbatim.

Fields: the `evaluate` benchmark's held-out fields (seeds 900 000 + i, the two presets
alternating), 256². Fixed noise (seed 0) for every t, so the rows differ only in t.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

from napari_lcm_stain import checkpoints as ck
from napari_lcm_stain import normalization
from napari_lcm_stain.evaluate import benchmark_fields
from napari_lcm_stain.models import build
from napari_lcm_stain.sampling import train_scheduler
from napari_lcm_stain.training.diffusion import x0_from_v

ROOT = Path(__file__).resolve().parents[1]
T_GRID = (50, 150, 250, 350, 450, 550, 650, 750, 850, 950, 999)
CLEAR_CNR = 4.0


def load(model: str):
    c = ck.load_packaged(model) if model in ck.PACKAGED else ck.load_checkpoint(Path(model))
    unet = build(c.config["architecture"]["unet"])
    vae = build(c.config["architecture"]["vae"])
    ck.load_into(unet, c.sub("unet"), "latent U-Net")
    ck.load_into(vae.encoder, c.sub("encoder"), "VAE encoder")
    ck.load_into(vae.decoder, c.sub("decoder"), "VAE decoder")
    return c.config, unet.eval(), vae.eval()


def contrast(img: np.ndarray, nuclei: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per nucleus: mean inside its mask minus the background mean."""
    return ndi.mean(img, nuclei, ids) - img[nuclei == 0].mean()


def channel_stats(latents: list[np.ndarray]) -> dict:
    z = np.concatenate([a.transpose(1, 0, 2, 3).reshape(a.shape[1], -1) for a in latents], 1)
    return {
        "mean": [round(float(v), 4) for v in z.mean(1)],
        "std": [round(float(v), 4) for v in z.std(1)],
        "std_all": round(float(z.std()), 4),
        "rms_all": round(float(np.sqrt((z**2).mean())), 4),
        "n_values_per_channel": int(z.shape[1]),
    }


@torch.no_grad()
def encode(vae, dapi: np.ndarray, scale: float) -> torch.Tensor:
    return vae.encode(torch.from_numpy(dapi.astype(np.float32))[None, None])[0] * scale


def training_like_latents(vae, scale: float, n: int) -> list[np.ndarray]:
    """Latents of the first `n` fields the release preset's training set is made of (seed 0)."""
    from napari_lcm_stain.simulate import simulate_pair
    from napari_lcm_stain.training.presets import get_train_preset

    p = get_train_preset("default")
    out = []
    for i in range(n):
        name = p.data_presets[i % len(p.data_presets)]
        s = simulate_pair(name, size=p.field_size, seed=i)
        out.append(encode(vae, s.dapi, scale).numpy())
    return out


def cnr_table(n: int) -> dict:
    """Run the brightness-by-CNR script (wherever the probe move left it) and keep its table."""
    for where in ("experiments", "scripts"):
        script = ROOT / where / "contrast_by_cnr.py"
        if script.exists():
            cmd = [sys.executable, str(script), "--fields", str(n)]
            t0 = time.time()
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True, env=env)
            rows = {}
            for line in res.stdout.splitlines():
                parts = line.split()
                if len(parts) >= 4 and parts[0] not in ("model", "brightness"):
                    try:
                        rows[parts[0]] = [float(v) for v in parts[-3:]]
                    except ValueError:
                        pass
            return {
                "command": f"python {where}/contrast_by_cnr.py --fields {n}",
                "seconds": round(time.time() - t0, 1),
                "stdout": res.stdout,
                "ratio_by_cnr_bin": rows,
            }
    return {"note": "contrast_by_cnr.py not found"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="teacher", help="packaged name or a teacher checkpoint")
    ap.add_argument("--fields", type=int, default=8)
    ap.add_argument("--train-fields", type=int, default=16)
    ap.add_argument("--cnr-fields", type=int, default=6, help="0: skip the CNR table")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/results/teacher-diagnosis.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.time()
    cfg, unet, vae = load(a.model)
    scale = float(cfg["latent_scale"])
    sched = train_scheduler(cfg.get("scheduler"))
    acp = sched.alphas_cumprod

    # per t: pooled (ceiling contrast, x̂0 contrast) over nuclei, all and clear; latent shrinkage
    acc = {t: {"all": [], "clear": [], "shrink": []} for t in T_GRID}
    held = []
    for _seed, _preset, s in benchmark_fields(a.fields, 256):
        q = normalization.normalize(cfg["normalization"], s.qobm.astype(np.float32))
        q = torch.from_numpy(q.astype(np.float32))[None, None]
        z0 = encode(vae, s.dapi, scale)
        held.append(z0.numpy())
        ids = np.arange(1, s.nuclei.max() + 1)
        cnr = np.abs(np.asarray(s.nucleus_cnr, float))[: len(ids)]
        with torch.no_grad():
            ceiling = contrast(vae.decode(z0 / scale)[0, 0].clamp(0, 1).numpy(), s.nuclei, ids)
            noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
            for t in T_GRID:
                tt = torch.full((1,), t, dtype=torch.long)
                z_t = sched.add_noise(z0, noise, tt)
                x0 = x0_from_v(sched, z_t, unet(z_t, tt, q), tt)
                img = vae.decode(x0 / scale)[0, 0].clamp(0, 1).numpy()
                got = contrast(img, s.nuclei, ids)
                ok = np.isfinite(ceiling) & np.isfinite(got)
                acc[t]["all"] += list(zip(ceiling[ok], got[ok]))
                acc[t]["clear"] += list(
                    zip(ceiling[ok & (cnr >= CLEAR_CNR)], got[ok & (cnr >= CLEAR_CNR)])
                )
                acc[t]["shrink"].append(float(x0.std() / z0.std()))

    def ratio(pairs):
        v = np.array(pairs)
        return round(float(v[:, 1].sum() / v[:, 0].sum()), 3) if len(v) else None

    rows = [
        {
            "t": t,
            "snr": round(float(acp[t] / (1 - acp[t])), 5),
            "brightness_all": ratio(acc[t]["all"]),
            "brightness_clear": ratio(acc[t]["clear"]),
            "n_nuclei": len(acc[t]["all"]),
            "n_clear": len(acc[t]["clear"]),
            "latent_std_ratio": round(float(np.mean(acc[t]["shrink"])), 3),
        }
        for t in T_GRID
    ]
    print(f"{'t':>5s} {'SNR':>9s} {'bright all':>11s} {'clear':>7s} {'std x0/z0':>10s}")
    for r in rows:
        print(f"{r['t']:5d} {r['snr']:9.4f} {r['brightness_all']:11.3f} "
              f"{r['brightness_clear']:7.3f} {r['latent_std_ratio']:10.3f}")  # fmt: skip

    latents = {
        "latent_scale": scale,
        "held_out": channel_stats(held),
        "training_like": channel_stats(training_like_latents(vae, scale, a.train_fields)),
    }
    # where each channel's own signal-to-noise ratio, SNR(t)·std_c², falls to 1 (a unit-variance
    # channel: where SNR(t) = 1); the schedule was designed for the latter
    snr = (acp / (1 - acp)).numpy()
    var = np.square(latents["training_like"]["std"])
    latents["t_at_channel_snr_1"] = [int(np.argmax(snr * v < 1)) for v in var]
    latents["t_at_snr_1_unit_variance"] = int(np.argmax(snr < 1))
    mean2 = np.square(latents["training_like"]["mean"])
    latents["offset_share_of_second_moment"] = round(float(mean2.sum() / (mean2 + var).sum()), 3)
    for k in latents:
        print(k, json.dumps(latents[k]))
    result = {
        "command": " ".join(["python experiments/teacher_diagnosis.py", *(argv or sys.argv[1:])]),
        "model": a.model,
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
        "fields": {"n": a.fields, "size": 256, "seeds": "evaluate.benchmark_fields (900 000 + i)"},
        "x0_brightness_vs_t": rows,
        "x0_brightness_note": "decoded teacher x̂0 on noised true latents; per-nucleus contrast "
        "(inside - background) pooled, over decode(encode(truth)); clear = |CNR| >= 4",
        "latents": latents,
        "train_fields": a.train_fields,
    }
    if a.cnr_fields > 0:
        result["teacher50_by_cnr"] = cnr_table(a.cnr_fields)
        print(result["teacher50_by_cnr"].get("stdout", ""))
    result["seconds"] = round(time.time() - t_start, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {a.out} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
