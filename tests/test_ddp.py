"""Training scales out with torchrun: the tiny recipe under 2 CPU processes (gloo, loopback)."""

import shutil
import subprocess
import sys

import numpy as np
import pytest

from napari_lcm_stain.sampling import load_predictor

pytestmark = pytest.mark.slow


def test_tiny_recipe_under_torchrun_two_processes(tmp_path):
    torchrun = shutil.which("torchrun")
    cmd = ([torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--standalone", "--nproc_per_node", "2",
        "-m", "napari_lcm_stain.cli", "train", "--preset", "tiny", "--out", str(tmp_path),
        "--threads", "1",
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in ("vae", "teacher", "lcm", "pix2pix"):
        assert (tmp_path / f"{stage}.safetensors").exists()
        rows = np.loadtxt(tmp_path / f"{stage}_loss.csv", delimiter=",", skiprows=1, ndmin=2)
        # only rank 0 logs: one row per logging window, not two
        assert len(rows) == len(set(rows[:, 0])), stage
    teacher = np.loadtxt(tmp_path / "teacher_loss.csv", delimiter=",", skiprows=1, ndmin=2)[:, 1]
    assert teacher[-1] < teacher[0]
    p = load_predictor(tmp_path / "lcm.safetensors", device="cpu")
    assert p.name == "LCM-1"
