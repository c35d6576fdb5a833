"""io: TIFF / OME-TIFF / zarr read & write, stain_files and the `lcm-stain stain` CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import zarr

from _fake_predictor import FakePredictor, blobs
from napari_lcm_stain import cli, engine, io
from napari_lcm_stain.engine import stain

KW = {"tile": 64, "overlap": 16}


@pytest.fixture(scope="module")
def pred():
    return FakePredictor()


@pytest.fixture
def fake_model(monkeypatch, pred):
    """Route model names to the fake predictor so the CLI runs without trained weights."""
    real = engine.get_predictor
    monkeypatch.setattr(
        engine,
        "get_predictor",
        lambda m, *a, **k: pred if isinstance(m, str) else real(m, *a, **k),
    )
    return pred


def write_ome(path, arr, axes, ps):
    tifffile.imwrite(
        path, arr, ome=True, metadata={"axes": axes, "PhysicalSizeX": ps, "PhysicalSizeY": ps}
    )


def description(path) -> dict:
    with tifffile.TiffFile(path) as t:
        xml = t.ome_metadata
    text = xml.split("<Description>")[1].split("</Description>")[0]
    return json.loads(text.replace("&quot;", '"').replace("&amp;", "&"))


# ------------------------------------------------------------------------------ read


def test_read_ome_tiff_stack_lazily_with_pixel_size(tmp_path):
    arr = blobs((3, 40, 50))
    write_ome(tmp_path / "s.ome.tif", arr, "ZYX", 0.138)
    a, meta = io.read_image(tmp_path / "s.ome.tif")
    assert isinstance(a, np.memmap)
    assert meta["pixel_size"] == pytest.approx(0.138) and meta["axes"] == "ZYX"
    np.testing.assert_array_equal(np.asarray(a), arr)


def test_read_imagej_and_compressed_tiff(tmp_path):
    arr = (blobs((30, 44)) * 1000).clip(0, 60000).astype(np.uint16)
    tifffile.imwrite(
        tmp_path / "ij.tif", arr, imagej=True, resolution=(1 / 0.5, 1 / 0.5),
        metadata={"unit": "um"}, compression="zlib",
    )  # fmt: skip
    a, meta = io.read_image(tmp_path / "ij.tif")
    assert not isinstance(a, np.ndarray)  # compressed: read through zarr, chunk by chunk
    assert meta["pixel_size"] == pytest.approx(0.5) and meta["axes"] == "YX"
    np.testing.assert_array_equal(a[...], arr)
    meta.pop("_handle").close()


def test_plain_tiff_has_unknown_pixel_size(tmp_path):
    tifffile.imwrite(tmp_path / "p.tif", np.zeros((8, 8), np.float32))
    _, meta = io.read_image(tmp_path / "p.tif")
    assert meta["pixel_size"] is None and meta["axes"] == "YX"


def test_read_zarr_array_and_ome_zarr(tmp_path):
    arr = blobs((2, 20, 30))
    z = zarr.create_array(str(tmp_path / "a.zarr"), shape=arr.shape, dtype="f4", chunks=(1, 20, 30))
    z[...] = arr
    a, meta = io.read_image(tmp_path / "a.zarr")
    np.testing.assert_array_equal(a[...], arr)
    assert meta["axes"] == "ZYX" and meta["pixel_size"] is None
    out = io.write_image(tmp_path / "o.ome.zarr", arr, {"pixel_size": 0.2, "axes": "TYX"})
    b, meta = io.read_image(out)
    np.testing.assert_array_equal(b[...], arr)
    assert meta["pixel_size"] == pytest.approx(0.2) and meta["axes"] == "TYX"


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        io.read_image(tmp_path / "missing.tif")
    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    with pytest.raises(ValueError, match="expected a .tif"):
        io.read_image(tmp_path / "x.png")


# ------------------------------------------------------------------------------ write


def test_write_ome_tiff_roundtrip_is_atomic(tmp_path):
    arr = blobs((2, 3, 16, 24))
    p = io.write_image(tmp_path / "w.ome.tif", arr, {"pixel_size": 0.25, "axes": "TZYX"}, "hello")
    b, meta = io.read_image(p)
    np.testing.assert_array_equal(np.asarray(b), arr.astype(np.float32))
    assert meta["pixel_size"] == pytest.approx(0.25) and meta["axes"] == "TZYX"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["w.ome.tif"]  # no temp file left


@pytest.mark.parametrize("fallocate", [True, False], ids=["posix_fallocate", "zeros written"])
def test_tiff_output_space_is_allocated_up_front(tmp_path, monkeypatch, fallocate):
    """Issue 15 item 1: no sparse file filled through mmap (SIGBUS on a full disk)."""
    import os

    if not fallocate:
        monkeypatch.delattr(os, "posix_fallocate", raising=False)
    out = io.OutputImage(tmp_path / "a.ome.tif", (3, 256, 512), {"axes": "ZYX"})
    st = os.stat(out.tmp)
    assert st.st_blocks * 512 >= 3 * 256 * 512 * 4  # the data region has its disk blocks
    out.array[1, 2, 3] = 7.0
    assert out.commit() == tmp_path / "a.ome.tif"
    a = np.asarray(io.read_image(tmp_path / "a.ome.tif")[0])
    assert a.shape == (3, 256, 512) and a[1, 2, 3] == 7.0 and a.sum() == 7.0
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.ome.tif"]


def test_reserve_reports_a_full_disk_as_oserror(tmp_path, monkeypatch):
    import errno
    import os

    def full(fd, offset, n):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(OSError, match="No space left"):
        io.OutputImage(tmp_path / "a.ome.tif", (64, 64))
    assert list(tmp_path.iterdir()) == []


def test_unsupported_axes_fall_back_to_default(tmp_path):
    p = io.write_image(tmp_path / "q.ome.tif", np.zeros((2, 8, 8)), {"axes": "QYX"})
    assert io.read_image(p)[1]["axes"] == "ZYX"


# ------------------------------------------------------------------------------ stain_files


def test_stain_files_folder_copies_metadata_and_provenance(tmp_path, pred):
    src = tmp_path / "in"
    src.mkdir()
    stack = blobs((3, 50, 60))
    write_ome(src / "a.ome.tif", stack, "ZYX", 0.25)
    tifffile.imwrite(src / "b.tif", stack[0])
    (src / "notes.txt").write_text("ignored")
    written = io.stain_files(
        [src], tmp_path / "out", model=pred, samples=2, seed=7, quiet=True, **KW
    )
    names = sorted(p.name for p in written)
    assert names == ["a_dapi.ome.tif", "a_dapi_std.ome.tif", "b_dapi.ome.tif", "b_dapi_std.ome.tif"]
    mean, meta = io.read_image(tmp_path / "out" / "a_dapi.ome.tif")
    assert meta["axes"] == "ZYX" and meta["pixel_size"] == pytest.approx(0.25)
    res = engine.iter_stain(stack, pred, seed=7, samples=2, pixel_size=0.25, **KW)
    while True:
        try:
            next(res)
        except StopIteration as stop:
            ref = stop.value
            break
    np.testing.assert_array_equal(np.asarray(mean), ref.mean)
    std, _ = io.read_image(tmp_path / "out" / "a_dapi_std.ome.tif")
    np.testing.assert_array_equal(np.asarray(std), ref.std)
    prov = description(tmp_path / "out" / "a_dapi.ome.tif")
    assert prov["model"] == "Fake" and prov["seed"] == 7 and prov["samples"] == 2
    assert prov["software"] == "napari-lcm-stain" and prov["version"]
    assert description(tmp_path / "out" / "a_dapi_std.ome.tif")["content"] == "std"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_stain_files_single_output_glob_and_zarr(tmp_path, pred):
    for i in range(2):
        write_ome(tmp_path / f"f{i}.ome.tif", blobs((40, 40), seed=i), "YX", 0.25)
    out = io.stain_files(
        [tmp_path / "f0.ome.tif"], tmp_path / "one.ome.tif", model=pred, quiet=True, **KW
    )
    assert out == [tmp_path / "one.ome.tif"]
    zs = io.stain_files([str(tmp_path / "f*.ome.tif")], tmp_path / "z", model=pred,
                        out_format="zarr", quiet=True, **KW)  # fmt: skip
    assert [p.name for p in zs] == ["f0_dapi.ome.zarr", "f1_dapi.ome.zarr"]
    a, meta = io.read_image(zs[0])
    assert meta["pixel_size"] == pytest.approx(0.25)
    np.testing.assert_array_equal(a[...], np.asarray(io.read_image(out[0])[0]))
    assert zarr.open_group(str(zs[0]), mode="r").attrs["napari_lcm_stain"]["model"] == "Fake"


def test_stain_files_refuses_to_overwrite(tmp_path, pred):
    inp = tmp_path / "a.tif"
    tifffile.imwrite(inp, blobs((32, 32)))
    with pytest.raises(ValueError, match="is one of the inputs"):
        io.stain_files([inp], inp, model=pred, quiet=True, **KW)
    with pytest.raises(ValueError, match="is one of the inputs"):
        io.stain_files([inp], inp, model=pred, quiet=True, overwrite=True, **KW)
    out = tmp_path / "o.ome.tif"
    out.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        io.stain_files([inp], out, model=pred, quiet=True, **KW)
    assert out.read_bytes() == b"old"
    io.stain_files([inp], out, model=pred, quiet=True, overwrite=True, **KW)
    assert io.read_image(out)[0].shape == (32, 32)


def test_stain_files_bad_targets(tmp_path, pred):
    for i in range(2):
        tifffile.imwrite(tmp_path / f"{i}.tif", blobs((16, 16)))
    with pytest.raises(ValueError, match="give a folder"):
        io.stain_files([tmp_path], tmp_path / "x.ome.tif", model=pred, quiet=True)
    with pytest.raises(ValueError, match="conflicts"):
        io.stain_files([tmp_path / "0.tif"], tmp_path / "x.ome.tif", model=pred, out_format="zarr")
    with pytest.raises(FileNotFoundError, match="no files match"):
        io.stain_files([str(tmp_path / "*.zarr")], tmp_path / "o", model=pred)
    with pytest.raises(FileNotFoundError, match="no .tif"):
        (tmp_path / "empty").mkdir()
        io.stain_files([tmp_path / "empty"], tmp_path / "o", model=pred)


def test_failed_stain_leaves_no_partial_output(tmp_path):
    class Boom(FakePredictor):
        def __call__(self, x, noise=None):
            if self.calls >= 2:
                raise RuntimeError("boom")
            return super().__call__(x, noise)

    tifffile.imwrite(tmp_path / "a.tif", blobs((200, 200)))
    with pytest.raises(RuntimeError, match="boom"):
        io.stain_files([tmp_path / "a.tif"], tmp_path / "o", model=Boom(), quiet=True, **KW)
    assert list((tmp_path / "o").iterdir()) == []


def test_cli_stain_end_to_end(tmp_path, fake_model, capsys):
    write_ome(tmp_path / "in.ome.tif", blobs((2, 48, 64)), "ZYX", 0.5)
    out = tmp_path / "res"
    rc = cli.main(["stain", str(tmp_path / "in.ome.tif"), "-o", str(out), "--tile", "64",
                   "--overlap", "16", "--samples", "2", "--seed", "3"])  # fmt: skip
    assert rc == 0
    err = capsys.readouterr().err
    assert "100%" in err and "tiles" in err  # the progress bar went to stderr
    mean, meta = io.read_image(out / "in_dapi.ome.tif")
    assert mean.shape == (2, 48, 64) and meta["pixel_size"] == pytest.approx(0.5)
    assert (out / "in_dapi_std.ome.tif").exists()
    ref = stain(blobs((2, 48, 64)), fake_model, seed=3, samples=2, pixel_size=0.5, **KW)
    np.testing.assert_array_equal(np.asarray(mean), ref)
    rc = cli.main(["stain", str(tmp_path / "in.ome.tif"), "-o", str(out)])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err


def test_signals_wait_until_outputs_are_committed():
    """Issue 15 item 3: Ctrl-C during the renames of a mean/_std pair arrives after them."""
    import os
    import signal
    import threading

    order = []
    torch_like = threading.Thread(target=threading.Event().wait, args=(2,), daemon=True)
    torch_like.start()  # another thread, which the kernel may pick to receive the signal
    # Python's own Ctrl-C handler, whatever an earlier test (a napari viewer) left installed
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with io._signals_deferred():
                for _ in range(3):
                    os.kill(os.getpid(), signal.SIGINT)
                    sum(range(100000))  # bytecode for a pending handler to run at
                order.append("block finished")
        assert order == ["block finished"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
