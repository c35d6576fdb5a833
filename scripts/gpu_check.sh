#!/usr/bin/env bash
# One prepared GPU check (≤ 8 min on an H200), run on a lent device machine from the repo root:
#   device run, carry [".whl"], command "bash scripts/gpu_check.sh"
# Before the call, here: bash scripts/gpu_check.sh --wheels  (downloads the Python 3.12 wheels the
# device image lacks into .whl/, which .git/info/exclude must ignore).
# Writes $OUT/gpu_check.json (agreement, training rates, fine-tune), $OUT/bench_cuda.json and
# $OUT/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--wheels" ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
  # what the device image lacks (it has torch, numpy, scipy, scikit-image, tifffile, safetensors)
  for pkg in diffusers dask zarr numcodecs donfig google-crc32c crc32c partd locket toolz \
             importlib-metadata npe2 psygnal pydantic pydantic-core annotated-types \
             typing-inspection tomli-w build; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp $plat -d .whl "$pkg" || echo "could not fetch $pkg" >&2
  done
  exit 0
fi

OUT="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

echo "== pytest -m gpu"
timeout 180 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py || echo "GPU TESTS FAILED"
echo "== bench --device cuda (2048², fp16 auto)"
timeout 120 python3 -m napari_lcm_stain.cli bench --device cuda --size 2048 --big 0 \
  --repeats 5 --json "$OUT/bench_cuda.json" || echo "BENCH FAILED"
echo "== bench --device cuda --precision bf16"
timeout 90 python3 -m napari_lcm_stain.cli bench --device cuda --size 2048 --big 0 \
  --repeats 5 --precision bf16 --json "$OUT/bench_cuda_bf16.json" || echo "BENCH BF16 FAILED"
echo "== agreement, 200 steps per training stage, 100-step fine-tune"
timeout 200 python3 scripts/gpu_check.py "$OUT/gpu_check.json" /tmp/gpu-train || echo "CHECK FAILED"
echo "== done"
