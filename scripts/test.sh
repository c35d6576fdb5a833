#!/usr/bin/env bash
# The README's test command: installs what the tests need (system GUI libraries for a real napari
# viewer under Xvfb, the CPU build of torch, the package with its test extra), then lint, tests,
# packaging checks. Used verbatim by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PKGS="xvfb libgl1-mesa-dri libgl1 libegl1 libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 \
libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 \
libxcb-shape0 libdbus-1-3 libfontconfig1"
missing=""
for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing system packages for headless GUI tests:$missing"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  else
    echo "GUI tests need these Debian packages (install as root):$missing" >&2
    exit 1
  fi
fi

echo "== python packages"
python -m pip install -q --disable-pip-version-check "torch==2.13.0"
python -m pip install -q --disable-pip-version-check -e ".[testing]"

echo "== ruff"
ruff check src tests scripts experiments
ruff format --check src tests scripts experiments

echo "== manifest"
npe2 validate napari-lcm-stain

echo "== wheel + sdist"
rm -rf dist
python -m build -q . >/dev/null 2>&1 || python -m build .
twine check --strict dist/*
python scripts/check_wheel.py dist/*.whl

echo "== tests"
export MPLBACKEND=Agg
python -m pytest -ra -p no:cacheprovider "$@"
