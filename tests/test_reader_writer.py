"""The npe2 reader and writers: which files they take, scale/units from the pixel size, and the
stain provenance surviving a round trip through a real viewer's Open and Save."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from npe2 import PluginManager, PluginManifest

from napari_lcm_stain import io
from napari_lcm_stain._reader_writer import get_reader, read_layers, read_provenance
from test_widgets import _click_and_wait, _stain_dock, models  # noqa: F401 - fixture

PLUGIN = "napari-lcm-stain"
PX = 0.414


@pytest.fixture
def plugin_manager():
    pm = PluginManager()
    pm.register(PluginManifest.from_distribution(PLUGIN))
    return pm


def _phase(shape=(48, 64), seed=0):
    return np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32)


# ------------------------------------------------------------------------------------- reader


@pytest.mark.parametrize("name", ["field.ome.tif", "field.tiff", "field.ome.zarr"])
def test_reader_sets_scale_units_and_pixel_size(tmp_path, name):
    data = _phase((3, 48, 64))
    path = io.write_image(tmp_path / name, data, {"pixel_size": PX, "axes": "ZYX"})
    reader = get_reader(str(path))
    assert callable(reader)
    [(arr, kwargs, kind)] = reader(str(path))
    assert kind == "image"
    assert kwargs["name"] == "field"
    np.testing.assert_allclose(kwargs["scale"], (1.0, PX, PX))
    assert kwargs["units"] == ("pixel", "micrometer", "micrometer")
    assert kwargs["axis_labels"] == ("z", "y", "x")
    assert kwargs["metadata"]["pixel_size"] == pytest.approx(PX)
    np.testing.assert_array_equal(np.asarray(arr), data)


def test_reader_without_pixel_size_leaves_scale_alone(tmp_path):
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, _phase())
    [(_arr, kwargs, _kind)] = read_layers(str(path))
    assert "scale" not in kwargs and "units" not in kwargs
    assert kwargs["metadata"]["pixel_size"] is None


def test_reader_declines_what_it_cannot_read(tmp_path):
    rgb = tmp_path / "photo.tif"
    tifffile.imwrite(rgb, np.zeros((16, 16, 3), np.uint8), photometric="rgb")
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00" + b"\x00" * 20)
    png = tmp_path / "image.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    good = io.write_image(tmp_path / "good.ome.tif", _phase(), {"pixel_size": PX})
    for path in (rgb, corrupt, png, folder, tmp_path / "missing.tif"):
        assert get_reader(str(path)) is None, path
    assert get_reader([str(good), str(good)]) is None  # stacks of files are napari's job
    assert callable(get_reader([str(good)]))


def test_manifest_lists_reader_and_writers_for_the_right_extensions(plugin_manager):
    pm = plugin_manager
    for path in ("a.ome.tif", "a.tif", "A.TIFF", "a.ome.tiff"):
        assert [r.plugin_name for r in pm.iter_compatible_readers([path])] == [PLUGIN], path
    for path in ("a.png", "a.nd2", "a.czi"):
        assert list(pm.iter_compatible_readers([path])) == [], path
    for path, command in (
        ("out.ome.tif", "napari-lcm-stain.write_ome_tiff"),
        ("out.ome.tiff", "napari-lcm-stain.write_ome_tiff"),
        ("out.ome.zarr", "napari-lcm-stain.write_ome_zarr"),
    ):
        writer, _ = pm.get_writer(path, ["image"])
        assert writer is not None and writer.command == command, path
    assert pm.get_writer("out.png", ["image"])[0] is None  # plain formats stay napari's
    assert pm.get_writer("out.ome.tif", ["labels"])[0] is None  # image layers only


# ----------------------------------------------------------------------------- real viewer


@pytest.mark.gui
def test_open_and_save_dialogs_offer_the_plugin(make_napari_viewer, tmp_path):
    from napari.plugins import _npe2

    viewer = make_napari_viewer()
    layer = viewer.add_image(_phase())
    assert PLUGIN in _npe2.get_readers(str(tmp_path / "x.ome.tif"))
    assert PLUGIN not in _npe2.get_readers(str(tmp_path / "x.png"))
    filters, writers = _npe2.file_extensions_string_for_layers([layer])
    assert "LCM Virtual Stain OME-TIFF with stain provenance (*.ome.tif *.ome.tiff)" in filters
    assert "LCM Virtual Stain OME-Zarr with stain provenance (*.ome.zarr)" in filters
    labels = viewer.add_labels(np.zeros((8, 8), np.int32))
    filters, _ = _npe2.file_extensions_string_for_layers([labels])
    assert "LCM Virtual Stain" not in filters


@pytest.mark.gui
@pytest.mark.usefixtures("models")
@pytest.mark.parametrize("suffix", [".ome.tif", ".ome.zarr"])
def test_stained_layer_round_trips_with_provenance(make_napari_viewer, qtbot, tmp_path, suffix):
    src = io.write_image(tmp_path / "qobm phase.ome.tif", _phase((96, 96)), {"pixel_size": PX})
    viewer = make_napari_viewer()
    [q] = viewer.open(str(src), plugin=PLUGIN)
    assert q.name == "qobm phase"
    np.testing.assert_allclose(q.scale, (PX, PX))
    assert [str(u) for u in q.units] == ["micrometer", "micrometer"]

    widget = _stain_dock(viewer)
    widget.pix2pix_check.setChecked(False)
    widget.seed_spin.setValue(11)
    assert widget.layer_combo.layer() == q
    _click_and_wait(qtbot, widget)
    assert widget.last_error is None, widget.last_error
    out = viewer.layers["qobm phase · DAPI (LCM)"]

    target = tmp_path / f"stained{suffix}"
    viewer.layers.selection = {out}
    written = viewer.layers.save(str(target), selected=True, plugin=PLUGIN)
    assert written == [str(target)]

    prov = read_provenance(target)
    assert prov["software"] == PLUGIN and prov["version"]
    assert prov["seed"] == 11 and prov["steps"] == 1
    assert prov["pixel_size"] == pytest.approx(PX)
    assert prov["checkpoint"] == "lcm.safetensors"
    from napari_lcm_stain import checkpoints

    assert prov["checkpoint_sha256"] == checkpoints.sha256(checkpoints.packaged_path("lcm"))
    assert prov["model"] and prov["layer"] == "qobm phase · DAPI (LCM)"

    [back] = viewer.open(str(target), plugin=PLUGIN)
    np.testing.assert_array_equal(np.asarray(back.data), out.data)
    np.testing.assert_allclose(back.scale, (PX, PX))
    assert back.metadata["provenance"] == prov
    if suffix == ".ome.tif":  # the pixel size is in the OME-XML other tools read
        with tifffile.TiffFile(target) as tif:
            xml = tif.ome_metadata
        assert f'PhysicalSizeX="{PX}"' in xml and prov["checkpoint_sha256"] in xml


def test_writer_refuses_rgb_and_too_many_dimensions(tmp_path):
    from napari_lcm_stain._reader_writer import write_ome_tiff, write_ome_zarr

    with pytest.raises(ValueError, match="layer 'photo' is RGB: .* split the channels"):
        write_ome_tiff(
            str(tmp_path / "p.ome.tif"), np.zeros((8, 8, 3)), {"name": "photo", "rgb": True}
        )
    with pytest.raises(ValueError, match="layer 'big' has 6 dimensions"):
        write_ome_zarr(str(tmp_path / "b.ome.zarr"), np.zeros((1,) * 4 + (8, 8)), {"name": "big"})
    assert list(tmp_path.iterdir()) == []
