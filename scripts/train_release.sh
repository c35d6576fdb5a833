#!/usr/bin/env bash
# The release training of the packaged weights since 0.3.0 (docs/model-card.md, "Training"):
# transfer from the packaged weights with the `release` preset (training/presets.py), the
# teacher, LCM and polish stages; the decoder and Pix2Pix are the init's. Stages resume by file:
# run it again after an interruption. Bump src/napari_lcm_stain/_version.py first (the stages
# record it), then re-make the measurements with scripts/remeasure_release.sh.
#
#     OMP_WAIT_POLICY=PASSIVE bash scripts/train_release.sh runs/release
set -euo pipefail
OUT=${1:-runs/release}
mkdir -p "$OUT"
WEIGHTS=$(python -c "from napari_lcm_stain import checkpoints as c; print(c.WEIGHTS_DIR)")
# the init's Pix2Pix ships again: keep a copy (a stage file in OUT before training would be
# taken for another run's stage), then put it beside the new models for packaging
mkdir -p "$OUT/init-pix2pix"
for ext in safetensors json; do
    [ -e "$OUT/init-pix2pix/pix2pix.$ext" ] || cp "$WEIGHTS/pix2pix.$ext" "$OUT/init-pix2pix/"
done
lcm-stain train --preset release --init packaged --out "$OUT" --stages teacher lcm polish
cp "$OUT/init-pix2pix/pix2pix.safetensors" "$OUT/init-pix2pix/pix2pix.json" "$OUT/"
python -c "import sys; from napari_lcm_stain.training.packaging import package_weights; package_weights(sys.argv[1])" "$OUT"
