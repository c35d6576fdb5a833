"""scripts/check_wheel.py works from a venv, not only from a bare interpreter (issue 15, item 19).

The README's test command runs it; inside a user's venv its scratch venv used to see only the base
interpreter's packages (`--system-site-packages`), so `npe2` was missing there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]

MAKE_SCRATCH = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import check_wheel
print(check_wheel.scratch_venv(Path(sys.argv[2])))
"""


def _run(py, code, *args, **kw):
    return subprocess.run([str(py), "-c", code, *map(str, args)], capture_output=True, text=True,
                          **kw)  # fmt: skip


def test_scratch_venv_sees_the_packages_of_the_venv_it_runs_in(tmp_path):
    # a user's venv: the base interpreter's packages plus one that only this venv has
    outer = tmp_path / "outer"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages",
                    str(outer)], check=True)  # fmt: skip
    outer_py = outer / "bin" / "python"
    site = _run(outer_py, "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    (Path(site.stdout.strip()) / "only_in_outer_venv.py").write_text("VALUE = 42\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}  # as the tests run: the source tree
    made = _run(outer_py, MAKE_SCRATCH, ROOT / "scripts", tmp_path / "scratch", env=env)
    assert made.returncode == 0, made.stderr
    scratch_py = made.stdout.strip().splitlines()[-1]
    assert scratch_py.startswith(str(tmp_path / "scratch"))
    # isolated (-I), as check_wheel runs its check: the outer venv's own package is importable
    seen = subprocess.run([scratch_py, "-I", "-c", "import only_in_outer_venv as m; print(m.VALUE)"],
                          capture_output=True, text=True)  # fmt: skip
    assert seen.returncode == 0 and seen.stdout.strip() == "42", seen.stderr
    # ... and so are the base interpreter's (pip, which the scratch venv has on its own, aside)
    numpy = subprocess.run([scratch_py, "-I", "-c", "import numpy"], capture_output=True)
    assert numpy.returncode == 0
    # but not this project's source tree: only an installed wheel may provide the package
    own = subprocess.run([scratch_py, "-I", "-c", "import napari_lcm_stain"], capture_output=True,
                         text=True)  # fmt: skip
    assert "No module named 'napari_lcm_stain'" in own.stderr
