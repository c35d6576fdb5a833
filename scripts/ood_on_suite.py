"""False-alarm rate of the out-of-distribution score on the held-out instrument suite.

    python scripts/ood_on_suite.py --n 8 --json docs/results/ood-suite.json
    python scripts/ood_on_suite.py --n 8 --reference runs/ood_candidate.json

Each variant's fields are scored as `stain` would see them (pixel size only where the variant
gives it). A flag here is a false alarm only where the model still works on that variant.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from napari_lcm_stain.evaluate import IN_DOMAIN, INSTRUMENT_VARIANTS, suite_fields
from napari_lcm_stain.ood import load_reference, ood_score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--reference", type=Path, default=None, help="reference JSON (default: packaged)"
    )
    a = ap.parse_args()
    ref = None if a.reference is None else load_reference(a.reference)
    out, total, flagged = {}, 0, 0
    for v in (IN_DOMAIN, *INSTRUMENT_VARIANTS):
        scores = []
        for s in suite_fields(v, a.n, a.size):
            r = ood_score(s.qobm, s.pixel_size if v.pixel_size_known else None, ref)
            scores.append(r["score"])
        n_flag = sum(sc > r["threshold"] for sc in scores)
        out[v.name] = {"n": len(scores), "flagged": n_flag, "scores": scores}
        total += len(scores)
        flagged += n_flag
        print(
            f"{v.name:18s} flagged {n_flag}/{len(scores)}  scores {[round(x, 1) for x in scores]}"
        )
    out["all"] = {"n": total, "flagged": flagged, "rate": flagged / total}
    print(f"all: {flagged}/{total} flagged ({100 * flagged / total:.0f} %)")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
