"""Issue 7: `lcm-stain stain` on bad files, bad models and interrupted writes (in-process).

Every user error exits with code 2 and ONE line on stderr, `lcm-stain stain: error: ...`, never
a traceback; an existing output is never replaced by a truncated or partial file, and no temp files
are left behind. "lcm" is routed to the fast fake predictor; checkpoint paths go through the real
loader (a tiny, untrained LCM checkpoint is built per test module).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from _fake_predictor import FakePredictor, blobs
from napari_lcm_stain import checkpoints, cli, engine, io
from napari_lcm_stain._drain import drain
from napari_lcm_stain.models import VAE, LatentUNet

T = ["--tile", "64", "--overlap", "16"]
KW = {"tile": 64, "overlap": 16}


@pytest.fixture(scope="module")
def pred():
    return FakePredictor()


@pytest.fixture(autouse=True)
def fake_lcm(monkeypatch, pred):
    """'lcm' -> the fake predictor; paths and other names go to the real loader."""
    real = engine.get_predictor
    monkeypatch.setattr(
        engine,
        "get_predictor",
        lambda m, *a, **k: pred if m == "lcm" else real(m, *a, **k),
    )


def tiny_lcm(path, channels=(8, 16), config_channels=None, **cfg_extra):
    """An untrained but complete LCM checkpoint (real loader, real predictor, ~0.3 MB)."""
    torch.manual_seed(0)
    unet, vae = LatentUNet(4, 4, channels), VAE(4, 8, 8)
    cfg = {
        "kind": "lcm",
        "architecture": {
            "unet": {
                "class": "LatentUNet",
                "kwargs": {
                    "latent_channels": 4,
                    "factor": 4,
                    "channels": list(config_channels or channels),
                },
            },
            "vae": {
                "class": "VAE",
                "kwargs": {"latent_channels": 4, "enc_channels": 8, "dec_channels": 8},
            },
        },
        "latent_scale": 1.0,
        "normalization": {"qobm_mean": 0.0, "qobm_std": 0.1},
        "pixel_size": 0.414,
        "receptive_field": 16,
        **cfg_extra,
    }
    return checkpoints.save_checkpoint(path, {"unet": unet, "decoder": vae.decoder}, cfg)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_lcm(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture
def good(tmp_path):
    p = tmp_path / "in.tif"
    tifffile.imwrite(p, blobs((48, 64)))
    return p


def digest(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def leftovers(folder) -> list[str]:
    """Temp / backup names our atomic writers use (`.name.tmp-PID`, `.name.old-PID`, *.tmp)."""
    return sorted(
        n
        for n in os.listdir(folder)
        if n.startswith(".") or n.endswith(".tmp") or ".tmp-" in n or ".old-" in n
    )


def fails_cleanly(capsys, args, match, code=2) -> str:
    """Run the CLI; assert exit code, one error line matching `match`, no traceback."""
    rc = cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines, "no message on stderr"
    last = lines[-1]
    assert last.startswith(f"lcm-stain {args[0]}: "), repr(err)  # its own line, not after a bar
    assert sum("error:" in ln for ln in lines) <= 1
    assert re.search(match, last), last
    return last


# ------------------------------------------------------------------------------ inputs


def test_missing_input(capsys, tmp_path):
    fails_cleanly(capsys, ["stain", tmp_path / "nope.tif", "-o", tmp_path / "o.ome.tif"],
                  "input not found: .*nope.tif")  # fmt: skip
    fails_cleanly(capsys, ["stain", str(tmp_path / "*.tif"), "-o", tmp_path / "o"],
                  "no files match")  # fmt: skip
    assert leftovers(tmp_path) == []


def _corrupt_files(tmp_path, good):
    data = good.read_bytes()
    comp = tmp_path / "comp.tif"
    tifffile.imwrite(comp, blobs((64, 64)), compression="zlib")
    cdata = comp.read_bytes()
    return {
        "garbage with TIFF magic": b"II*\x00" + b"garbage!" * 40,
        "empty file": b"",
        "not a TIFF at all": b"hello, this is text",
        "truncated uncompressed": data[: len(data) // 2],
        "truncated compressed": cdata[: len(cdata) - 300],
    }


def test_corrupt_and_truncated_tiffs_give_one_line(capsys, tmp_path, good):
    out = tmp_path / "out"
    for name, blob in _corrupt_files(tmp_path, good).items():
        bad = tmp_path / "bad.tif"
        bad.write_bytes(blob)
        line = fails_cleanly(capsys, ["stain", bad, "-o", out, *T], r"bad\.tif")
        assert "corrupt" in line or "not a TIFF" in line, (name, line)
        assert not out.exists() or os.listdir(out) == [], name  # nothing half-written
        assert leftovers(tmp_path) == [], name


@pytest.mark.parametrize(
    "shape, photometric",
    [((48, 64, 3), "rgb"), ((48, 64, 4), "rgb"), ((2, 48, 64, 3), "rgb")],
    ids=["RGB", "RGBA", "RGB stack"],
)
def test_rgb_tiff_is_refused_with_the_fix(capsys, tmp_path, shape, photometric):
    p = tmp_path / "rgb.tif"
    tifffile.imwrite(p, np.zeros(shape, np.uint8), photometric=photometric)
    line = fails_cleanly(capsys, ["stain", p, "-o", tmp_path / "o.ome.tif", *T], "RGB/RGBA")
    assert "one channel" in line
    assert sorted(os.listdir(tmp_path)) == ["rgb.tif"]


def test_all_nan_tiff_is_refused_and_leaves_nothing(capsys, tmp_path):
    p = tmp_path / "nan.tif"
    tifffile.imwrite(p, np.full((40, 40), np.nan, np.float32))
    fails_cleanly(capsys, ["stain", p, "-o", tmp_path / "o.ome.tif", *T], "no finite pixels")
    assert sorted(os.listdir(tmp_path)) == ["nan.tif"]


# ------------------------------------------------------------------------------ outputs


def test_output_equal_to_input_is_refused_in_every_spelling(capsys, tmp_path, good):
    before = digest(good)
    link = tmp_path / "link.tif"
    link.symlink_to(good)
    spellings = [good, tmp_path / "." / "in.tif", link]
    for o in spellings:
        for extra in ([], ["--overwrite"]):
            fails_cleanly(capsys, ["stain", good, "-o", o, *T, *extra], "is one of the inputs")
    assert digest(good) == before
    # a folder output whose planned file (x.tif -> x_dapi.ome.tif) is one of the inputs
    d = tmp_path / "d"
    d.mkdir()
    tifffile.imwrite(d / "x.tif", blobs((16, 16)))
    tifffile.imwrite(d / "x_dapi.ome.tif", blobs((16, 16)))
    b = digest(d / "x_dapi.ome.tif")
    fails_cleanly(capsys, ["stain", d / "x.tif", d / "x_dapi.ome.tif", "-o", d, "--overwrite"],
                  "x_dapi.ome.tif is one of the inputs")  # fmt: skip
    assert digest(d / "x_dapi.ome.tif") == b


def test_existing_output_needs_overwrite(capsys, tmp_path, good):
    out = tmp_path / "o.ome.tif"
    assert cli.main(["stain", str(good), "-o", str(out), *T, "--seed", "1"]) == 0
    first = digest(out)
    fails_cleanly(capsys, ["stain", good, "-o", out, *T, "--seed", "2"], "exists.*--overwrite")
    assert digest(out) == first  # byte-identical
    # also the folder form and the _std companion
    folder = tmp_path / "res"
    assert cli.main(["stain", str(good), "-o", str(folder), *T, "--samples", "2"]) == 0
    std = folder / "in_dapi_std.ome.tif"
    std_before = digest(std)
    (folder / "in_dapi.ome.tif").unlink()
    fails_cleanly(capsys, ["stain", good, "-o", folder, *T, "--samples", "2"], "_std.*exists")
    assert digest(std) == std_before and not (folder / "in_dapi.ome.tif").exists()
    capsys.readouterr()

    assert cli.main(["stain", str(good), "-o", str(out), *T, "--seed", "2", "--overwrite"]) == 0
    assert digest(out) != first
    arr, _ = io.read_image(out)
    res = np.asarray(arr)
    assert res.shape == (48, 64) and np.isfinite(res).all() and 0 <= res.min() <= res.max() <= 1
    assert leftovers(tmp_path) == []


def test_overwrite_replaces_a_zarr_output(capsys, tmp_path, good):
    out = tmp_path / "o.ome.zarr"
    assert cli.main(["stain", str(good), "-o", str(out), *T, "--seed", "1"]) == 0
    a = np.asarray(io.read_image(out)[0][...])
    fails_cleanly(capsys, ["stain", good, "-o", out, *T], "exists.*--overwrite")
    np.testing.assert_array_equal(io.read_image(out)[0][...], a)
    assert cli.main(["stain", str(good), "-o", str(out), *T, "--seed", "2", "--overwrite"]) == 0
    b = np.asarray(io.read_image(out)[0][...])
    assert b.shape == (48, 64) and not np.array_equal(a, b)
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------ models


def test_bad_model_paths(capsys, tmp_path, good):
    o = tmp_path / "o.ome.tif"
    cases = {
        "missing file": (tmp_path / "nope.safetensors", "checkpoint not found"),
        "unknown name": ("lcmm", "unknown model 'lcmm'"),
        "folder": (tmp_path, "is a folder"),
    }
    for name, (model, match) in cases.items():
        fails_cleanly(capsys, ["stain", good, "-o", o, "--model", model, *T], match)
        assert not o.exists(), name
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    fails_cleanly(capsys, ["stain", good, "-o", o, "--model", garbage, *T], "not a valid|corrupt")
    assert leftovers(tmp_path) == []


class _Payload:
    """Unpickling this would create a file: the proof that nothing was ever unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_renamed_to_safetensors_is_refused_never_unpickled(
    capsys, tmp_path, good, monkeypatch
):
    marker = tmp_path / "UNPICKLED"
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled!"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled!"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called!"))
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    (tmp_path / "evil.json").write_text(json.dumps({"format_version": 1, "kind": "lcm"}))
    zipped = tmp_path / "zipped.safetensors"  # torch.save's zip format
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(_Payload(marker)))
    for p in (evil, zipped):
        line = fails_cleanly(
            capsys, ["stain", good, "-o", tmp_path / "o.ome.tif", "--model", p, *T], "pickle"
        )
        assert "not loaded" in line and "arbitrary code" in line
    assert not marker.exists()
    assert not (tmp_path / "o.ome.tif").exists()


