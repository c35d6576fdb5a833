#!/usr/bin/env bash
# `train --data` on the simulator's own folder with the tiny preset: from scratch and from the
# packaged weights (--init packaged). Prints wall time and each run's validation.json scores.
#   bash experiments/train_folder_tiny.sh [WORKDIR]
set -euo pipefail
W=${1:-/tmp/train-folder-tiny}
rm -rf "$W" && mkdir -p "$W"
lcm-stain simulate --out "$W/pairs" --n 8 --size 256 --seed 50
for mode in scratch transfer; do
  extra=()
  [ "$mode" = transfer ] && extra=(--init packaged)
  t0=$(date +%s)
  lcm-stain train --data "$W/pairs" --preset tiny --out "$W/run-$mode" "${extra[@]}" > "$W/$mode.log"
  echo "$mode: $(( $(date +%s) - t0 )) s wall"
  grep -E "^\[(register|data|validation)\]" "$W/$mode.log"
done
