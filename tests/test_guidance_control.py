"""The user-facing guidance control (issue #24, item 3): `stain(guidance=)`, `lcm-stain
stain/watch/evaluate --guidance`, `io.stain_files`, `watch.watch_folder` and the Stain dock's
Guidance box all reach the core's ``guidance=``, and the value used is recorded in provenance.

These tests use a small random guided LCM checkpoint (`_fake_predictor.guided_lcm`: a guidance
input, w from 1 to 3, default 2) and an unguided one (`small_lcm`), loaded by the real loader,
so they do not depend on what the packaged release accepts (tests/test_quality.py checks that).
"""

from __future__ import annotations

import math
import re
import threading
import warnings

import numpy as np
import pytest
import tifffile

from _fake_predictor import FakePredictor, blobs, guided_lcm, small_lcm
from napari_lcm_stain import _params, cli, engine, watch
from napari_lcm_stain._drain import drain
from napari_lcm_stain._widgets import _jobs
from napari_lcm_stain.sampling import load_predictor
from test_reliability_watch import _probe
from test_texture_options import _write_at_model_pixel_size, description

TILE, OVERLAP = 64, 16
T = ["--tile", str(TILE), "--overlap", str(OVERLAP), "--device", "cpu"]
RANGE = "guidance must be 1-3 for this model (the range it was trained for)"
NO_CONTROL = "this model has no guidance control"


@pytest.fixture(scope="module")
def guided(tmp_path_factory):
    return str(guided_lcm(tmp_path_factory.mktemp("ckpt") / "guided.safetensors"))


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """An LCM without a guidance control."""
    return str(small_lcm(tmp_path_factory.mktemp("ckpt") / "plain.safetensors"))


@pytest.fixture(scope="module")
def image():
    return blobs((64, 80), seed=2)


