"""`lcm-stain demo`: outputs exist, are sane, and are never silently overwritten."""

import json

import numpy as np
import pytest
import tifffile

from napari_lcm_stain.cli import main

pytestmark = pytest.mark.slow


def test_demo_writes_outputs_and_refuses_overwrite(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert str(out.resolve()) in printed
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["models"]) == {"oracle", "lcm", "pix2pix"}
    for name in ("lcm", "pix2pix"):
        assert 0.0 < report["models"][name]["pearson"] <= 1.0
        assert 0.0 <= report["models"][name]["f1"] <= 1.0
    lcm = tifffile.imread(out / "dapi_lcm.ome.tif")
    assert lcm.shape == (512, 512) and lcm.dtype == np.float32 and 0 <= lcm.min() <= lcm.max() <= 1
    assert (out / "side_by_side.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = (out / "metrics.json").read_bytes()
    assert main(["demo", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "metrics.json").read_bytes() == before
