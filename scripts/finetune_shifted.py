"""Fine-tune the packaged LCM on one shifted-20x pair and score a held-out shifted field.

`python scripts/finetune_shifted.py LR STEPS` (the numbers quoted in docs/model-card.md).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from napari_lcm_stain import metrics, stain
from napari_lcm_stain.simulate import simulate_pair
from napari_lcm_stain.train import run_finetune


def score(model, held) -> tuple[float, float]:
    pred = stain(held.qobm, model=model, pixel_size=held.pixel_size)
    m = metrics.image_metrics(pred, held.dapi, true_labels=held.nuclei, pixel_size=held.pixel_size)
    return round(m["pearson"], 3), round(m["f1"], 3)


def main(lr: float, steps: int) -> None:
    train_pair = simulate_pair("shifted-20x", size=256, seed=777)
    held = simulate_pair("shifted-20x", size=256, seed=778)
    res = run_finetune(
        train_pair.qobm, train_pair.dapi, model="lcm", steps=steps, lr=lr, patch=96, seed=0
    )
    with tempfile.TemporaryDirectory() as d:
        path = res.save(Path(d) / "ft.safetensors")
        after = score(str(path), held)
    print(f"lr {lr} steps {steps} best step {res.best_step}")
    print(f"validation before {res.metrics_before}\nvalidation after  {res.metrics_after}")
    print(f"held-out (pearson, f1) before {score('lcm', held)} after {after}")


if __name__ == "__main__":
    main(float(sys.argv[1]), int(sys.argv[2]))