def test_broken_checkpoints(capsys, tmp_path, good):
    o = tmp_path / "o.ome.tif"

    def run(p, match):
        fails_cleanly(capsys, ["stain", good, "-o", o, "--model", p, *T], match)
        assert not o.exists()

    trunc = tiny_lcm(tmp_path / "trunc.safetensors")
    trunc.write_bytes(trunc.read_bytes()[:5000])
    run(trunc, "truncated|corrupt|not a valid")

    old = tiny_lcm(tmp_path / "old.safetensors")
    cfg = json.loads(checkpoints.config_path(old).read_text())
    cfg["format_version"] = 99
    checkpoints.config_path(old).write_text(json.dumps(cfg))
    run(old, "format 99")

    nocfg = tiny_lcm(tmp_path / "nocfg.safetensors")
    checkpoints.config_path(nocfg).unlink()
    run(nocfg, "config nocfg.json missing")

    shapes = tiny_lcm(tmp_path / "shapes.safetensors", channels=(8, 16), config_channels=(8, 32))
    run(shapes, "latent U-Net weights do not fit.*(wrong shape|missing|unexpected)")

    newer = tiny_lcm(tmp_path / "newer.safetensors")
    cfg = json.loads(checkpoints.config_path(newer).read_text())
    cfg["architecture"]["unet"]["class"] = "LatentUNetV9"
    checkpoints.config_path(newer).write_text(json.dumps(cfg))
    run(newer, "unknown architecture 'LatentUNetV9'")

    vae_only = tmp_path / "vae.safetensors"
    checkpoints.save_checkpoint(vae_only, {"vae": VAE(4, 8, 8)}, {"kind": "vae"})
    run(vae_only, "not a stain model")
    assert leftovers(tmp_path) == []


