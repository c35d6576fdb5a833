"""Does OMP_WAIT_POLICY=PASSIVE slow training down? (docs/troubleshooting.md, docs/experiments.md)

`python experiments/omp_wait_probe.py RUN_DIR [STEPS]` copies the VAE and decoder of a finished
default-preset run into temporary folders and times STEPS (default 300) teacher steps twice, in
fresh processes: once with the OpenMP runtime's default wait policy and once with PASSIVE (threads
sleep as soon as a parallel region ends). The policy is read when the OpenMP runtime starts, so
each measurement runs in its own child process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys
from dataclasses import replace
from pathlib import Path
from napari_lcm_stain import training as train
out, steps = Path(sys.argv[1]), int(sys.argv[2])
p = replace(train.get_train_preset("default"), teacher_steps=steps)
train.run_recipe(p, out=out, stages=["teacher"], quiet=True)
print(json.loads((out / "timings.json").read_text())["teacher"])
"""


def time_teacher(run: Path, steps: int, policy: str | None) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    with tempfile.TemporaryDirectory() as tmp:
        for stage in ("vae", "decoder"):
            for ext in ("safetensors", "json"):
                shutil.copy(run / f"{stage}.{ext}", Path(tmp) / f"{stage}.{ext}")
        out = subprocess.run(
            [sys.executable, "-c", CHILD, tmp, str(steps)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    return float(out.stdout.strip().splitlines()[-1])


def main(run: str, steps: int = 300) -> None:
    default = time_teacher(Path(run), steps, None)
    passive = time_teacher(Path(run), steps, "PASSIVE")
    print(json.dumps({"steps": steps, "default_s": default, "passive_s": passive}))
    print(f"{steps} teacher steps: default {default:.1f} s, PASSIVE {passive:.1f} s "
          f"({passive / default:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 300)
