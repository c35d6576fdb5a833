"""Does training from a folder lose anything? (issue #12: `train --data` on the simulator's own
folder, `--preset default`, against the packaged recipe, which simulates its fields in memory).

    python experiments/folder_recipe_check.py --make runs/simfolder
    lcm-stain train --data runs/simfolder --preset default --out runs/folder-default --seed 0
    lcm-stain evaluate --n 64 --weights-dir runs/folder-default --json runs/folder-default/eval64.json
    python experiments/folder_recipe_check.py --compare docs/results/evaluate-n64-v0.0.5.json runs/folder-default/eval64.json

(Run on release 0.0.5, commit 0738aa8, against its packaged weights. Today's `default`
preset also trains the texture decoder, so on today's code compare against a run of the same
code, e.g. the `lcm-1` rows of both JSON files, not against the 0.0.5 file.)

`--make` writes the 0.0.5–0.0.7 default preset's data mix (128 fields; the 0.1.0 preset has 512) as files (`simulate.write_dataset`): 48 `brain-20x`,
48 `tumour-dense-20x` and 32 `domain-random` pairs of 256², in three sub-folders listed by one
`pairs.csv` (seeds 0, 1 000 and 2 000 on; the benchmark's are 900 000+). `--compare A B` prints
LCM-1 of B minus LCM-1 of A on the same benchmark fields with 95 % paired bootstrap intervals
(`evaluate.compare_rows`): "loses nothing" means every interval contains 0 or lies above it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from napari_lcm_stain.evaluate import compare_rows
from napari_lcm_stain.simulate import write_dataset

MIX = (("brain-20x", 48, 0), ("tumour-dense-20x", 48, 1000), ("domain-random", 32, 2000))


def make(out: Path) -> None:
    rows = ["qobm,dapi"]
    for preset, n, seed in MIX:
        for q in write_dataset(out / preset, preset, n=n, size=256, seed=seed):
            d = q.with_name(q.name.replace("_qobm", "_dapi"))
            rows.append(f"{q.relative_to(out)},{d.relative_to(out)}")
    (out / "pairs.csv").write_text("\n".join(rows) + "\n")
    print(f"wrote {len(rows) - 1} pairs and {out / 'pairs.csv'}")


def compare(a: Path, b: Path) -> None:
    ra, rb = (json.loads(p.read_text())["models"]["lcm-1"] for p in (a, b))
    for key, d in compare_rows(rb, ra).items():
        print(f"{key:16s} {d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--make", type=Path, help="write the folder here")
    ap.add_argument("--compare", type=Path, nargs=2, metavar=("PACKAGED", "FOLDER"))
    a = ap.parse_args()
    if a.make:
        make(a.make)
    if a.compare:
        compare(*a.compare)


if __name__ == "__main__":
    main()
