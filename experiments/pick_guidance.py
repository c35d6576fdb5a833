"""Pick a guided LCM's default guidance, and how it is applied, on validation fields.

    python experiments/pick_guidance.py runs/release/lcm.safetensors --json docs/results/guidance-pick.json

LCM-1 on the teacher ablation's 24 validation fields (seeds 800 000+, brain-20x and
tumour-dense-20x; never the benchmark) at each guidance, once through the network's guidance
input ("embedding", no extra cost) and once classifier-free ("cfg": both branches, the qOBM
zeroed in one, twice the U-Net's cost). The rule, fixed before looking: within each method, the
smallest w whose clear-nucleus brightness reaches 0.9 with nuclei F1 no more than 0.01 below w =
1; if none reaches 0.9, the brightest such w. The embedding is used where its pick is within
0.05 brightness of the cfg pick's; otherwise cfg. Apply it with
`training.packaging.set_guidance("lcm", default=W, method=M)` (and the teacher likewise).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from ablate_teacher import fmt, score_model, validation_fields

WS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)
BRIGHT, F1_SLACK, SAME = 0.9, 0.01, 0.05


def pick(rows: dict[float, dict]) -> float:
    ok = [w for w in sorted(rows) if rows[w]["f1"] >= rows[1.0]["f1"] - F1_SLACK]
    bright = [w for w in ok if rows[w]["bright_clear"] >= BRIGHT]
    return bright[0] if bright else max(ok, key=lambda w: rows[w]["bright_clear"])


def main(argv: list[str] | None = None) -> None:
    from napari_lcm_stain.sampling import load_predictor

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("lcm", type=Path)
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    samples = validation_fields(a.n, a.size)
    base = load_predictor(a.lcm, 1, device="cpu")
    result: dict = {"checkpoint": str(a.lcm), "n": a.n, "rows": {}, "pick": {}}
    for method in ("embedding", "cfg"):
        rows = {}
        for w in WS:
            pred = base.with_guidance(w)
            if pred is base:
                pred = copy.copy(base)
            pred.config = {**base.config, "guidance": {**base.config["guidance"], "method": method}}
            rows[w] = score_model(pred, samples)
            print(f"{method:9s} w {w:<5g} {fmt(rows[w])}", flush=True)
        result["rows"][method] = {f"{w:g}": r for w, r in rows.items()}
        result["pick"][method] = pick(rows)
    e, c = result["pick"]["embedding"], result["pick"]["cfg"]
    close = abs(result["rows"]["embedding"][f"{e:g}"]["bright_clear"]
                - result["rows"]["cfg"][f"{c:g}"]["bright_clear"]) <= SAME  # fmt: skip
    result["choice"] = (
        {"method": "embedding", "default": e} if close else {"method": "cfg", "default": c}
    )
    print("picked:", result["choice"])
    if a.json is not None:
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
