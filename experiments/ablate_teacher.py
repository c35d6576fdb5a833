"""Teacher ablation (issue #24) on a small budget: 24 validation fields, 2 seeds, one table.

Every arm continues the packaged networks (transfer, `--init packaged`) for the same steps on
the release's data mix (fewer fields): the teacher stage `--teacher-steps`, then consistency
distillation `--lcm-steps`; the VAE and decoders are the init's, so arms differ only in how the
latent predictor is trained.

    python experiments/ablate_teacher.py --arms plain cfg --seeds 0 1 --out runs/teacher-abl
    python experiments/ablate_teacher.py --out runs/teacher-abl --score \
        --json docs/results/teacher-ablation.json

Arms (each a `TrainPreset` switch, docs/teacher-diagnosis.md):
- plain: the recipe as it is (conditional teacher, plain distillation);
- cfg: condition dropout 0.1 in the teacher, then guided consistency distillation (w ~ U[1, 3]
  into a zero-initialised guidance embedding, target uncond + w·(cond − uncond));
- minsnr: min-SNR-γ = 5 weighting of the teacher loss (plain distillation);
- cfg-fade: the cfg arm's teacher distilled again with the anchor faded by w (full at w = 1,
  none at w = 3: `anchor_fade`) and the guidance projection at 10× the rate
  (`guidance_lr_mult`); the cfg arm ran at 1× (its LCM barely responded to w).

Scores (validation seeds 800 000+, brain-20x and tumour-dense-20x alternating, never the
benchmark): nuclei F1, hallucinations near distractors, clear-nucleus brightness (|CNR| ≥ 4,
`metrics.nuclear_brightness`), edge sharpness and spectral realism, for the teacher with 25
DDIM steps (50 cost twice as much on 2 cores and sample alike with trailing spacing), LCM-1 and
LCM-4, at the guidances the arm's models accept (1 only for unguided ones).

Runs trained before checkpoints recorded their guidance get it written from their preset
(`training.stages.guidance_config`) before scoring.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

_OFF = dict(cond_dropout=0.0, guidance_embed=False, min_snr_gamma=0.0)  # the release preset's
ARMS = {
    "plain": _OFF,
    "cfg": dict(_OFF, cond_dropout=0.1, guidance_embed=True, guidance_lr_mult=1.0),
    "minsnr": dict(_OFF, min_snr_gamma=5.0),
    # distillation only, from the cfg arm's teacher (same seed): the anchor faded with w and
    # the guidance projection at 10x the rate
    "cfg-fade": dict(
        _OFF,
        cond_dropout=0.1,
        guidance_embed=True,
        anchor_fade=True,
        guidance_lr_mult=10.0,
        stages=("lcm",),
        teacher_from="cfg",
    ),  # fmt: skip
}
VAL_SEED0 = 800_000
PRESETS = ("brain-20x", "tumour-dense-20x")
GUIDANCE = (1.0, 1.5, 2.0, 3.0)
KEYS = ("f1", "hallu_near_distractors", "bright_clear", "edge_sharpness", "realism")


def train(arm: str, seed: int, out: Path, a) -> None:
    from napari_lcm_stain.training import get_train_preset, run_recipe

    fields = dict(ARMS[arm])
    stages = list(fields.pop("stages", ("teacher", "lcm")))
    teacher_from = fields.pop("teacher_from", None)
    if teacher_from is not None:  # distillation only: that arm's teacher of the same seed
        out.mkdir(parents=True, exist_ok=True)
        for ext in ("safetensors", "json"):
            shutil.copy(out.parent / f"{teacher_from}-s{seed}" / f"teacher.{ext}", out)
    p = replace(
        get_train_preset("release"),  # its data mix; the arm sets every teacher switch
        name="teacher-ablation",  # not in presets.TRANSFER: the steps below are kept
        n_fields=a.fields,
        teacher_steps=a.teacher_steps,
        lcm_steps=a.lcm_steps,
        **fields,
    )
    t0 = time.time()
    run_recipe(p, out, seed=seed, stages=stages, init="packaged", quiet=True)
    print(f"{arm} seed {seed}: trained in {time.time() - t0:.0f} s", flush=True)


def _models(run: Path) -> list[tuple[str, str, int, float]]:
    """(row name, checkpoint, steps, guidance) for the run's teacher-25, LCM-1 and LCM-4 at each
    guidance its checkpoints accept; no teacher rows for an arm that reuses another's teacher."""
    from napari_lcm_stain import checkpoints as ck

    reused = ARMS.get(run.name.rsplit("-s", 1)[0], {}).get("teacher_from") is not None
    rows = []
    for kind, steps, ws in (("teacher", 25, (1.0, 2.0, 3.0)), ("lcm", 1, GUIDANCE),
                            ("lcm", 4, (1.0, 2.0))):  # fmt: skip
        if kind == "teacher" and reused:
            continue
        path = run / f"{kind}.safetensors"
        g = ck.load_checkpoint(path).config.get("guidance")
        for w in ws if g else (1.0,):
            rows.append((f"{kind}-{steps}@g{w:g}", str(path), steps, w))
    return rows


