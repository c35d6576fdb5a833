"""The measurements of scripts/gpu_check.sh, in one process: GPU-vs-CPU agreement, training steps
per second per stage, and a 100-step fine-tune. Writes one JSON (argv[1])."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from napari_lcm_stain.engine import stain
from napari_lcm_stain.finetune import run_finetune
from napari_lcm_stain.simulate import simulate_pair
from napari_lcm_stain.training import STAGES, get_train_preset, run_recipe

STAGE_STEPS = 200


def agreement() -> dict:
    x = simulate_pair("brain-20x", size=512, seed=20_260).qobm
    ref = stain(x, model="lcm", device="cpu")
    out = {}
    for precision in ("fp32", "bf16", "fp16"):
        y = stain(x, model="lcm", device="cuda", precision=precision)
        out[precision] = float(np.abs(y - ref).max())
    return out


def training_rates(work: Path) -> dict:
    """200 steps of every stage of the default preset; steps/s and the projected recipe time."""
    full = get_train_preset("default")
    stages = STAGES
    p = replace(full, n_fields=24, **{f"{s}_steps": STAGE_STEPS for s in stages})
    run_recipe(p, work, seed=0, device="cuda", quiet=True, resume=False)
    t = json.loads((work / "timings.json").read_text())
    rates = {s: STAGE_STEPS / t[s] for s in stages}
    projected = sum(getattr(full, f"{s}_steps") / rates[s] for s in stages)
    return {"steps_per_s": rates, "projected_default_recipe_s_excl_data": projected, "timings": t}


def finetune_rate() -> dict:
    s = simulate_pair("shifted-20x", size=512, seed=777)
    t0 = time.perf_counter()
    res = run_finetune(s.qobm, s.dapi, model="lcm", steps=100, device="cuda")
    return {
        "seconds": time.perf_counter() - t0,
        "metrics_before": res.metrics_before,
        "metrics_after": res.metrics_after,
    }


def main() -> None:
    out = Path(sys.argv[1])
    work = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("/tmp/gpu-train")
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    for name, fn in (
        ("agreement_max_abs", agreement),
        ("training", lambda: training_rates(work)),
        ("finetune_100", finetune_rate),
    ):
        t0 = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as e:  # record and go on: one failure must not cost the other numbers
            result[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"{name}: {time.perf_counter() - t0:.1f} s -> {result[name]}", flush=True)
        out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
