#!/usr/bin/env bash
# Package a finished training run and re-make every number the docs quote from the packaged
# weights (model card, docs/engine.md, screenshots). Usage: bash scripts/remeasure_release.sh runs/v4
# Logs go to RUN-measure/; the JSON results to docs/results/. Takes ~15 min on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:?usage: remeasure_release.sh RUN_DIR}
M="${RUN%/}-measure"
mkdir -p "$M"
set -x
lcm-stain train --preset default --out "$RUN" --seed 0 --package > "$M/package.txt" 2>&1
lcm-stain evaluate --json docs/results/evaluate.json > "$M/evaluate.txt" 2> "$M/evaluate.err"
lcm-stain evaluate --n 64 --json docs/results/evaluate-n64.json > "$M/evaluate-n64.txt" 2> "$M/evaluate-n64.err"
lcm-stain bench --json docs/results/bench.json > "$M/bench.txt" 2>&1
python scripts/grid_artefact.py > "$M/grid.txt" 2>&1
python -m napari_lcm_stain.bench uncertainty > "$M/uncertainty.txt" 2>&1
python scripts/finetune_shifted.py > "$M/finetune.txt" 2>&1
python scripts/realism_probe.py --spectral-polish 0.05 "$RUN" "${RUN%/}-spec0.05" > "$M/specpolish.txt" 2>&1
python scripts/realism_probe.py "${RUN%/}-spec0.05/lcm.safetensors" --save-png docs/images/realism_probe.png > "$M/realism.txt" 2>&1
python scripts/screenshots.py > "$M/screenshots.txt" 2>&1
