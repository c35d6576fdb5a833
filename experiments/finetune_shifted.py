"""Fine-tune the packaged LCM on shifted-20x pairs and score 16 held-out shifted fields.

`python experiments/finetune_shifted.py [STEPS LR TRAIN_SIZE PAIRS]` prints the numbers quoted in
docs/model-card.md and docs/experiments.md (defaults: the CLI's 300 steps at 2e-4, one 512x512 pair; the quality test
uses PAIRS = 4: `python experiments/finetune_shifted.py 300 2e-4 512 4`).
"""

from __future__ import annotations

import json
import sys

from napari_lcm_stain.evaluate import finetune_shift_check


def main(steps: int = 300, lr: float = 2e-4, train_size: int = 512, pairs: int = 1) -> None:
    r = finetune_shift_check(steps=steps, lr=lr, train_size=train_size, pairs=pairs)
    r.pop("result")
    print(json.dumps(r, indent=1))
    b, a = r["before"], r["after"]
    print(
        f"held-out Pearson {b['pearson']:.3f} -> {a['pearson']:.3f}, F1 {b['f1']:.3f} -> {a['f1']:.3f}"
    )


if __name__ == "__main__":
    args = sys.argv[1:]
    main(
        int(args[0]) if args else 300,
        float(args[1]) if len(args) > 1 else 2e-4,
        int(args[2]) if len(args) > 2 else 512,
        int(args[3]) if len(args) > 3 else 1,
    )
