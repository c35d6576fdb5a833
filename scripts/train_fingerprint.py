"""Fingerprint every tensor a training run writes, to check that a refactor changes nothing.

    python scripts/train_fingerprint.py --preset tiny --out /tmp/run-a > a.json
    (change the code)
    python scripts/train_fingerprint.py --preset tiny --out /tmp/run-b > b.json
    diff a.json b.json   # empty: bit-identical weights

It trains the preset from scratch (`--no-resume`) and prints, per checkpoint, a SHA-256 of each
tensor's raw bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from safetensors.numpy import load_file


def fingerprint(run: Path) -> dict:
    out = {}
    for f in sorted(run.glob("*.safetensors")):
        tensors = load_file(str(f))
        out[f.name] = {
            k: hashlib.sha256(v.tobytes()).hexdigest()[:16] for k, v in sorted(tensors.items())
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from napari_lcm_stain.training import run_recipe

    run_recipe(a.preset, a.out, seed=a.seed, resume=False, quiet=True)
    print(json.dumps(fingerprint(a.out), indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
