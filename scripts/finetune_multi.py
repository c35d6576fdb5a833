"""Fine-tuning on many pairs of a held-out instrument variant: the issue #12 targets.

`python scripts/finetune_multi.py [--pairs 1 4 16] [--steps 300] [--max-minutes 10] [--out DIR]`

For each N in --pairs: writes N simulated `shifted-20x` pairs of 512² (seeds 2000…, the writer of
`lcm-stain simulate`) into DIR/pairs-N, runs `lcm-stain finetune --data DIR/pairs-N --device cpu
--max-minutes M` on them (timed; with N ≥ 2 every fourth pair validates), then scores the packaged
LCM-1 and every fine-tuned model on 16 other 512² fields of the same preset (seeds 3000-3015) that
no run saw: mean Pearson and nuclei F1 against the simulator's true nuclei, and the paired gain
with a bootstrap 95 % interval. Prints a table and writes DIR/result.json, which also records the
packaged weights' `weights/SHA256SUMS.json` and `weights/lcm.json` digests the numbers belong to.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np

import napari_lcm_stain
from napari_lcm_stain import cli, metrics
from napari_lcm_stain.checkpoints import HASH_FILE, WEIGHTS_DIR
from napari_lcm_stain.sampling import load_predictor
from napari_lcm_stain.simulate import simulate_pair, write_dataset

PRESET = "shifted-20x"
SIZE = 512
TRAIN_SEED = 2000
HELD_SEEDS = range(3000, 3016)


def score(model, held) -> list[dict[str, float]]:
    pred = load_predictor(model, 1, "cpu")
    rows = []
    for s in held:
        out = napari_lcm_stain.stain(s.qobm, model=pred, pixel_size=s.pixel_size, device="cpu")
        m = metrics.image_metrics(out, s.dapi, true_labels=s.nuclei, pixel_size=s.pixel_size)
        rows.append({"pearson": float(m["pearson"]), "f1": float(m["f1"])})
    return rows


def gain(after: list[dict], before: list[dict], key: str, seed: int = 0) -> dict[str, float]:
    d = np.array([a[key] - b[key] for a, b in zip(after, before)])
    rng = np.random.default_rng(seed)
    boot = rng.choice(d, size=(2000, d.size)).mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"mean": float(d.mean()), "ci95": [float(lo), float(hi)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--max-minutes", type=float, default=10.0)
    ap.add_argument("--out", default="runs/finetune-multi")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    sums = (WEIGHTS_DIR / HASH_FILE).read_bytes()
    result = {
        "protocol": {
            "preset": PRESET,
            "size": SIZE,
            "train_seeds_from": TRAIN_SEED,
            "held_seeds": [HELD_SEEDS.start, HELD_SEEDS.stop - 1],
            "steps": a.steps,
            "max_minutes": a.max_minutes,
            "device": "cpu",
        },
        "weights_sha256sums_digest": hashlib.sha256(sums).hexdigest(),
        # the config holds the input normalisation, which SHA256SUMS.json does not cover
        "lcm_json_digest": hashlib.sha256((WEIGHTS_DIR / "lcm.json").read_bytes()).hexdigest(),
        "runs": {},
    }
    held = [simulate_pair(PRESET, size=SIZE, seed=s) for s in HELD_SEEDS]
    base = score("lcm", held)
    result["base"] = base
    for n in a.pairs:
        data = out / f"pairs-{n}"
        if not data.exists():
            write_dataset(data, preset=PRESET, n=n, size=SIZE, seed=TRAIN_SEED)
        ckpt = out / f"finetuned-{n}.safetensors"
        t0, c0 = time.perf_counter(), time.process_time()
        rc = cli.main(
            ["finetune", "--data", str(data), "--out", str(ckpt), "--steps", str(a.steps)]
            + ["--max-minutes", str(a.max_minutes), "--device", "cpu", "--overwrite"]
        )
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if rc != 0:
            raise SystemExit(f"finetune with {n} pairs failed (exit {rc})")
        ft = json.loads(ckpt.with_suffix(".json").read_text())["finetune"]
        rows = score(ckpt, held)
        result["runs"][str(n)] = {
            "wall_s": wall,
            "cpu_s": cpu,
            "steps_run": ft["steps_run"],
            "best_step": ft["best_step"],
            "stopped_by_time": ft["stopped"],
            "validation": ft["validation"],
            "per_field": rows,
            "pearson": float(np.mean([r["pearson"] for r in rows])),
            "f1": float(np.mean([r["f1"] for r in rows])),
            "gain_pearson": gain(rows, base, "pearson"),
            "gain_f1": gain(rows, base, "f1"),
        }
        (out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"weights/{HASH_FILE} sha256 {result['weights_sha256sums_digest'][:16]}")
    print(f"weights/lcm.json sha256 {result['lcm_json_digest'][:16]}")
    b_p, b_f = np.mean([r["pearson"] for r in base]), np.mean([r["f1"] for r in base])
    print(f"packaged LCM-1 on 16 held-out {PRESET} fields: Pearson {b_p:.3f}, F1 {b_f:.3f}")
    print("pairs | wall min | steps (best) | Pearson (gain, 95% CI)     | F1 (gain, 95% CI)")
    for n, r in result["runs"].items():
        gp, gf = r["gain_pearson"], r["gain_f1"]
        print(
            f"{n:>5} | {r['wall_s'] / 60:8.1f} | {r['steps_run']:5d} ({r['best_step']:3d}) | "
            f"{r['pearson']:.3f} ({gp['mean']:+.3f}, {gp['ci95'][0]:+.3f}..{gp['ci95'][1]:+.3f}) | "
            f"{r['f1']:.3f} ({gf['mean']:+.3f}, {gf['ci95'][0]:+.3f}..{gf['ci95'][1]:+.3f})"
        )


if __name__ == "__main__":
    main()