@pytest.fixture(scope="module")
def expected(guided, image):
    """{guidance: the core's stain of `image`} (None: the model's default, 2)."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # blobs are out of distribution: a note, not the point
        for g in (1.0, 2.0, 3.0):
            pred = load_predictor(guided, device="cpu", guidance=g)
            assert pred.guidance == g
            out[g] = engine.stain(image, pred, None, TILE, OVERLAP, "cpu", seed=0)
    out[None] = out[2.0]
    return out


def _stain(image, model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gen = engine.iter_stain(image, model, None, TILE, OVERLAP, "cpu", seed=0, **kw)
        return drain(gen)


# ------------------------------------------------------------------------------------ engine


def test_engine_guidance_changes_the_stain_and_info_records_it(guided, image, expected):
    runs = {g: _stain(image, guided, guidance=g) for g in (None, 1.0, 1.5, 3.0)}
    used = {g: r.info["guidance"] for g, r in runs.items()}
    assert used == {None: 2.0, 1.0: 1.0, 1.5: 1.5, 3.0: 3.0}  # None: the trained default
    np.testing.assert_array_equal(runs[None].mean, expected[2.0])
    np.testing.assert_array_equal(runs[3.0].mean, expected[3.0])
    assert np.abs(runs[1.0].mean - runs[3.0].mean).max() > 1e-3  # an input to the network
    assert np.abs(runs[1.5].mean - runs[None].mean).max() > 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        public = engine.stain(image, guided, None, TILE, OVERLAP, "cpu", guidance=3.0)
    np.testing.assert_array_equal(public, expected[3.0])  # stain() takes it too


@pytest.mark.parametrize("bad", [0.5, 3.5, math.nan])
def test_engine_refuses_guidance_outside_the_trained_range(guided, image, bad):
    with pytest.raises(ValueError, match=re.escape(RANGE)):
        _stain(image, guided, guidance=bad)


def test_engine_refuses_a_non_number_before_loading_the_model(image, monkeypatch):
    def no_loading(*_a, **_k):
        raise AssertionError("the model was loaded before the guidance was checked")

    monkeypatch.setattr(engine, "get_predictor", no_loading)
    for bad in ("strong", True, [2.0]):
        with pytest.raises(ValueError, match="guidance must be a number"):
            _stain(image, "lcm", guidance=bad)


def test_models_without_guidance_accept_only_none_or_one(image, plain):
    fake = FakePredictor()  # a duck-typed predictor: no guidance control
    for model in (plain, "pix2pix", fake):
        with pytest.raises(ValueError, match=NO_CONTROL):
            _stain(image[:32, :32], model, guidance=2.0)
    for g in (None, 1.0, 1):
        assert _stain(image[:32, :32], fake, guidance=g).info["guidance"] is None
    assert _stain(image[:32, :32], "pix2pix", guidance=1.0).info["guidance"] is None


def test_a_passed_predictor_follows_guidance_through_a_copy(guided, image, expected):
    loaded = load_predictor(guided, device="cpu")
    assert loaded.guidance == 2.0
    assert engine.get_predictor(loaded) is loaded  # None: as it is
    high = engine.get_predictor(loaded, guidance=3.0)
    assert high is not loaded and high.guidance == 3.0 and loaded.guidance == 2.0
    assert high.unet is loaded.unet  # sharing the networks
    np.testing.assert_array_equal(_stain(image, loaded, guidance=3.0).mean, expected[3.0])
    assert loaded.guidance == 2.0  # the caller's object is never changed


def test_the_one_check_for_every_model_kind(guided):
    """`_params.check_guidance` (what the core, the CLI before torch and the dock call) with
    the range `guidance_range` reads from each kind of config."""
    import json
    from pathlib import Path

    configs = {
        "guided": json.loads(Path(guided).with_suffix(".json").read_text()),
        "pix2pix": _params.model_config("pix2pix"),
        "teacher-cfg": {"kind": "teacher", "guidance": {"min": 1, "max": 4, "default": 1}},
        "lcm-no-input": {
            "kind": "lcm",
            "guidance": {"min": 1, "max": 3, "default": 2},
            "architecture": {"unet": {"kwargs": {}}},
        },  # fmt: skip
    }
    accepted = {name: _params.guidance_range(c) for name, c in configs.items()}
    assert accepted["guided"] == {"min": 1.0, "max": 3.0, "default": 2.0}
    assert accepted["teacher-cfg"] == {"min": 1.0, "max": 4.0, "default": 1.0}
    assert accepted["pix2pix"] is None and accepted["lcm-no-input"] is None

    def check(name, g):
        try:
            return _params.check_guidance(g, accepted[name])
        except ValueError as e:
            return str(e)

    assert [check("guided", g) for g in (None, 1, 2.5, "2")] == [2.0, 1.0, 2.5, 2.0]
    assert check("teacher-cfg", 3.9) == 3.9 and check("teacher-cfg", None) == 1.0
    for name in ("pix2pix", "lcm-no-input"):
        assert check(name, None) is None and check(name, 1.0) is None
        assert "has no guidance control" in check(name, 2.5)
    for g in (0.5, 7, math.nan):
        assert check("guided", g).startswith("guidance must be 1-3 for this model")
    for g in ("x", True, [1]):
        assert check("guided", g).startswith("guidance must be a number")


# --------------------------------------------------------------------------------------- CLI


def test_cli_stain_guidance_reaches_the_file_and_its_provenance(tmp_path, guided, image, expected,
                                                                capsys):  # fmt: skip
    src = tmp_path / "field.tif"
    _write_at_model_pixel_size(src, image)
    args = ["stain", str(src), "--model", guided, *T]
    high, default = tmp_path / "high.ome.tif", tmp_path / "default.ome.tif"
    assert cli.main([*args, "-o", str(high), "--guidance", "3"]) == 0
    assert cli.main([*args, "-o", str(default)]) == 0
    capsys.readouterr()
    np.testing.assert_allclose(tifffile.imread(high), expected[3.0], atol=1e-6)
    np.testing.assert_allclose(tifffile.imread(default), expected[2.0], atol=1e-6)
    assert description(high)["guidance"] == 3.0
    assert description(default)["guidance"] == 2.0  # the model's default, recorded too

    bad = tmp_path / "bad.ome.tif"
    assert cli.main([*args, "-o", str(bad), "--guidance", "5"]) == 2
    err = capsys.readouterr().err
    assert "lcm-stain stain: error:" in err and RANGE in err and "got 5.0" in err
    assert not bad.exists()


@pytest.mark.parametrize(
    ("command", "model", "guidance", "message"),
    [
        ("stain", "guided", "5", RANGE),
        ("stain", "plain", "2", NO_CONTROL),
        ("stain", "pix2pix", "1.5", NO_CONTROL),
        ("watch", "guided", "0.5", RANGE),
        ("watch", "plain", "2", NO_CONTROL),
    ],
)
def test_cli_guidance_errors_come_before_torch(tmp_path, guided, plain, command, model,
                                               guidance, message):  # fmt: skip
    tifffile.imwrite(tmp_path / "q.tif", np.random.default_rng(0).random((32, 32), np.float32))
    (tmp_path / "in").mkdir()
    where = ["q.tif", "-o", "o.tif"] if command == "stain" else ["in", "-o", "out"]
    name = {"guided": guided, "plain": plain}.get(model, model)
    last, stderr = _probe(tmp_path, command, *where, "--model", name, "--guidance", guidance)
    assert last == "RC 2 HEAVY -", (last, stderr)
    assert message in stderr, stderr
    assert not (tmp_path / "o.tif").exists() and not (tmp_path / "out").exists()


def test_guidance_is_in_the_help_of_stain_watch_and_evaluate(capsys):
    for command in ("stain", "watch", "evaluate"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--guidance G" in text and "range" in text, command
    assert "crisper, bolder nuclei" in watch.GUIDANCE_HELP


@pytest.mark.parametrize("suite", ["benchmark", "instruments"])
def test_cli_evaluate_passes_guidance(monkeypatch, suite):
    import napari_lcm_stain.evaluate as evaluate

    seen = []
    name = "run_instrument_suite" if suite == "instruments" else "run_evaluate"
    monkeypatch.setattr(evaluate, name, lambda **k: seen.append(k["guidance"]))
    assert cli.main(["evaluate", "--suite", suite, "--quick", "--guidance", "2.5"]) == 0
    assert cli.main(["evaluate", "--suite", suite, "--quick"]) == 0
    assert seen == [2.5, None]


# ------------------------------------------------------------------------------------- watch


def test_watch_refuses_guidance_at_startup(tmp_path, guided, plain):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for model, g, message in ((guided, 4.0, re.escape(RANGE)), (plain, 2.0, NO_CONTROL),
                              (guided, "x", "guidance must be a number")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            watch.watch_folder(src, out, model=model, guidance=g, stop=threading.Event(),
                               log=lambda _line: None)  # fmt: skip
        assert not out.exists()  # refused before anything was created or loaded


def test_cli_watch_passes_guidance_and_the_restart_command_keeps_it(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(watch, "watch_folder", lambda *a, **k: seen.append(k["guidance"]))
    base = ["watch", str(tmp_path), "-o", str(tmp_path / "out")]
    assert cli.main(base) == 0 and cli.main([*base, "--guidance", "1.5"]) == 0
    assert seen == [None, 1.5]
    line = watch.stain_command([tmp_path / "a.tif"], tmp_path / "out", "g.safetensors",
                               {"guidance": 2.5, "seed": 0})  # fmt: skip
    assert "--guidance 2.5" in line and "--seed 0" in line
    assert "--guidance" not in watch.stain_command([tmp_path / "a.tif"], tmp_path, "lcm", {})


def test_watch_folder_guidance_reaches_the_files(tmp_path, guided, image, expected):
    src, out, stop = tmp_path / "in", tmp_path / "out", threading.Event()
    src.mkdir()
    _write_at_model_pixel_size(src / "field.tif", image)
    timer = threading.Timer(2.5, stop.set)  # well past the settle time
    timer.start()
    report = watch.watch_folder(
        src, out, model=guided, tile=TILE, overlap=OVERLAP, device="cpu", settle=0.2,
        poll=0.05, existing=True, stop=stop, log=lambda _line: None, guidance=1.0,
    )  # fmt: skip
    timer.join()
    assert [p.name for p in report.written] == ["field_dapi.ome.tif"], report.notes
    np.testing.assert_allclose(tifffile.imread(out / "field_dapi.ome.tif"), expected[1.0],
                               atol=1e-6)  # fmt: skip
    assert description(out / "field_dapi.ome.tif")["guidance"] == 1.0


# -------------------------------------------------------------------------------- docks' jobs


def test_job_cache_key_includes_guidance_and_never_mutates_a_cached_predictor(guided):
    cache: dict = {}
    low = _jobs.get_predictor(cache, guided, 1, "cpu", False, 1.0)
    high = _jobs.get_predictor(cache, guided, 1, "cpu", False, 3.0)
    default = _jobs.get_predictor(cache, guided, 1, "cpu", False, None)
    assert len({id(low), id(high), id(default)}) == 3
    assert (low.guidance, high.guidance, default.guidance) == (1.0, 3.0, 2.0)
    assert _jobs.get_predictor(cache, guided, 1, "cpu", False, 3.0) is high
    assert _jobs.get_predictor(cache, low, 1, "cpu", False, 3.0).guidance == 3.0  # a copy
    assert low.guidance == 1.0


def test_stain_job_gives_guidance_to_its_job_only(guided, image, expected):
    """The main job samples at its guidance; the Pix2Pix comparison (no guidance control)
    gets none; both record what they used."""
    jobs = [
        _jobs.StainJob("stain", "guided", guided, None, 1, 3.0),
        _jobs.StainJob("pix2pix", "fake", FakePredictor(), None, 1),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = drain(_jobs.stain_job(
            image, jobs, tile=TILE, overlap=OVERLAP, device="cpu", seed=0, pixel_size=None,
            truth=None, truth_labels=None, cache={},
        ))  # fmt: skip
    assert isinstance(out, _jobs.StainOutcome), out
    np.testing.assert_allclose(out.outputs[0][2], expected[3.0], atol=1e-6)
    assert out.provenance[("stain", "guided")]["guidance"] == 3.0
    assert out.provenance[("pix2pix", "fake")]["guidance"] is None


# ----------------------------------------------------------------------------------- the dock


@pytest.mark.gui
def test_dock_guidance_box_follows_the_model_and_reaches_the_layers(make_napari_viewer, qtbot,
                                                                     guided):  # fmt: skip
    """Follows each packaged model's config (its range and default, or disabled at 1 without
    guidance); enabled with the checkpoint's range and default for a guided one; the value
    reaches the stain, live staining and the layers' provenance; Pix2Pix beside it gets none."""
    from napari_lcm_stain._widgets._layers import PLUGIN_KEY
    from test_widgets import _click_and_wait, _live_one_frame, _stain_dock

    img = blobs((64, 80), seed=2)
    viewer = make_napari_viewer()
    q = viewer.add_image(img.copy(), name="qOBM phase")
    widget = _stain_dock(viewer)
    box = widget.guidance_spin
    for index, name in ((0, "lcm"), (1, "teacher")):  # the packaged models
        widget.model_combo.setCurrentIndex(index)
        accepted = _params.guidance_range(_params.model_config(name))
        assert "crisper, bolder nuclei" in box.toolTip()
        if accepted is None:
            assert not box.isEnabled() and box.value() == 1.0 and widget.guidance() is None
        else:
            assert box.isEnabled() and box.value() == pytest.approx(accepted["default"])
            assert (box.minimum(), box.maximum()) == (accepted["min"], accepted["max"])
            assert widget.guidance() is None  # at its default: the engine applies the model's

    widget.add_model("guided", guided)
    assert box.isEnabled()
    assert (box.minimum(), box.maximum(), box.value()) == (1.0, 3.0, 2.0)
    assert box.singleStep() == pytest.approx(0.1)
    assert "1-3, default 2; it is an input to the network: no extra time" in box.toolTip()
    box.setValue(2.7)
    assert widget.guidance() == pytest.approx(2.7)

    _click_and_wait(qtbot, widget)  # with the Pix2Pix comparison (no guidance control)
    assert widget.last_error is None, widget.last_error
    out = viewer.layers["qOBM phase · DAPI (guided)"]
    assert out.metadata[PLUGIN_KEY]["provenance"]["guidance"] == pytest.approx(2.7)
    p2p = [ly for ly in viewer.layers if "Pix2Pix" in ly.name]
    assert p2p and p2p[0].metadata[PLUGIN_KEY]["provenance"]["guidance"] is None
    kw = {"steps": 1, "tile": 128, "overlap": 16, "device": "auto", "seed": 0, "pixel_size": "auto"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = engine.stain(img, guided, guidance=2.7, **kw)
        other = engine.stain(img, guided, guidance=1.0, **kw)
    np.testing.assert_allclose(out.data, want, atol=1e-5)
    assert np.abs(want - other).max() > 1e-3
    keys = [k for k in widget._cache if len(k) == 5 and k[0] == guided]
    assert [k[4] for k in keys] == [pytest.approx(2.7)]  # part of the cache key

    widget.pix2pix_check.setChecked(False)
    _live_one_frame(qtbot, widget)  # live staining uses the same box
    shown = viewer.layers["qOBM phase · DAPI live (guided)"]
    assert shown.metadata[PLUGIN_KEY]["provenance"]["guidance"] == pytest.approx(2.7)
    np.testing.assert_array_equal(q.data, img)  # the input is never touched

    widget.add_model("plain", plain)  # a model without a guidance control
    assert not box.isEnabled() and box.value() == 1.0 and widget.guidance() is None
