"""The texture switch outside the viewer: `lcm-stain stain/watch --texture`, `io.stain_files`,
`watch.watch_folder` and the docks' job code all reach the core's ``texture=``.

The packaged weights may have no texture head, so these tests use a small random LCM checkpoint
whose decoder has one (`_fake_predictor.texture_lcm`), loaded by the real loader.
"""

from __future__ import annotations

import json
import threading
import warnings

import numpy as np
import pytest
import tifffile

from _fake_predictor import FakePredictor, blobs, texture_lcm
from napari_lcm_stain import cli, engine, watch
from napari_lcm_stain._widgets import _jobs
from napari_lcm_stain.sampling import load_predictor

TILE, OVERLAP = 64, 16
T = ["--tile", str(TILE), "--overlap", str(OVERLAP), "--device", "cpu"]


def _write_at_model_pixel_size(path, image):
    """A TIFF whose metadata gives the test model's 0.414 µm/px (without one, the CLI would
    estimate the pixel size from these random blobs and rescale)."""
    meta = {"axes": "YX", "PhysicalSizeX": 0.414, "PhysicalSizeY": 0.414}
    tifffile.imwrite(path, image, ome=True, metadata=meta)


@pytest.fixture(scope="module")
def tex(tmp_path_factory):
    return texture_lcm(tmp_path_factory.mktemp("ckpt") / "tex.safetensors")


@pytest.fixture(scope="module")
def image():
    return blobs((64, 80), seed=2)


