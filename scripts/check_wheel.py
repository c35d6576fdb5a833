"""Check a built wheel: manifest and weights inside, and the napari.manifest entry point resolves
from a real (non-editable) install in a throw-away venv.

The throw-away venv must see the dependencies of whatever environment runs this script: a venv, a
conda env or a bare interpreter. `venv --system-site-packages` does not do that from inside a venv
(it links the *base* interpreter's site-packages, not the venv's), so the venv is made plain and a
`.pth` file appends the running interpreter's package folders after its own site-packages. This
project's source tree (an editable install, or PYTHONPATH=src) is left out, so the only
napari_lcm_stain it can import is the wheel's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "napari_lcm_stain"
CHECK = """
import sys
from importlib.metadata import entry_points
import napari_lcm_stain
from npe2 import PluginManifest
f = napari_lcm_stain.__file__
assert f.startswith(sys.prefix + '/') and '/site-packages/' in f and '/src/' not in f, f
ep = [e for e in entry_points(group='napari.manifest') if e.name == 'napari-lcm-stain']
assert len(ep) == 1, ep
pm = PluginManifest.from_distribution('napari-lcm-stain')
assert pm.name == 'napari-lcm-stain', pm.name
print('wheel install ok:', f, len(pm.contributions.widgets), 'widgets')
"""
OWN_PATHS = (
    "import json, sys, sysconfig; print(json.dumps([sys.path, sysconfig.get_paths()['purelib']]))"
)


def _is_source_tree(path: str) -> bool:
    """A folder holding this project's package that is not an installed-packages folder."""
    p = Path(path)
    installed = {"site-packages", "dist-packages"} & set(p.parts)
    return (p / PACKAGE).is_dir() and not installed


def scratch_venv(where: Path) -> Path:
    """A new venv under `where` (with pip) that also imports every package the running
    interpreter can, except this project's source tree; returns its python."""
    venv = Path(where) / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    out = subprocess.run([str(py), "-I", "-c", OWN_PATHS], check=True, capture_output=True)
    own_path, purelib = json.loads(out.stdout)
    skip = {os.path.abspath(p) for p in own_path} | {os.path.dirname(os.path.abspath(__file__))}
    extra = [
        p
        for p in dict.fromkeys(os.path.abspath(p) for p in sys.path if p)
        if os.path.isdir(p) and p not in skip and not _is_source_tree(p)
    ]
    (Path(purelib) / "_outer_environment.pth").write_text("".join(p + "\n" for p in extra))
    return py


def main(wheel: str) -> int:
    names = zipfile.ZipFile(wheel).namelist()
    need = [f"{PACKAGE}/napari.yaml"]
    weights = [n for n in names if n.startswith(f"{PACKAGE}/weights/")]
    missing = [n for n in need if n not in names]
    if missing:
        print(f"wheel lacks {missing}", file=sys.stderr)
        return 1
    print(f"wheel has the manifest and {len(weights)} weight files")
    with tempfile.TemporaryDirectory() as d:
        py = str(scratch_venv(Path(d)))
        subprocess.run(
            [py, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check", wheel],
            check=True,
        )
        subprocess.run([py, "-I", "-c", CHECK], check=True, cwd=d)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
