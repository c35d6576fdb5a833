"""Issue 7: `lcm-stain stain` on bad files, bad models and interrupted writes (in-process).

Every user error exits with code 2 and ONE line on stderr, `lcm-stain stain: error: ...`, never
a traceback; an existing output is never replaced by a truncated or partial file, and no temp files
are left behind. "lcm" is routed to the fast fake predictor; checkpoint paths go through the real
loader (a tiny, untrained LCM checkpoint is built per test module).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import zipfile

import numpy as np
import pytest
import tifffile
import torch

from _fake_predictor import FakePredictor, blobs
from napari_lcm_stain import checkpoints, cli, engine, io
from napari_lcm_stain.models import VAE, LatentUNet

T = ["--tile", "64", "--overlap", "16"]


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
        lambda m, s=None, d="auto": pred if m == "lcm" else real(m, s, d),
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
    assert last.startswith("lcm-stain stain: "), repr(err)  # on its own line, not after a bar
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


def test_interrupt_while_staining_keeps_the_previous_output(capsys, tmp_path, monkeypatch):
    src = tmp_path / "big.tif"
    tifffile.imwrite(src, blobs((200, 200)))
    out = _prepare_existing(tmp_path, src)
    before = digest(out)
    capsys.readouterr()

    class Interrupted(FakePredictor):
        def __call__(self, x, noise=None):
            if self.calls >= 2:
                raise KeyboardInterrupt
            return super().__call__(x, noise)

    monkeypatch.setattr(engine, "get_predictor", lambda *a, **k: Interrupted())
    rc = cli.main(["stain", str(src), "-o", str(out), *T, "--seed", "2", "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 130 and err.splitlines()[-1] == "lcm-stain stain: interrupted"
    assert digest(out) == before
    assert leftovers(tmp_path) == []


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