def _record_guidance(run: Path) -> None:
    """Write the guidance a run's checkpoints accept into their configs where missing (runs
    trained before the recipe recorded it), from the preset in their provenance."""
    from napari_lcm_stain import checkpoints as ck
    from napari_lcm_stain.training import get_train_preset
    from napari_lcm_stain.training.stages import guidance_config

    for kind in ("teacher", "lcm"):
        path = ck.config_path(run / f"{kind}.safetensors")
        cfg = json.loads(path.read_text())
        prov = cfg["provenance"]["preset"]
        keys = (
            "cond_dropout",
            "guidance_embed",
            "guidance_min",
            "guidance_max",
            "guidance_default",
        )
        g = guidance_config(replace(get_train_preset("tiny"), **{k: prov[k] for k in keys}), kind)
        if g is not None and "guidance" not in cfg:
            cfg["guidance"] = g
            ck.atomic_write_bytes(path, json.dumps(cfg, indent=2, sort_keys=True).encode())


def validation_fields(n: int, size: int) -> list:
    from napari_lcm_stain.simulate import simulate_pair

    return [simulate_pair(PRESETS[i % 2], size=size, seed=VAL_SEED0 + i) for i in range(n)]


def score_model(model, samples: list) -> dict:
    """KEYS of one model (a Predictor) over `samples`: per-field means, brightness pooled."""
    from napari_lcm_stain import metrics, stain

    vals, bright = [], []
    for s in samples:
        pred = stain(s.qobm, model=model, seed=0, pixel_size=s.pixel_size)
        m = metrics.image_metrics(pred, s.dapi, sample=s)
        vals.append({k: m.get(k) for k in KEYS if k != "bright_clear"})
        bright.append(metrics.nuclear_brightness(pred, s.dapi, s.nuclei, s.nucleus_cnr))
    row = {k: float(np.nanmean([v[k] for v in vals])) for k in KEYS if k != "bright_clear"}
    row["bright_clear"] = metrics.pool_brightness(bright)["clear"]
    return row


def fmt(row: dict) -> str:
    return "  ".join(f"{k} {row[k]:.3f}" for k in KEYS)


def score_run(run: Path, n: int, size: int) -> dict:
    from napari_lcm_stain.sampling import load_predictor

    samples = validation_fields(n, size)
    result = {}
    for name, path, steps, w in _models(run):
        result[name] = score_model(load_predictor(path, steps, device="cpu", guidance=w), samples)
        print(f"{run.name:14s} {name:18s} {fmt(result[name])}", flush=True)
    return result


def table(scores: dict) -> str:
    """Mean over seeds (± half the range between the two seeds) per arm and row."""
    by_arm: dict[str, dict[str, list[dict]]] = {}
    for run, rows in scores.items():
        arm = run.rsplit("-s", 1)[0]
        for name, row in rows.items():
            by_arm.setdefault(arm, {}).setdefault(name, []).append(row)
    lines = ["| arm | model | " + " | ".join(KEYS) + " | seeds |", "|---" * (len(KEYS) + 3) + "|"]
    for arm, rows in by_arm.items():
        for name, rs in rows.items():
            cells = []
            for k in KEYS:
                v = np.array([r[k] for r in rs], float)
                cells.append(f"{v.mean():.3f} ± {np.ptp(v) / 2:.3f}")
            lines.append(f"| {arm} | {name} | " + " | ".join(cells) + f" | {len(rs)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", nargs="+", default=None, choices=sorted(ARMS),
                    help="train these (default: plain cfg); with --score, score only these")  # fmt: skip
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--out", type=Path, default=Path("runs/teacher-abl"))
    ap.add_argument("--fields", type=int, default=192, help="training fields per run")
    ap.add_argument("--teacher-steps", type=int, default=1000)
    ap.add_argument("--lcm-steps", type=int, default=400)
    ap.add_argument("--score", action="store_true", help="score the trained runs under --out")
    ap.add_argument("--n", type=int, default=24, help="validation fields")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    if not a.score:
        for seed in a.seeds:
            for arm in a.arms or ("plain", "cfg"):
                train(arm, seed, a.out / f"{arm}-s{seed}", a)
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    runs = sorted(r for r in a.out.iterdir() if (r / "lcm.safetensors").exists())
    if a.arms:  # score only these arms' runs (the others' scores are in --json already)
        runs = [r for r in runs if r.name.rsplit("-s", 1)[0] in a.arms]
    for r in runs:
        _record_guidance(r)
    scores = {r.name: score_run(r, a.n, a.size) for r in runs}
    print(table(scores))
    if a.json is not None:  # scores of runs scored before are kept
        before = json.loads(a.json.read_text())["runs"] if a.json.exists() else {}
        scores = {**before, **scores}
        a.json.write_text(json.dumps({"n": a.n, "size": a.size, "runs": scores}, indent=1))
        print(table(scores))


if __name__ == "__main__":
    main()