def test_bad_device_and_steps(capsys, tmp_path, good, tiny):
    o = tmp_path / "o.ome.tif"
    with pytest.raises(SystemExit) as e:  # argparse: usage + one error line, exit 2
        cli.main(["stain", str(good), "-o", str(o), "--device", "gpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("lcm-stain stain: error: argument --device")
    assert "Traceback" not in err
    if not torch.cuda.is_available():
        fails_cleanly(capsys, ["stain", good, "-o", o, "--model", tiny, "--device", "cuda", *T],
                      "no CUDA GPU.*'cpu'")  # fmt: skip
    fails_cleanly(capsys, ["stain", good, "-o", o, "--model", tiny, "--steps", "99", *T],
                  "LCM steps must be 1-8")  # fmt: skip
    fails_cleanly(capsys, ["stain", good, "-o", o, "--tile", "16", "--overlap", "64"],
                  "leaves no stride.*--tile")  # fmt: skip
    assert not o.exists()


def test_real_checkpoint_output_is_deterministic(tmp_path, good, tiny):
    outs = []
    for k in range(2):
        o = tmp_path / f"o{k}.ome.tif"
        args = ["stain", good, "-o", o, "--model", tiny, "--device", "cpu", "--seed", "3", *T]
        assert cli.main([str(a) for a in args]) == 0
        outs.append(np.asarray(io.read_image(o)[0]))
    assert outs[0].shape == (48, 64) and outs[0].tobytes() == outs[1].tobytes()


# ------------------------------------------------------------------------------ crash safety


def _prepare_existing(tmp_path, good, name="o.ome.tif"):
    out = tmp_path / name
    assert cli.main(["stain", str(good), "-o", str(out), *T, "--seed", "1"]) == 0
    return out


def test_failed_rename_keeps_the_previous_output(capsys, tmp_path, good, monkeypatch):
    out = _prepare_existing(tmp_path, good)
    before = digest(out)
    real_replace = os.replace

    def disk_full(src, dst):
        if str(dst) == str(out):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", disk_full)
    fails_cleanly(capsys, ["stain", good, "-o", out, *T, "--seed", "2", "--overwrite"],
                  "No space left on device")  # fmt: skip
    assert digest(out) == before
    assert leftovers(tmp_path) == []


def _stop_mid_stain(capsys, tmp_path, monkeypatch, stop) -> tuple[int, str]:
    """Stain over an existing output, calling `stop()` at the model's second call; check that the
    previous output is intact and no temp is left; return (exit code, last stderr line)."""
    src = tmp_path / "big.tif"
    tifffile.imwrite(src, blobs((200, 200)))
    out = _prepare_existing(tmp_path, src)
    before = digest(out)
    capsys.readouterr()

    class Stopped(FakePredictor):
        def __call__(self, x, noise=None):
            if self.calls >= 2:
                stop()
            return super().__call__(x, noise)

    monkeypatch.setattr(engine, "get_predictor", lambda *a, **k: Stopped())
    rc = cli.main(["stain", str(src), "-o", str(out), *T, "--seed", "2", "--overwrite"])
    err = capsys.readouterr().err
    assert digest(out) == before
    assert leftovers(tmp_path) == []
    return rc, err.splitlines()[-1]


def test_interrupt_while_staining_keeps_the_previous_output(capsys, tmp_path, monkeypatch):
    def ctrl_c():
        raise KeyboardInterrupt

    assert _stop_mid_stain(capsys, tmp_path, monkeypatch, ctrl_c) == (
        130,
        "lcm-stain stain: interrupted",
    )


def test_failure_while_writing_metadata_keeps_the_previous_output(
    capsys, tmp_path, good, monkeypatch
):
    out = _prepare_existing(tmp_path, good)
    before = digest(out)

    def broken(*a, **k):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(tifffile, "tiffcomment", broken)
    fails_cleanly(capsys, ["stain", good, "-o", out, *T, "--seed", "2", "--overwrite"],
                  "Input/output error")  # fmt: skip
    assert digest(out) == before
    assert leftovers(tmp_path) == []


def test_failed_swap_of_a_zarr_output_puts_the_old_one_back(capsys, tmp_path, good, monkeypatch):
    out = _prepare_existing(tmp_path, good, "o.ome.zarr")
    before = np.asarray(io.read_image(out)[0][...])
    real_replace = os.replace

    def fail_new_into_place(src, dst):
        if str(dst) == str(out) and ".tmp-" in str(src):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_new_into_place)
    fails_cleanly(capsys, ["stain", good, "-o", out, *T, "--seed", "2", "--overwrite"],
                  "No space left on device")  # fmt: skip
    np.testing.assert_array_equal(io.read_image(out)[0][...], before)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "exc",
    [
        MemoryError("Unable to allocate 64.0 GiB for an array"),
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore torch details"),
        RuntimeError(
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1e12 bytes"
        ),
    ],
    ids=["numpy", "cuda", "torch cpu"],
)
def test_out_of_memory_is_one_line_with_the_fix(capsys, tmp_path, good, monkeypatch, exc):
    out = _prepare_existing(tmp_path, good)
    before = digest(out)

    class Hungry(FakePredictor):
        def __call__(self, x, noise=None):
            raise exc

    monkeypatch.setattr(engine, "get_predictor", lambda *a, **k: Hungry())
    line = fails_cleanly(capsys, ["stain", good, "-o", out, *T, "--overwrite"],
                         "out of memory.*smaller --tile")  # fmt: skip
    assert "more torch details" not in line
    assert digest(out) == before and leftovers(tmp_path) == []


