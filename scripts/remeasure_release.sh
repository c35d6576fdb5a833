#!/usr/bin/env bash
# Package a finished training run and re-make every number the docs quote from the packaged
# weights (model card, docs/metrics.md, figures). Usage: bash scripts/remeasure_release.sh runs/rel
# Logs go to RUN-measure/; the JSON results to docs/results/. ~40 min on 2 idle CPU cores.
# Steps can be skipped by listing them in SKIP (e.g. SKIP="package finetune").
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:?usage: remeasure_release.sh RUN_DIR}
M="${RUN%/}-measure"
mkdir -p "$M"
step() { [[ " ${SKIP:-} " == *" $1 "* ]] && return 1; echo "== $1" >&2; }
set -x
if step package; then  # a finished scripts/train_release.sh run (it packages too: SKIP="package")
  python -c "import sys; from napari_lcm_stain.training.packaging import package_weights; package_weights(sys.argv[1])" "$RUN" > "$M/package.txt" 2>&1
fi
if step evaluate; then
  lcm-stain evaluate --json "$M/evaluate.json" > "$M/evaluate.txt" 2> "$M/evaluate.err"
  lcm-stain evaluate --n 64 --json docs/results/evaluate-n64.json > "$M/evaluate-n64.txt" 2> "$M/evaluate-n64.err"
fi
if step suite; then
  lcm-stain evaluate --suite instruments --n 16 --json docs/results/instruments.json > "$M/suite.txt" 2> "$M/suite.err"
fi
if step ood; then
  python scripts/ood_reference.py --measure --json docs/results/ood.json > "$M/ood.txt" 2>&1
  python scripts/ood_on_suite.py --n 8 --json docs/results/ood-suite.json > "$M/ood-suite.txt" 2>&1
fi
if step bench; then
  lcm-stain bench --json docs/results/bench.json --overwrite > "$M/bench.txt" 2>&1
  python scripts/grid_artefact.py > "$M/grid.txt" 2>&1
fi
if step figures; then
  python scripts/figure_crops.py > "$M/crops.txt" 2>&1
  python scripts/screenshots.py > "$M/screenshots.txt" 2>&1
fi
if step finetune; then
  python scripts/finetune_multi.py > "$M/finetune.txt" 2>&1
fi
