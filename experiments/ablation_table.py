"""The robustness-ablation table from `experiments/ablate_robustness.py` runs and their evaluations.

    python experiments/ablate_robustness.py --arms fixed robust robust+aug full --stages vae decoder teacher lcm polish --out runs/ablate
    for a in fixed robust robust+aug full; do
      lcm-stain evaluate --weights-dir runs/ablate/$a --json runs/ablate/$a/eval.json
      lcm-stain evaluate --suite instruments --weights-dir runs/ablate/$a --json runs/ablate/$a/suite.json
    done
    python experiments/ablation_table.py runs/ablate

Prints LCM-1 nuclei F1 (and Pearson, SSIM in-domain) per arm: benchmark v1 and every suite variant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ARMS = ("fixed", "robust", "robust+aug", "full")


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/ablate")
    rows, variants = [], None
    for arm in ARMS:
        ev, su = root / arm / "eval.json", root / arm / "suite.json"
        if not (ev.exists() and su.exists()):
            continue
        e = json.loads(ev.read_text())["models"]["lcm-1"]
        s = json.loads(su.read_text())
        variants = variants or list(s["variants"])
        suite = {"in-domain": s["in_domain"]["models"]["lcm-1"]["f1"]}
        suite.update({v: s["variants"][v]["models"]["lcm-1"]["f1"] for v in variants})
        rows.append((arm, e, suite))
    if not rows:
        raise SystemExit(f"no evaluated arms under {root}")
    cols = ["in-domain", *variants]
    print("| arm | v1 F1 | v1 Pearson | v1 SSIM | " + " | ".join(f"suite {c}" for c in cols) + " |")
    print("|---" * (4 + len(cols)) + "|")
    for arm, e, suite in rows:
        cells = [f"{e['f1']:.3f}", f"{e['pearson']:.3f}", f"{e['ssim']:.3f}"]
        cells += [f"{suite[c]:.3f}" for c in cols]
        print(f"| {arm} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
