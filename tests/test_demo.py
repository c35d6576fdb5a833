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
    # the whole table: realism too, the winner of each column, one line explaining each name
    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model "))
    assert lines[header].split() == ["model", "pearson", "ssim", "F1", "realism"]
    for i, name in enumerate(("oracle", "lcm", "pix2pix"), start=header + 1):
        m = report["models"][name]
        want = [name] + [f"{m[k]:.3f}" for k in ("pearson", "ssim", "f1", "realism")]
        assert lines[i].split() == want
    real = {k: v for k, v in report["models"].items() if k != "oracle"}
    best_realism = min(real, key=lambda k: real[k]["realism"])
    assert f"realism {best_realism}" in lines[header + 4]
    explained = [line.split()[0] for line in lines[header + 5 :]]
    assert explained == ["oracle", "lcm", "pix2pix", "pearson", "ssim", "F1", "realism"]
    assert "ceiling" in lines[header + 5] and set(report["legend"]) == set(explained)
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