def test_unexpected_errors_are_not_swallowed(tmp_path, good, monkeypatch):
    """Programming errors keep their traceback (only user/environment errors become one line)."""

    class Buggy(FakePredictor):
        def __call__(self, x, noise=None):
            raise RuntimeError("shape mismatch in layer 3")

    monkeypatch.setattr(engine, "get_predictor", lambda *a, **k: Buggy())
    with pytest.raises(RuntimeError, match="layer 3"):
        cli.main(["stain", str(good), "-o", str(tmp_path / "o.ome.tif"), *T])
    assert leftovers(tmp_path) == [] and not (tmp_path / "o.ome.tif").exists()


# ------------------------------------------------------------------------------ issue 15


def _user_namespace_tmpfs_works() -> bool:
    if sys.platform != "linux" or not shutil.which("unshare"):
        return False
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d; rmdir $d"
    r = subprocess.run(["unshare", "-rm", "sh", "-c", probe], capture_output=True)
    return r.returncode == 0


FULL_DISK_SCRIPT = r"""
import hashlib, json, os, sys
sys.path[:0] = [os.environ["TESTS"]]
import numpy as np, tifffile
from _fake_predictor import FakePredictor, blobs
from napari_lcm_stain import cli, engine
engine.get_predictor = lambda *a, **k: FakePredictor()
d = sys.argv[1]
tifffile.imwrite(os.path.join(d, "small.tif"), blobs((32, 32)))
out = os.path.join(d, "o.ome.tif")
assert cli.main(["stain", os.path.join(d, "small.tif"), "-o", out, "--tile", "64"]) == 0
before = hashlib.sha256(open(out, "rb").read()).hexdigest()
big = np.zeros((1024, 1024), np.uint8)  # 1 MB in, 4 MB float32 out: more than the disk holds
tifffile.imwrite(os.path.join(d, "big.tif"), big)
rc = cli.main(["stain", os.path.join(d, "big.tif"), "-o", out, "--tile", "256", "--overwrite"])
after = hashlib.sha256(open(out, "rb").read()).hexdigest()
print(json.dumps({"rc": rc, "same": before == after, "files": sorted(os.listdir(d))}))
"""


