"""Check a built wheel: manifest and weights inside, and the napari.manifest entry point resolves
from a real (non-editable) install in a throw-away venv."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

CHECK = """
import sys
from importlib.metadata import entry_points
import napari_lcm_stain
from npe2 import PluginManifest
assert '/site-packages/' in napari_lcm_stain.__file__ and '/src/' not in napari_lcm_stain.__file__, napari_lcm_stain.__file__
ep = [e for e in entry_points(group='napari.manifest') if e.name == 'napari-lcm-stain']
assert len(ep) == 1, ep
pm = PluginManifest.from_distribution('napari-lcm-stain')
assert pm.name == 'napari-lcm-stain', pm.name
print('wheel install ok:', napari_lcm_stain.__file__, len(pm.contributions.widgets), 'widgets')
"""


def main(wheel: str) -> int:
    names = zipfile.ZipFile(wheel).namelist()
    need = ["napari_lcm_stain/napari.yaml"]
    weights = [n for n in names if n.startswith("napari_lcm_stain/weights/")]
    missing = [n for n in need if n not in names]
    if missing:
        print(f"wheel lacks {missing}", file=sys.stderr)
        return 1
    print(f"wheel has the manifest and {len(weights)} weight files")
    with tempfile.TemporaryDirectory() as d:
        venv = Path(d) / "venv"
        subprocess.run(
            [sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True
        )
        py = str(venv / "bin" / "python")
        subprocess.run(
            [py, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check", wheel],
            check=True,
        )
        subprocess.run([py, "-I", "-c", CHECK], check=True, cwd=d)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
