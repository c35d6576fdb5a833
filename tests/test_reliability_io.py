"""Reliability round three (issue #25), the reader/writer items: 8 (OME-Zarr writer and existing
folders), 10 (anisotropic pixels), 11 (layer scale beats stale metadata), 12 (planar RGB TIFF),
16 (malformed OME-Zarr metadata) and 19 (truncated TIFF at open)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from _fake_predictor import FakePredictor, blobs
from napari_lcm_stain import io

KW = {"tile": 64, "overlap": 16}


@pytest.fixture(scope="module")
def pred():
    return FakePredictor()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------- item 8: OME-Zarr writer and existing folders


def _fail_renames(monkeypatch, when):
    """`os.replace(src, dst)` in io raises OSError('rename failed') where `when(src, dst)`."""
    real = io.os.replace

    def replace(src, dst, *a, **k):
        if when(src, dst):
            raise OSError("rename failed")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(io.os, "replace", replace)


def test_zarr_writer_never_empties_a_folder_that_is_not_a_zarr(tmp_path, pred):
    keep = tmp_path / "keep.ome.zarr"
    keep.mkdir()
    (keep / "notes.txt").write_text("my notes")
    with pytest.raises(ValueError, match=r"keep\.ome\.zarr.*not a zarr store"):
        io.write_image(keep, blobs((16, 16)), {"pixel_size": 0.25})
    inp = tmp_path / "q.tif"
    tifffile.imwrite(inp, blobs((32, 32)))
    with pytest.raises(ValueError, match="not a zarr store"):  # not even with --overwrite
        io.stain_files([inp], keep, model=pred, overwrite=True, quiet=True, **KW)
    assert sorted(p.name for p in keep.iterdir()) == ["notes.txt"]
    assert (keep / "notes.txt").read_text() == "my notes"
    assert _leftovers(tmp_path) == []


def test_zarr_overwrite_replaces_only_the_zarr(tmp_path, pred):
    inp = tmp_path / "q.tif"
    tifffile.imwrite(inp, blobs((32, 32)))
    out = tmp_path / "keep.ome.zarr"
    io.stain_files([inp], out, model=pred, quiet=True, **KW)
    (out / "notes.txt").write_text("my notes")
    with pytest.raises(ValueError, match=r"notes\.txt.*--overwrite"):
        io.stain_files([inp], out, model=pred, quiet=True, **KW)
    with pytest.raises(ValueError, match=r"notes\.txt"):  # the napari writer: no overwrite
        io.write_image(out, blobs((16, 16)), {"pixel_size": 0.25})
    io.stain_files([inp], out, model=pred, overwrite=True, seed=3, quiet=True, **KW)
    assert (out / "notes.txt").read_text() == "my notes"
    assert zarr.open_group(str(out), mode="r").attrs["napari_lcm_stain"]["seed"] == 3
    assert _leftovers(tmp_path) == []


def test_a_file_that_cannot_be_carried_over_is_never_deleted(tmp_path, monkeypatch):
    out = io.write_image(tmp_path / "o.ome.zarr", blobs((16, 16)), {"pixel_size": 0.25})
    (out / "notes.txt").write_text("my notes")
    _fail_renames(monkeypatch, lambda src, dst: Path(src).name == "notes.txt")
    with pytest.warns(UserWarning, match=r"notes\.txt.*kept in .*o\.ome\.zarr\.previous-1"):
        io.write_image(out, blobs((16, 16), seed=1), {"pixel_size": 0.25}, overwrite=True)
    assert (tmp_path / "o.ome.zarr.previous-1" / "notes.txt").read_text() == "my notes"


def test_zarr_writer_replaces_its_own_output(tmp_path):
    out = io.write_image(tmp_path / "o.ome.zarr", blobs((16, 16)), {"pixel_size": 0.25})
    new = blobs((16, 16), seed=5)
    io.write_image(out, new, {"pixel_size": 0.25})  # the napari writer: Save over it again
    np.testing.assert_array_equal(io.read_image(out)[0][...], new)


def test_a_foreign_zarr_needs_overwrite(tmp_path, pred):
    z = zarr.create_array(str(tmp_path / "their.zarr"), shape=(8, 8), dtype="f4")
    z[...] = 1.0
    with pytest.raises(ValueError, match=r"their\.zarr.*did not write"):
        io.write_image(tmp_path / "their.zarr", blobs((16, 16)), {"pixel_size": 0.25})
    assert io.read_image(tmp_path / "their.zarr")[0].shape == (8, 8)


def test_zarr_writer_onto_a_file_refuses_and_leaves_no_temp(tmp_path, pred):
    f = tmp_path / "file.ome.zarr"
    f.write_text("not a folder")
    with pytest.raises(ValueError, match=r"file\.ome\.zarr is a file"):
        io.write_image(f, blobs((16, 16)), {"pixel_size": 0.25})
    inp = tmp_path / "q.tif"
    tifffile.imwrite(inp, blobs((32, 32)))
    with pytest.raises(ValueError, match="is a file"):
        io.stain_files([inp], f, model=pred, overwrite=True, quiet=True, **KW)
    assert f.read_text() == "not a folder"
    assert _leftovers(tmp_path) == []


def test_failed_zarr_commit_leaves_no_temp(tmp_path, monkeypatch):
    _fail_renames(monkeypatch, lambda src, dst: Path(dst).name == "o.ome.zarr")
    with pytest.raises(OSError, match="rename failed"):
        io.write_image(tmp_path / "o.ome.zarr", blobs((16, 16)), {"pixel_size": 0.25})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------- item 10: anisotropic pixel sizes


def _aniso(path, shape=(32, 48), x=0.25, y=1.0, axes="YX"):
    tifffile.imwrite(
        path, blobs(shape), ome=True,
        metadata={"axes": axes, "PhysicalSizeX": x, "PhysicalSizeY": y},
    )  # fmt: skip


def test_read_keeps_the_y_pixel_size(tmp_path):
    _aniso(tmp_path / "a.ome.tif")
    _, meta = io.read_image(tmp_path / "a.ome.tif")
    assert meta["pixel_size"] == pytest.approx(0.25)
    assert meta["pixel_size_y"] == pytest.approx(1.0)
    out = io.write_image(tmp_path / "o.ome.zarr", blobs((8, 8)), {"pixel_size": 0.25,
                                                                  "pixel_size_y": 1.0})  # fmt: skip
    assert io.read_image(out)[1]["pixel_size_y"] == pytest.approx(1.0)


def test_anisotropic_input_is_resampled_to_square_pixels(tmp_path, pred):
    _aniso(tmp_path / "a.ome.tif", shape=(2, 32, 48), axes="ZYX")
    [out] = io.stain_files([tmp_path / "a.ome.tif"], tmp_path / "o.ome.tif", model=pred,
                           quiet=True, **KW)  # fmt: skip
    arr, meta = io.read_image(out)
    assert arr.shape == (2, 128, 48)  # Y 1.0 µm/px resampled to the X 0.25 µm/px
    assert meta["pixel_size"] == pytest.approx(0.25)
    assert meta["pixel_size_y"] == pytest.approx(0.25)
    with tifffile.TiffFile(out) as t:
        xml = t.ome_metadata
    prov = json.loads(xml.split("<Description>")[1].split("</Description>")[0]
                      .replace("&quot;", '"').replace("&amp;", "&"))  # fmt: skip
    assert any("square" in w and "1 µm/px" in w for w in prov["warnings"])
    assert np.isfinite(np.asarray(arr)).all()


def test_implausibly_anisotropic_input_is_refused(tmp_path, pred):
    _aniso(tmp_path / "a.ome.tif", x=0.25, y=25.0)
    with pytest.raises(ValueError, match=r"a\.ome\.tif.*Y 25 .*X 0\.25"):
        io.stain_files([tmp_path / "a.ome.tif"], tmp_path / "o.ome.tif", model=pred,
                       quiet=True, **KW)  # fmt: skip
    assert not (tmp_path / "o.ome.tif").exists()


def test_pixel_size_flag_is_what_the_output_records(tmp_path, pred):
    tifffile.imwrite(tmp_path / "a.ome.tif", blobs((32, 48)), ome=True,
                     metadata={"axes": "YX", "PhysicalSizeX": 0.2, "PhysicalSizeY": 0.2})  # fmt: skip
    [out] = io.stain_files([tmp_path / "a.ome.tif"], tmp_path / "o.ome.tif", model=pred,
                           pixel_size=0.25, quiet=True, **KW)  # fmt: skip
    assert io.read_image(out)[1]["pixel_size"] == pytest.approx(0.25)


def test_reader_layer_scale_keeps_y(tmp_path):
    from napari_lcm_stain._reader_writer import read_layers

    _aniso(tmp_path / "a.ome.tif")
    [(_data, kwargs, _kind)] = read_layers(str(tmp_path / "a.ome.tif"))
    assert kwargs["scale"] == pytest.approx((1.0, 0.25))


def test_writer_writes_the_layer_y_scale(tmp_path):
    from napari_lcm_stain._reader_writer import write_ome_tiff

    meta = {"name": "q", "scale": (1.6, 0.414), "units": ("micrometer", "micrometer")}
    [p] = write_ome_tiff(str(tmp_path / "w.ome.tif"), blobs((16, 16)), meta)
    _, m = io.read_image(p)
    assert m["pixel_size"] == pytest.approx(0.414) and m["pixel_size_y"] == pytest.approx(1.6)


# -------------------------------------------------- item 11: the layer scale beats stale metadata


def test_layer_scale_beats_stale_metadata_pixel_size():
    from napari.layers import Image

    from napari_lcm_stain._widgets._layers import layer_pixel_size, pixel_size_of

    units = ("micrometer", "micrometer")
    stale = {"pixel_size": 0.2}
    assert pixel_size_of(stale, (0.5, 0.5), units) == pytest.approx(0.5)
    assert pixel_size_of(stale, (500.0, 500.0), ("nanometer", "nanometer")) == pytest.approx(0.5)
    assert pixel_size_of(stale, (1.0, 1.0), ("pixel", "pixel")) == pytest.approx(0.2)
    layer = Image(np.zeros((8, 8)), scale=(0.5, 0.5), units=units, metadata=stale)
    assert layer_pixel_size(layer) == pytest.approx(0.5)  # the dock's `auto`


def test_writer_records_the_layer_scale_not_stale_metadata(tmp_path):
    from napari_lcm_stain._reader_writer import write_ome_zarr

    meta = {"name": "q", "scale": (0.5, 0.5), "units": ("micrometer", "micrometer"),
            "metadata": {"pixel_size": 0.2}}  # fmt: skip
    [p] = write_ome_zarr(str(tmp_path / "w.ome.zarr"), blobs((16, 16)), meta)
    assert io.read_image(p)[1]["pixel_size"] == pytest.approx(0.5)


# ----------------------------------------------------------- item 12: planar (separate) RGB TIFF


def test_planar_rgb_tiff_is_recognised_as_rgb(tmp_path, pred):
    rgb = (np.random.default_rng(0).random((3, 32, 40)) * 255).astype(np.uint8)
    p = tmp_path / "rgb.tif"
    tifffile.imwrite(p, rgb, photometric="rgb", planarconfig="separate")
    with pytest.raises(ValueError, match=r"rgb\.tif.*RGB.*separate colour planes"):
        io.read_image(p)
    with pytest.raises(ValueError, match="RGB"):
        io.stain_files([p], tmp_path / "o.ome.tif", model=pred, quiet=True, **KW)
    assert not (tmp_path / "o.ome.tif").exists()


# --------------------------------------------------------- item 16: malformed OME-Zarr metadata


def _group(path, multiscales):
    g = zarr.open_group(str(path), mode="w", zarr_format=2)
    g.create_array("0", shape=(8, 8), dtype="f4")
    g.attrs["multiscales"] = multiscales
    return path


def _axes(unit="micrometer"):
    return [
        {"name": "y", "type": "space", "unit": unit},
        {"name": "x", "type": "space", "unit": unit},
    ]


def test_multiscales_without_datasets_is_a_clear_error(tmp_path):
    p = _group(tmp_path / "n.ome.zarr", [{"version": "0.4", "axes": _axes()}])
    with pytest.raises(ValueError, match=r"n\.ome\.zarr.*'datasets'"):
        io.read_image(p)
    for bad in ([{"datasets": []}], [{"datasets": [{"path": "missing"}]}], "x", [3]):
        _group(p, bad)
        with pytest.raises(ValueError, match=r"n\.ome\.zarr"):
            io.read_image(p)


def test_zarr_pixel_size_that_is_not_a_number_names_the_file(tmp_path):
    z = zarr.create_array(str(tmp_path / "abc.zarr"), shape=(8, 8), dtype="f4")
    z.attrs["pixel_size"] = "abc"
    with pytest.raises(ValueError, match=r"abc\.zarr.*pixel_size 'abc'"):
        io.read_image(tmp_path / "abc.zarr")
    z.attrs["pixel_size"] = "0.4"  # a number written as text is still that number
    assert io.read_image(tmp_path / "abc.zarr")[1]["pixel_size"] == pytest.approx(0.4)


@pytest.mark.parametrize("scale", ["0.4", ["1", "0.4"]])
def test_zarr_scale_is_parsed_as_numbers(tmp_path, scale):
    tr = [{"type": "scale", "scale": scale}]
    p = _group(tmp_path / "s.ome.zarr",
               [{"axes": _axes(), "datasets": [{"path": "0", "coordinateTransformations": tr}]}])  # fmt: skip
    if isinstance(scale, str):  # not a list: refused, not read as its last character
        with pytest.raises(ValueError, match=r"s\.ome\.zarr.*scale '0\.4'.*list"):
            io.read_image(p)
    else:
        assert io.read_image(p)[1]["pixel_size"] == pytest.approx(0.4)


def test_zarr_scale_of_wrong_length_or_value_is_refused(tmp_path):
    for scale in ([0.4], [1, "abc"], [1, -0.4]):
        tr = [{"type": "scale", "scale": scale}]
        p = _group(tmp_path / "s.ome.zarr",
                   [{"axes": _axes(), "datasets": [{"path": "0", "coordinateTransformations": tr}]}])  # fmt: skip
        with pytest.raises(ValueError, match=r"s\.ome\.zarr.*scale"):
            io.read_image(p)


# ---------------------------------------------------------- item 19: truncated TIFF at open


@pytest.mark.parametrize("shape", [(64, 80), (3, 64, 80)])
def test_truncated_uncompressed_tiff_is_refused_at_open(tmp_path, shape):
    full = tmp_path / "full.tif"
    tifffile.imwrite(full, blobs(shape))
    data = full.read_bytes()
    p = tmp_path / "cut.tif"
    p.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=r"cut\.tif.*truncated.*bytes"):
        io.read_image(p)
    from napari_lcm_stain._reader_writer import get_reader

    assert get_reader(str(p)) is None


def test_stack_that_lost_pages_is_refused_not_read_as_one_plane(tmp_path):
    full = tmp_path / "full.tif"
    tifffile.imwrite(full, blobs((40, 32, 32)), compression="zlib")
    data = full.read_bytes()
    p = tmp_path / "cut.tif"
    p.write_bytes(data[: len(data) * 3 // 4])  # the IFDs of the last pages are gone
    with pytest.raises(ValueError, match=r"cut\.tif.*truncated.*\(40, 32, 32\)"):
        io.read_image(p)