@pytest.mark.skipif(not _user_namespace_tmpfs_works(), reason="needs unshare -rm and tmpfs")
def test_full_disk_is_errno_28_not_sigbus(tmp_path):
    """Item 1: a TIFF output on a full disk: one line, exit 2, no temp, the old output intact."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = tmp_path / "full.py"
    script.write_text(FULL_DISK_SCRIPT)
    env = {**os.environ, "TESTS": str(Path(__file__).parent)}
    cmd = f"mount -t tmpfs -o size=2m tmpfs {disk} && {sys.executable} {script} {disk}"
    r = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, env=env)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])  # SIGBUS would be -7 / 135
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["rc"] == 2 and res["same"]
    assert res["files"] == ["big.tif", "o.ome.tif", "small.tif"]  # no .o.ome.tif.tmp-PID
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("lcm-stain stain: error: [Errno 28] No space left on device"), last


def test_same_stem_outputs_are_refused_before_any_work(capsys, tmp_path):
    """Item 2: d1/x.tif + d2/x.tif, or y.tif + y.tiff, would write one file twice."""
    for d in ("d1", "d2", "d3"):
        (tmp_path / d).mkdir()
    for name in ("d1/x.tif", "d2/x.tif", "d3/y.tif", "d3/y.tiff"):
        tifffile.imwrite(tmp_path / name, blobs((16, 16)))
    out = tmp_path / "out"
    fails_cleanly(capsys, ["stain", tmp_path / "d1/x.tif", tmp_path / "d2/x.tif", "-o", out, *T],
                  r"d1/x\.tif and .*d2/x\.tif would both be written to .*x_dapi\.ome\.tif")  # fmt: skip
    fails_cleanly(capsys, ["stain", tmp_path / "d3", "-o", out, *T], "y.tiff? .*would both")
    assert not out.exists()


def test_mean_and_std_are_replaced_together_or_not_at_all(capsys, tmp_path, good, monkeypatch):
    """Item 3: Ctrl-C after the mean is renamed into place: the old pair comes back."""
    out = tmp_path / "o.ome.tif"
    assert cli.main(["stain", str(good), "-o", str(out), *T, "--samples", "2", "--seed", "1"]) == 0
    std = tmp_path / "o_std.ome.tif"
    before = digest(out), digest(std)
    real_replace = os.replace

    def interrupted(src, dst):
        if str(dst) == str(std) and ".tmp-" in str(src):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    args = ["stain", good, "-o", out, *T, "--samples", "2", "--seed", "2", "--overwrite"]
    assert cli.main([str(a) for a in args]) == 130
    assert (digest(out), digest(std)) == before
    assert leftovers(tmp_path) == []
    monkeypatch.setattr(os, "replace", real_replace)
    assert cli.main([str(a) for a in args]) == 0  # and without the interrupt, both are new
    assert digest(out) != before[0] and digest(std) != before[1]


def test_sigterm_is_handled_like_ctrl_c(capsys, tmp_path, monkeypatch):
    """Item 4: SIGTERM (kill, timeout, schedulers) cleans up; exit 143, old output intact."""

    class Unhandled(Exception):
        pass

    def unhandled(*a):  # without the fix this (not the default: death) is what SIGTERM does
        raise Unhandled("SIGTERM was not handled by lcm-stain")

    old = signal.signal(signal.SIGTERM, unhandled)
    try:
        result = _stop_mid_stain(
            capsys, tmp_path, monkeypatch, lambda: os.kill(os.getpid(), signal.SIGTERM)
        )
        assert signal.getsignal(signal.SIGTERM) is unhandled  # cli.main put it back
    finally:
        signal.signal(signal.SIGTERM, old)
    assert result == (143, "lcm-stain stain: terminated (SIGTERM)")


def test_stale_temp_files_of_dead_runs_are_removed(capsys, tmp_path, good):
    """Item 4: `.NAME.tmp-PID` of a dead PID beside the output goes; a live one stays."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "res"
    out.mkdir()
    stale = out / f".in_dapi.ome.tif.tmp-{dead.pid}"
    stale.write_bytes(b"\0" * 4096)
    alive = out / f".in_dapi.ome.tif.tmp-{os.getppid()}"
    alive.write_bytes(b"\0")
    other = out / f".unrelated.tif.tmp-{dead.pid}"
    other.write_bytes(b"\0")
    assert cli.main(["stain", str(good), "-o", str(out), *T]) == 0
    assert "removed" in capsys.readouterr().out
    assert not stale.exists() and alive.exists() and other.exists()
    assert (out / "in_dapi.ome.tif").exists()
    # a run killed while swapping outputs: its backup is the previous output
    backup = out / f".in_dapi.ome.tif.old-{dead.pid}"
    os.replace(out / "in_dapi.ome.tif", backup)
    fails_cleanly(capsys, ["stain", good, "-o", out, *T], "in_dapi.ome.tif exists.*--overwrite")
    assert (out / "in_dapi.ome.tif").exists() and not backup.exists()  # put back, not replaced
    os.link(out / "in_dapi.ome.tif", backup)  # beside its output: a leftover, removed
    assert cli.main(["stain", str(good), "-o", str(out), *T, "--overwrite"]) == 0
    assert not backup.exists()