@pytest.fixture(scope="module")
def expected(tex, image):
    """{texture: the core's stain of `image`} with the settings the tests use."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # blobs are out of distribution: a note, not the point
        for texture in (True, False):
            pred = load_predictor(tex, device="cpu", texture=texture)
            assert pred.texture is texture
            out[texture] = engine.stain(image, pred, None, TILE, OVERLAP, "cpu", seed=0)
    assert np.abs(out[True] - out[False]).std() > 0.05  # the grain is really there
    return out


def description(path) -> dict:
    with tifffile.TiffFile(path) as t:
        xml = t.ome_metadata
    text = xml.split("<Description>")[1].split("</Description>")[0]
    return json.loads(text.replace("&quot;", '"').replace("&amp;", "&"))


def test_cli_texture_draws_grain_and_the_default_is_smooth(tmp_path, tex, image, expected, capsys):
    src = tmp_path / "field.tif"
    _write_at_model_pixel_size(src, image)
    args = ["stain", str(src), "--model", str(tex), *T]
    on, off = tmp_path / "on.ome.tif", tmp_path / "off.ome.tif"
    assert cli.main([*args, "-o", str(on), "--texture"]) == 0
    assert cli.main([*args, "-o", str(off)]) == 0
    capsys.readouterr()
    a_on, a_off = tifffile.imread(on), tifffile.imread(off)
    np.testing.assert_allclose(a_off, expected[False], atol=1e-6)  # default: the smooth mean
    np.testing.assert_allclose(a_on, expected[True], atol=1e-6)  # --texture: the grain
    assert np.abs(a_on - a_off).max() > 0.1
    # the file says which mode made it
    assert description(on)["texture"] is True and description(off)["texture"] is False
    np.testing.assert_array_equal(tifffile.imread(src), image)  # the input is not touched


def test_texture_is_in_the_help_of_stain_and_watch(capsys):
    for command in ("stain", "watch"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--texture" in text and "smooth mean" in text and "default: smooth" in text


def test_info_records_whether_grain_was_drawn(tex):
    """`info["texture"]`: true only for a texture decoder with texture on; a model without a
    texture head (Pix2Pix, older checkpoints) draws none whatever is asked."""
    from napari_lcm_stain._drain import drain

    img = blobs((32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model, texture, drawn in (
            (str(tex), True, True), (str(tex), False, False), (FakePredictor(), True, False),
        ):  # fmt: skip
            gen = engine.iter_stain(img, model, tile=32, overlap=0, device="cpu", texture=texture)
            assert drain(gen).info["texture"] is drawn


def test_uncertainty_samples_leave_the_grain_out(tex, image):
    """samples > 1: mean and std are of the smooth stain whatever `texture` says (grain is noise,
    not the model's uncertainty), the note says so, and info says no grain was drawn."""
    from napari_lcm_stain._drain import drain

    runs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for texture in (True, False):
            gen = engine.iter_stain(image, str(tex), None, TILE, OVERLAP, "cpu", seed=0,
                                    samples=2, texture=texture)  # fmt: skip
            runs[texture] = drain(gen)
    on, off = runs[True], runs[False]
    np.testing.assert_array_equal(on.mean, off.mean)
    np.testing.assert_array_equal(on.std, off.std)
    assert on.info["texture"] is False and float(on.std.max()) > 0
    assert any("texture grain is left out" in n for n in on.info["warnings"])


def test_cli_watch_passes_texture_to_the_watch(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(watch, "watch_folder", lambda *a, **k: seen.append(k["texture"]))
    base = ["watch", str(tmp_path), "-o", str(tmp_path / "out")]
    assert cli.main(base) == 0 and cli.main([*base, "--texture"]) == 0
    assert seen == [False, True]


def test_watch_folder_texture_switch_reaches_the_files(tmp_path, tex, image, expected):
    src = tmp_path / "in"
    src.mkdir()
    _write_at_model_pixel_size(src / "field.tif", image)
    outs = {}
    for texture in (True, False):
        out, stop = tmp_path / f"out-{texture}", threading.Event()
        timer = threading.Timer(2.5, stop.set)  # well past the settle time
        timer.start()
        report = watch.watch_folder(
            src, out, model=str(tex), tile=TILE, overlap=OVERLAP, device="cpu", settle=0.2,
            poll=0.05, existing=True, stop=stop, log=lambda _line: None, texture=texture,
        )  # fmt: skip
        timer.join()
        assert [p.name for p in report.written] == ["field_dapi.ome.tif"], report.notes
        outs[texture] = out / "field_dapi.ome.tif"
    for texture, path in outs.items():
        np.testing.assert_allclose(tifffile.imread(path), expected[texture], atol=1e-6)
        assert description(path)["texture"] is texture


# ----------------------------------------------------------------------------- the docks' jobs


def test_job_cache_key_includes_texture_and_never_mutates_a_cached_predictor(tex):
    cache: dict = {}
    on = _jobs.get_predictor(cache, str(tex), 1, "cpu", True)
    off = _jobs.get_predictor(cache, str(tex), 1, "cpu", False)
    assert off is not on and on.texture is True and off.texture is False
    assert _jobs.get_predictor(cache, str(tex), 1, "cpu", True) is on  # reused, unchanged
    assert _jobs.get_predictor(cache, str(tex), 1, "cpu") is off  # the default is smooth
    assert on.texture is True
    # the key: model, steps, device, texture, guidance (None: the model's default)
    assert (str(tex), 1, "cpu", True, None) in cache and (str(tex), 1, "cpu", False, None) in cache


def test_in_memory_predictor_follows_texture_through_a_copy(tex, image, expected):
    """A loaded model (e.g. sent by the Fine-tune dock) is never changed: texture off is a
    shallow copy sharing its networks; models without a texture head pass through."""
    assert load_predictor(tex, device="cpu").texture is False  # loading defaults to smooth
    loaded = load_predictor(tex, device="cpu", texture=True)
    off = _jobs.get_predictor({}, loaded, None, "cpu", False)
    assert off is not loaded and loaded.texture is True and off.texture is False
    assert off.decoder is loaded.decoder and off.unet is loaded.unet
    assert _jobs.get_predictor({}, loaded, None, "cpu", True) is loaded
    again = _jobs.get_predictor({}, off, None, "cpu", True)  # the copy can be switched back
    assert again is not off and again.texture is True and off.texture is False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = engine.stain(image, off, None, TILE, OVERLAP, "cpu", seed=0)
    np.testing.assert_allclose(y, expected[False], atol=1e-6)
    fake = FakePredictor()  # no texture head: used as is
    assert _jobs.get_predictor({}, fake, None, "cpu", False) is fake


def test_stain_job_passes_texture_and_records_it(tex, image, expected):
    job = _jobs.StainJob("stain", "tex", str(tex), 1)
    for texture in (True, False):
        gen = _jobs.stain_job(
            image, [job], tile=TILE, overlap=OVERLAP, device="cpu", seed=0, pixel_size=None,
            truth=None, truth_labels=None, cache={}, texture=texture,
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = drain_job(gen)
        assert isinstance(out, _jobs.StainOutcome), out
        [(_role, _label, data)] = out.outputs
        np.testing.assert_allclose(data, expected[texture], atol=1e-6)
        assert out.provenance[("stain", "tex")]["texture"] is texture


def drain_job(gen):
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value
