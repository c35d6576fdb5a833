"""Nuclei F1 of LCM-1 and Pix2Pix on tissue families the 0.2.0 mix trains on (glands, sheets,
streams, necrosis; 8 fields of 256² each, suite seeds, brain-20x / tumour-dense-20x optics), for
the packaged weights and those of an earlier release read from git.

    python experiments/tissue_family_check.py [--old 4925c4b] [--json docs/results/tissue-families.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

from napari_lcm_stain import evaluate as E

FAMILIES = ("gland", "sheet", "stream", "necrosis")
WEIGHTS = "src/napari_lcm_stain/weights"


def weights_at(commit: str, out: Path) -> Path:
    """The packaged checkpoints of ``commit`` (git show) in ``out``."""
    for name in ("lcm", "teacher", "pix2pix"):
        for ext in ("safetensors", "json"):
            blob = subprocess.run(["git", "show", f"{commit}:{WEIGHTS}/{name}.{ext}"],
                                  capture_output=True, check=True).stdout  # fmt: skip
            (out / f"{name}.{ext}").write_bytes(blob)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", default="4925c4b", help="commit of the earlier release's weights")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = (E.ORACLE, E.Row("lcm-1", "lcm", 1), E.Row("pix2pix", "pix2pix", None))
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        old = weights_at(a.old, Path(tmp))
        for fam in FAMILIES:
            fields = E.suite_fields(E.InstrumentVariant(fam, fam, (("layout", fam),)), a.n, 256)
            for tag, wd in ((a.old, old), ("packaged", None)):
                m, _ = E.evaluate_rows(
                    fields, rows, device="cpu", weights_dir=wd, log=lambda *_: None
                )  # noqa: E501
                out[f"{fam}|{tag}"] = {k: round(m[k]["f1"], 3) for k in m}
                print(fam, tag, out[f"{fam}|{tag}"], flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