def test_simulate_and_bench_refuse_to_overwrite(capsys, tmp_path):
    """Item 5: like stain, simulate --out and bench --json need --overwrite."""
    sim = tmp_path / "sim"
    sim.mkdir()
    (sim / "000_dapi.ome.tif").write_bytes(b"mine")
    args = ["simulate", "--out", sim, "--n", "1", "--size", "16"]
    fails_cleanly(capsys, args, r"000_dapi\.ome\.tif exists: pass --overwrite.*--out")
    assert sorted(os.listdir(sim)) == ["000_dapi.ome.tif"]
    assert (sim / "000_dapi.ome.tif").read_bytes() == b"mine"
    assert cli.main([str(a) for a in [*args, "--overwrite"]]) == 0
    assert io.read_image(sim / "000_dapi.ome.tif")[0].shape == (16, 16)
    assert sorted(os.listdir(sim)) == sorted(f"000_{k}" for k in cli.SIM_FILES)  # all checked
    js = tmp_path / "bench.json"
    js.write_text("{}")
    fails_cleanly(capsys, ["bench", "--json", js, "--size", "16", "--big", "0"],
                  r"bench\.json exists: pass --overwrite.*--json")  # fmt: skip
    assert js.read_text() == "{}"


def test_bad_output_names_and_settings_create_nothing(capsys, tmp_path, good):
    """Item 6: `-o result.png` is refused, not made a folder; bad settings leave no folder."""
    fails_cleanly(capsys, ["stain", good, "-o", tmp_path / "result.png", *T],
                  r"cannot write result\.png.*result\.ome\.tif")  # fmt: skip
    assert not (tmp_path / "result.png").exists()
    out = tmp_path / "new" / "folder"
    fails_cleanly(capsys, ["stain", good, "-o", out, "--tile", "0"], "tile must be")
    fails_cleanly(capsys, ["stain", good, "-o", out, "--model", "bogus"], "unknown model")
    fails_cleanly(capsys, ["stain", good, "-o", out, "--tile", "16", "--overlap", "64"],
                  "leaves no stride")  # fmt: skip
    if not torch.cuda.is_available():
        fails_cleanly(capsys, ["stain", good, "-o", out, "--model", "pix2pix", "--device", "cuda"],
                      "CUDA")  # fmt: skip
    assert not (tmp_path / "new").exists()


def test_implausible_pixel_sizes_are_refused_naming_their_source(capsys, tmp_path, good):
    """Item 10: a rescale factor outside 1/8..8 is refused; the message says where it came from.

    (The fake model is at 0.25 µm/px; 2.5 would rescale 10x, 1e-5 to a 1x1 image.)"""
    out = tmp_path / "o.ome.tif"
    for ps in ("2.5", "1e-5", "414"):
        fails_cleanly(capsys, ["stain", good, "-o", out, *T, "--pixel-size", ps],
                      r"pixel size .* µm/px \(from --pixel-size\) is .* outside")  # fmt: skip
    ome = tmp_path / "meta.ome.tif"
    tifffile.imwrite(ome, blobs((16, 16)), ome=True, metadata={"PhysicalSizeX": 2.5})
    fails_cleanly(capsys, ["stain", ome, "-o", out, *T],
                  r"\(from the metadata of meta\.ome\.tif\).*µm per pixel")  # fmt: skip
    assert sorted(os.listdir(tmp_path)) == ["in.tif", "meta.ome.tif"]
    with pytest.raises(ValueError, match=r"\(from pixel_size\).*outside the supported 0.125-8"):
        engine.stain(blobs((16, 16)), FakePredictor(), pixel_size=2.5, **KW)
    # the ends of the range are accepted
    assert engine.stain(blobs((16, 16)), FakePredictor(), pixel_size=2.0, **KW).shape == (16, 16)


def _ome_with_physical_size(path, value: str):
    tifffile.imwrite(path, blobs((32, 32)), ome=True, metadata={"PhysicalSizeX": 0.25})
    with tifffile.TiffFile(path) as t:
        xml = t.ome_metadata
    xml = re.sub(r'PhysicalSizeX="[^"]*"', f'PhysicalSizeX="{value}"', xml)
    tifffile.tiffcomment(path, comment=xml.encode())


def test_unparseable_ome_pixel_size_is_unknown_with_a_note(capsys, tmp_path):
    """Item 11: PhysicalSizeX="abcde" does not make a good file unreadable."""
    p = tmp_path / "odd.ome.tif"
    _ome_with_physical_size(p, "abcde")
    arr, meta = io.read_image(p)
    assert arr.shape == (32, 32) and meta["pixel_size"] is None
    assert any("PhysicalSizeX 'abcde'" in n and "unknown" in n for n in meta["notes"])
    capsys.readouterr()
    out = tmp_path / "o.ome.tif"
    assert cli.main(["stain", str(p), "-o", str(out), *T, "--pixel-size", "0.25"]) == 0
    assert "note: OME PhysicalSizeX 'abcde' is not a positive number" in capsys.readouterr().out
    assert io.read_image(out)[1]["pixel_size"] == pytest.approx(0.25)


def test_trailing_samples_axis_is_refused(capsys, tmp_path):
    """Item 12: a YXS TIFF with 2 samples per pixel is not 128 planes of 128x2."""
    p = tmp_path / "yxs.tif"
    tifffile.imwrite(p, np.zeros((128, 128, 2), np.float32), photometric="minisblack",
                     planarconfig="contig")  # fmt: skip
    fails_cleanly(capsys, ["stain", p, "-o", tmp_path / "o.ome.tif", *T],
                  r"yxs\.tif has axes YXS .*not a plane axis.*one sample per pixel")  # fmt: skip
    assert sorted(os.listdir(tmp_path)) == ["yxs.tif"]


def test_16_bit_camera_image_warns(capsys, tmp_path):
    """Item 13: a 16-bit camera frame (0..65535) is not phase: a note says so (once)."""
    cam = (np.linspace(0, 65535, 48 * 64).reshape(48, 64)).astype(np.uint16)
    p = tmp_path / "cam.tif"
    tifffile.imwrite(p, cam)
    assert cli.main(["stain", str(p), "-o", str(tmp_path / "o.ome.tif"), *T]) == 0
    out = capsys.readouterr().out
    assert out.count("raw camera counts") == 1 and "up to 65535 (uint16)" in out
    with pytest.warns(UserWarning, match="raw camera counts"):
        engine.stain(np.stack([cam, cam]), FakePredictor(), **KW)
    for phase in (blobs((32, 32)), blobs((32, 32)) * 1000):  # radians, or float nm: no note
        res = drain(engine.iter_stain(phase, FakePredictor(), **KW))
        assert not any("camera" in w for w in res.info["warnings"])


def test_batch_names_the_bad_file_and_goes_on(capsys, tmp_path):
    """Item 14: a bad file is named, the others are written, exit 2 with a summary."""
    for name in ("a.tif", "c.tif"):
        tifffile.imwrite(tmp_path / name, blobs((32, 32)))
    tifffile.imwrite(tmp_path / "b.tif", np.zeros((32, 32, 3), np.uint8), photometric="rgb")
    out = tmp_path / "out"
    args = ["stain", tmp_path / "a.tif", tmp_path / "b.tif", tmp_path / "c.tif", "-o", out, *T]
    rc = cli.main([str(a) for a in args])
    cap = capsys.readouterr()
    assert rc == 2
    lines = cap.err.strip().splitlines()
    assert any(re.search(r"skipped .*b\.tif: image of shape .*RGB", ln) for ln in lines)
    assert re.search(r"error: 1 of 3 inputs failed .*b\.tif: image of shape", lines[-1])
    assert sorted(os.listdir(out)) == ["a_dapi.ome.tif", "c_dapi.ome.tif"]
    assert cap.out.count("wrote") == 2


def test_file_names_with_glob_characters(capsys, tmp_path):
    """Item 15: `scan[1].tif` exists, so it is a file name, not a pattern."""
    p = tmp_path / "scan[1].tif"
    tifffile.imwrite(p, blobs((32, 32)))
    assert cli.main(["stain", str(p), "-o", str(tmp_path / "out"), *T]) == 0
    assert (tmp_path / "out" / "scan[1]_dapi.ome.tif").exists()
    fails_cleanly(capsys, ["stain", tmp_path / "scan[2].tif", "-o", tmp_path / "o", *T],
                  r"no files match .*scan\[2\]\.tif")  # fmt: skip


def test_folder_skips_dapi_labels_and_outputs_with_a_note(capsys, tmp_path):
    """Item 20: a `simulate` folder stains only the qOBM images; --pattern chooses files."""
    d = tmp_path / "sim"
    d.mkdir()
    labels = np.zeros((32, 32), np.int32)
    labels[4:12, 4:12], labels[20:28, 18:30] = 1, 2
    tifffile.imwrite(d / "000_qobm.ome.tif", blobs((32, 32)))
    tifffile.imwrite(d / "000_dapi.ome.tif", blobs((32, 32), seed=1))
    tifffile.imwrite(d / "000_nuclei.ome.tif", labels)
    tifffile.imwrite(d / "000_distractors.ome.tif", labels)
    tifffile.imwrite(d / "cells.tif", labels.astype(np.uint16))  # a label image by content
    tifffile.imwrite(d / "old_dapi_std.ome.tif", blobs((32, 32)))
    out = tmp_path / "out"
    assert cli.main(["stain", str(d), "-o", str(out), *T]) == 0
    assert sorted(os.listdir(out)) == ["000_qobm_dapi.ome.tif"]
    text = capsys.readouterr().out
    assert re.search(r"skipped .*000_dapi\.ome\.tif: named like a DAPI", text)
    assert re.search(r"skipped .*cells\.tif: an integer label image", text)
    assert text.count("skipped") == 5
    assert cli.main(["stain", str(d), "-o", str(out), *T, "--pattern", "000_dapi*"]) == 0
    assert sorted(os.listdir(out)) == ["000_dapi_dapi.ome.tif", "000_qobm_dapi.ome.tif"]
    fails_cleanly(capsys, ["stain", d, "-o", out, "--pattern", "*.png"], r"match '\*\.png'")


def test_every_option_has_help_with_its_default():
    """Item 21: every option of every subcommand says what it does and its default."""
    from napari_lcm_stain import simulate, training
    from napari_lcm_stain.training import presets  # noqa: F401 (training.presets)

    parser = cli.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sp in subs.choices.items():
        for act in sp._actions:
            if isinstance(act, argparse._HelpAction):
                continue
            flag = act.option_strings[-1] if act.option_strings else act.dest
            assert act.help and len(act.help) > 10, f"{name} {flag}: no help"
            if act.required or isinstance(act, argparse._StoreTrueAction) or act.nargs == "+":
                continue
            assert "default" in act.help, f"{name} {flag}: help does not give the default"
    assert sorted(cli.SIM_PRESETS) == sorted(
        [*simulate.PRESETS, simulate.RANDOM_PRESET, simulate.TISSUE_PRESET]
    )
    assert sorted(cli.TRAIN_PRESETS) == sorted(training.presets.PRESETS)
    assert all(p in subs.choices["simulate"].format_help() for p in simulate.PRESETS)
    assert all(p in subs.choices["train"].format_help() for p in training.presets.PRESETS)
    ev = " ".join(subs.choices["evaluate"].format_help().split())
    assert re.search(r"default run .* takes about .* on a CPU \(\d+ s for", ev)
    stain_help = " ".join(subs.choices["stain"].format_help().split())
    assert "NAME_dapi_std.ome.tif" in stain_help and "NAME_dapi.ome.tif" in stain_help


def test_wrote_line_names_the_checkpoint_and_the_wall_time(capsys, tmp_path, good, monkeypatch):
    """Item 22: a fine-tuned checkpoint is not 'LCM-1'; the time includes model loading."""
    ft = tiny_lcm(tmp_path / "ft.safetensors", finetune={"steps": 3})
    out = tmp_path / "o.ome.tif"
    assert cli.main(["stain", str(good), "-o", str(out), "--model", str(ft), *T]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("wrote"))
    assert "(fine-tuned LCM-1 from ft.safetensors, 1 plane(s)" in line
    with tifffile.TiffFile(out) as t:  # the provenance names the file too
        assert str(ft.resolve()) in t.ome_metadata
    real = engine.get_predictor

    def slow(*a, **k):
        time.sleep(0.6)
        return real(*a, **k)

    monkeypatch.setattr(engine, "get_predictor", slow)
    assert cli.main(["stain", str(good), "-o", str(out), *T, "--overwrite"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("wrote"))
    seconds = float(re.search(r"([0-9.]+) s\)$", line).group(1))
    assert seconds >= 0.6, line


def test_nan_note_is_printed_once(capsys, tmp_path):
    """Item 26: the NaN note is a note under 'wrote', not also a raw UserWarning."""
    img = blobs((48, 64))
    img[3, 4] = np.nan
    p = tmp_path / "nan.tif"
    tifffile.imwrite(p, img)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(["stain", str(p), "-o", str(tmp_path / "o.ome.tif"), *T]) == 0
    assert not [w for w in caught if "NaN/Inf" in str(w.message)]
    cap = capsys.readouterr()
    assert (cap.out + cap.err).count("replaced 1 NaN/Inf pixels") == 1
