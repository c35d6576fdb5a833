"""Fast tests of the docks' helpers: layer rules, output naming/replacement, worker jobs, loss plot.

No viewer window: `ViewerModel` has the same layer list and dims, and the jobs are plain generators.
"""

from __future__ import annotations

import threading
import types

import numpy as np
import pytest
from napari.components import ViewerModel

from napari_lcm_stain._widgets import _jobs
from napari_lcm_stain._widgets._layers import (
    DAPI_COLORMAP,
    PLUGIN_KEY,
    ROLE_PIX2PIX,
    ROLE_STAIN,
    ROLE_UNCERTAINTY,
    current_plane,
    default_dapi,
    default_qobm,
    default_truth,
    find_output,
    layer_pixel_size,
    output_name,
    unsuitable_reason,
    upsert_output,
)


def _run(gen):
    """Drive a job generator to the end; return (yielded items, return value)."""
    items = []
    while True:
        try:
            items.append(next(gen))
        except StopIteration as stop:
            return items, stop.value


# ----------------------------------------------------------------------------- layer rules


def test_unsuitable_layers_have_reasons():
    v = ViewerModel()
    rgb = v.add_image(np.zeros((8, 8, 3), np.uint8), rgb=True, name="rgb")
    lab = v.add_labels(np.zeros((8, 8), np.int32), name="lab")
    pts = v.add_points(np.zeros((1, 2)), name="pts")
    img = v.add_image(np.zeros((8, 8)), name="img")
    out = v.add_image(np.zeros((8, 8)), name="out", metadata={PLUGIN_KEY: {"role": "stain"}})
    assert "Split RGB" in unsuitable_reason(rgb)
    assert unsuitable_reason(lab) == "Labels layer, not an image"
    assert unsuitable_reason(pts) == "Points layer, not an image"
    assert unsuitable_reason(img) is None
    assert unsuitable_reason(out) == "output of this plugin"


def test_default_qobm_prefers_selection_then_names_never_outputs_or_dapi():
    v = ViewerModel()
    dapi = v.add_image(np.zeros((8, 8), np.uint16), name="DAPI")
    raw = v.add_image(np.zeros((8, 8), np.uint16), name="raw")
    phase = v.add_image(np.zeros((8, 8), np.float32), name="slide 3 qOBM")
    ours = v.add_image(
        np.zeros((8, 8), np.float32), name="x · DAPI (LCM)", metadata={PLUGIN_KEY: {}}
    )
    assert default_qobm(v.layers, raw) is raw  # the selection, when it fits
    assert default_qobm(v.layers, dapi) is phase  # a DAPI-named selection does not fit
    assert default_qobm(v.layers, ours) is phase  # nor does one of our outputs
    assert default_qobm(v.layers, None) is phase
    assert default_qobm([], None) is None
    assert default_truth(v.layers) is None  # 'DAPI' alone is not called ground truth
    assert default_dapi(v.layers, exclude=phase) is dapi
    truth = v.add_image(np.zeros((8, 8)), name="DAPI (ground truth)")
    assert default_truth(v.layers) is truth
    assert default_dapi(v.layers) is truth


def test_pixel_size_from_metadata_or_length_units_only():
    v = ViewerModel()
    plain = v.add_image(np.zeros((8, 8)), scale=(0.3, 0.3))
    micron = v.add_image(np.zeros((8, 8)), scale=(0.25, 0.25), units=("µm", "µm"))
    nano = v.add_image(np.zeros((8, 8)), scale=(138, 138), units=("nm", "nm"))
    meta = v.add_image(np.zeros((8, 8)), metadata={"pixel_size_um": 0.414})
    assert layer_pixel_size(plain) is None  # 'pixel' units say nothing about µm
    assert layer_pixel_size(micron) == pytest.approx(0.25)
    assert layer_pixel_size(nano) == pytest.approx(0.138)
    assert layer_pixel_size(meta) == pytest.approx(0.414)


def test_current_plane_maps_world_position_to_layer_indices():
    v = ViewerModel()
    stack = v.add_image(np.zeros((5, 8, 8)), scale=(2.0, 1.0, 1.0), translate=(4.0, 0, 0))
    flat = v.add_image(np.zeros((8, 8)))
    v.dims.set_point(0, 8.0)  # world z = 8 -> data index (8 - 4) / 2 = 2
    assert current_plane(v, stack) == (2,)
    assert current_plane(v, flat) == ()
    v.dims.set_point(0, 100.0)
    assert current_plane(v, stack) == (4,)  # clipped into the stack


# ----------------------------------------------------------------------------- outputs


def test_output_names():
    assert output_name("img", ROLE_STAIN, "LCM") == "img · DAPI (LCM)"
    assert output_name("img", ROLE_PIX2PIX, "Pix2Pix") == "img · DAPI (Pix2Pix)"
    assert output_name("img", ROLE_UNCERTAINTY, "LCM") == "img · uncertainty"
    assert output_name("img", ROLE_UNCERTAINTY, "Teacher") == "img · uncertainty (Teacher)"


def test_upsert_adds_then_replaces_in_place_and_recreates_on_ndim_change():
    v = ViewerModel()
    src = v.add_image(np.zeros((3, 16, 16)), name="img", scale=(1, 0.5, 0.5), translate=(0, 2, 3))
    kw = dict(source="img", label="LCM", scale=src.scale, translate=src.translate, units=None)
    a = upsert_output(v, np.full((3, 16, 16), 0.5, np.float32), role=ROLE_STAIN, **kw)
    assert a.name == "img · DAPI (LCM)" and a.colormap.name == DAPI_COLORMAP.name
    assert tuple(a.contrast_limits) == (0.0, 0.8)
    np.testing.assert_allclose(a.scale, (1, 0.5, 0.5))
    np.testing.assert_allclose(a.translate, (0, 2, 3))
    a.name = "renamed"
    a.visible = False
    b = upsert_output(v, np.full((3, 16, 16), 0.25, np.float32), role=ROLE_STAIN, **kw)
    assert b is a and not b.visible and float(b.data.mean()) == 0.25  # user tweaks kept
    assert len(v.layers) == 2
    # one plane: a 2-D layer with the YX part of the geometry, at the same list position
    v.add_image(np.zeros((4, 4)), name="top")
    c = upsert_output(v, np.ones((16, 16), np.float32), role=ROLE_STAIN, plane=(1,), **kw)
    assert c is not a and c.ndim == 2 and v.layers.index(c) == 1
    np.testing.assert_allclose(c.scale, (0.5, 0.5))
    assert c.metadata[PLUGIN_KEY]["plane"] == [1]
    assert find_output(v.layers, "img", ROLE_STAIN, "LCM") is c
    assert find_output(v.layers, "img", ROLE_PIX2PIX, "Pix2Pix") is None
    np.testing.assert_array_equal(src.data, 0)


def test_uncertainty_layer_contrast_follows_its_values():
    v = ViewerModel()
    std = np.linspace(0, 0.2, 256, dtype=np.float32).reshape(16, 16)
    u = upsert_output(
        v,
        std,
        source="img",
        role=ROLE_UNCERTAINTY,
        label="LCM",
        scale=(1, 1),
        translate=(0, 0),
        units=None,
    )
    assert u.colormap.name == "magma"
    assert 0.19 < u.contrast_limits[1] <= 0.2


# ----------------------------------------------------------------------------- jobs


class _Result:
    def __init__(self, mean, std=None, notes=()):
        self.mean, self.std, self.info = mean, std, {"warnings": list(notes)}


def _fake_engine(monkeypatch, behaviour):
    """Replace engine.iter_stain (imported lazily by the job) with ``behaviour``."""
    import napari_lcm_stain.engine as engine

    monkeypatch.setattr(engine, "iter_stain", behaviour)
    monkeypatch.setattr(
        _jobs,
        "get_predictor",
        lambda cache, model, steps, device, texture=False, guidance=None: types.SimpleNamespace(
            name=str(model), device="cpu", pixel_size=0.5
        ),
    )


def test_stain_job_relays_progress_and_collects_outputs(monkeypatch):
    calls = []

    def iter_stain(image, model, steps, samples, **kw):
        calls.append((model.name, steps, samples, kw["tile"]))
        for i in range(3):
            yield i + 1, 3
        std = np.full(image.shape, 0.1, np.float32) if samples > 1 else None
        return _Result(np.full(image.shape, 0.5, np.float32), std, ["note A"])

    _fake_engine(monkeypatch, iter_stain)
    jobs = [
        _jobs.StainJob(ROLE_STAIN, "LCM", "lcm", 2, samples=4),
        _jobs.StainJob(ROLE_PIX2PIX, "Pix2Pix", "pix2pix", None),
    ]
    items, out = _run(
        _jobs.stain_job(
            np.zeros((8, 8)),
            jobs,
            tile=64,
            overlap=8,
            device="cpu",
            seed=0,
            pixel_size=None,
            truth=None,
            truth_labels=None,
            cache={},
        )
    )
    assert calls == [("lcm", 2, 4, 64), ("pix2pix", None, 1, 64)]
    # overall progress: the second stage is first assumed as long as the first, then counted on;
    # the total never shrinks while a model loads
    assert [(t.label, t.done, t.total) for t in items] == [
        ("loading LCM", 0, 0),
        *[("LCM ×4", i, 6) for i in (1, 2, 3)],
        ("loading Pix2Pix", 3, 6),
        *[("Pix2Pix", i, 6) for i in (4, 5, 6)],
    ]
    assert [(r, lab, d.shape) for r, lab, d in out.outputs] == [
        (ROLE_STAIN, "LCM", (8, 8)),
        ("uncertainty", "LCM", (8, 8)),
        (ROLE_PIX2PIX, "Pix2Pix", (8, 8)),
    ]
    assert out.notes == ["note A"] and out.devices == ["cpu"] and out.metrics == {}


def test_stain_job_scores_against_truth(monkeypatch):
    truth = np.zeros((2, 32, 32), np.float32)
    truth[:, 8:16, 8:16] = 1.0
    noisy = truth + np.random.default_rng(0).normal(0, 0.05, truth.shape).astype(np.float32)

    def iter_stain(image, **kw):
        yield 1, 1
        return _Result(np.clip(noisy, 0, 1))

    _fake_engine(monkeypatch, iter_stain)
    labels = (truth > 0).astype(np.int32)
    _, out = _run(
        _jobs.stain_job(
            np.zeros_like(truth),
            [_jobs.StainJob(ROLE_STAIN, "LCM", "lcm", 1)],
            tile=64,
            overlap=0,
            device="cpu",
            seed=0,
            pixel_size=0.5,
            truth=truth,
            truth_labels=labels,
            cache={},
        )
    )
    m = out.metrics["LCM"]
    assert set(m) == set(_jobs.METRIC_KEYS)
    assert m["pearson"] > 0.95
    assert m["recall"] == 1.0 and m["precision"] == 1.0 and m["f1"] == 1.0


@pytest.mark.parametrize(
    "exc, expected",
    [
        (ValueError("image is empty (shape (0, 4)): nothing to stain"), "image is empty"),
        (
            RuntimeError("CUDA out of memory"),
            "RuntimeError: CUDA out of memory — try a smaller tile",
        ),
        (KeyError("boom"), "KeyError: 'boom'"),
    ],
)
def test_stain_job_returns_failures_instead_of_raising(monkeypatch, exc, expected):
    # superqt swallows a RuntimeError raised inside a generator worker: it must come back as a value
    def iter_stain(image, **kw):
        yield 0, 1
        raise exc

    _fake_engine(monkeypatch, iter_stain)
    _, out = _run(
        _jobs.stain_job(
            np.zeros((4, 4)),
            [_jobs.StainJob(ROLE_STAIN, "LCM", "lcm", 1)],
            tile=64,
            overlap=0,
            device="cpu",
            seed=0,
            pixel_size=None,
            truth=None,
            truth_labels=None,
            cache={},
        )
    )
    assert isinstance(out, _jobs.JobFailure)
    assert out.message.startswith(expected)


def test_get_predictor_caches_by_model_steps_device_texture(monkeypatch):
    import napari_lcm_stain.engine as engine

    loads = []
    monkeypatch.setattr(
        engine,
        "get_predictor",
        lambda m, steps, device, texture, guidance: loads.append((m, steps, texture)) or object(),
    )
    cache: dict = {}
    a = _jobs.get_predictor(cache, "x.safetensors", 1, "cpu")
    assert _jobs.get_predictor(cache, "x.safetensors", 1, "cpu") is a
    assert _jobs.get_predictor(cache, "x.safetensors", 1, "cpu", False) is a  # default: smooth
    _jobs.get_predictor(cache, "x.safetensors", 2, "cpu")
    grainy = _jobs.get_predictor(cache, "x.safetensors", 1, "cpu", True)
    assert grainy is not a  # texture is part of the key: another predictor, none changed
    assert _jobs.get_predictor(cache, "x.safetensors", 1, "cpu", True) is grainy
    assert _jobs.get_predictor(cache, "x.safetensors", 1, "cpu", False) is a
    loaded = object()
    assert _jobs.get_predictor(cache, loaded, 1, "cpu") is loaded  # objects pass through
    assert _jobs.get_predictor(cache, loaded, 1, "cpu", False) is loaded  # no texture head
    assert loads == [("x.safetensors", 1, False), ("x.safetensors", 2, False),
                     ("x.safetensors", 1, True)]  # fmt: skip


def test_finetune_job_relays_events_and_returns_result(monkeypatch):
    import napari_lcm_stain.finetune as finetune

    seen = {}

    def iter_finetune(qobm, dapi, stop, **kw):
        seen.update(kw, stop=stop)
        for step in range(1, 4):
            yield types.SimpleNamespace(
                step=step, total=3, train_loss=1.0 / step, val_loss=np.nan if step < 3 else 0.2
            )
        return "RESULT"

    monkeypatch.setattr(finetune, "iter_finetune", iter_finetune, raising=False)
    stop = threading.Event()
    items, out = _run(_jobs.finetune_job(np.zeros((4, 4)), np.zeros((4, 4)), stop=stop, steps=3))
    assert out == "RESULT" and seen["stop"] is stop and seen["steps"] == 3
    assert [(t.step, t.train_loss, t.val_loss) for t in items] == [
        (1, 1.0, None),
        (2, 0.5, None),
        (3, 1 / 3, 0.2),
    ]


def test_finetune_job_relays_validation_metrics_and_reads_a_folder(monkeypatch):
    import napari_lcm_stain.finetune as finetune

    seen = {}
    before, now = {"pearson": 0.1, "f1": np.nan}, {"pearson": 0.3, "f1": 0.2}

    def iter_finetune(qobm, dapi, stop, **kw):
        seen.update(kw, qobm=qobm, dapi=dapi)
        yield types.SimpleNamespace(
            step=1, total=2, train_loss=1.0, val_loss=None, val_metrics=None, best_step=0,
            best_metrics=before, metrics_before=before,
        )  # fmt: skip
        yield types.SimpleNamespace(
            step=2, total=2, train_loss=0.5, val_loss=0.2, val_metrics=now, best_step=2,
            best_metrics=now, metrics_before=before,
        )  # fmt: skip
        return "RESULT"

    read = []
    monkeypatch.setattr(finetune, "iter_finetune", iter_finetune)
    monkeypatch.setattr(
        finetune,
        "read_folder",
        lambda folder: read.append(folder) or (["a", "b"], [np.zeros(2)] * 2, [np.ones(2)] * 2),
    )
    items, out = _run(_jobs.finetune_job(None, None, stop=threading.Event(), data="DIR"))
    assert out == "RESULT" and read == ["DIR"] and seen["names"] == ["a", "b"]
    assert len(seen["qobm"]) == len(seen["dapi"]) == 2
    assert items[0].val_metrics is None and items[0].best_step == 0
    assert items[0].metrics_before == {"pearson": 0.1, "f1": None}  # non-finite -> None
    assert items[1].val_metrics == now == items[1].best_metrics and items[1].best_step == 2

    lists = [np.zeros((4, 4)), np.zeros((4, 6))]
    _run(_jobs.finetune_job(lists, lists, stop=threading.Event(), names=["x", "y"]))
    assert isinstance(seen["qobm"], list) and seen["names"] == ["x", "y"]


# ----------------------------------------------------------------------------- loss plot


def test_loss_plot_keeps_finite_points_and_paints(qtbot):
    from napari_lcm_stain._widgets._qt_helpers import LossPlot

    plot = LossPlot()
    qtbot.addWidget(plot)
    plot.resize(300, 180)
    empty = plot.grab().toImage()
    plot.clear(total_steps=10)
    for step in range(1, 11):
        plot.add(step, 1.0 / step**2, 0.5 / step if step % 5 == 0 else None)
    plot.add(11, float("nan"))
    assert len(plot.train) == 10 and plot.val == [(5, 0.1), (10, 0.05)]
    assert plot._y_range()[2]  # > a decade of range: log scale
    drawn = plot.grab().toImage()
    assert drawn != empty  # the curves changed the picture
    plot.set_best(5)
    assert plot.best_step == 5 and plot.grab().toImage() != drawn  # the best step is marked
    plot.set_best(0)  # the starting model: no mark
    assert plot.best_step is None
    plot.set_best(5)
    plot.clear()
    assert plot.train == [] and plot.val == [] and plot.best_step is None


def test_bad_ground_truth_skips_metrics_but_keeps_outputs(monkeypatch):
    def iter_stain(image, **kw):
        yield 1, 1
        return _Result(np.full(image.shape, 0.5, np.float32))

    _fake_engine(monkeypatch, iter_stain)
    truth = np.full((16, 16), np.nan, np.float32)
    _, out = _run(
        _jobs.stain_job(
            np.zeros((16, 16)),
            [_jobs.StainJob(ROLE_STAIN, "LCM", "lcm", 1)],
            tile=64,
            overlap=0,
            device="cpu",
            seed=0,
            pixel_size=0.5,
            truth=truth,
            truth_labels=None,
            cache={},
        )
    )
    assert isinstance(out, _jobs.StainOutcome) and len(out.outputs) == 1
    assert out.metrics == {}
    assert len(out.notes) == 1 and out.notes[0].startswith("metrics for LCM skipped: ")
    assert "NaN" in out.notes[0]


def test_docks_share_the_base_and_not_each_others_privates():
    import ast
    from pathlib import Path

    from napari_lcm_stain._widgets import _base, finetune_widget, stain_widget

    for dock in (stain_widget.StainWidget, finetune_widget.FinetuneWidget):
        assert issubclass(dock, _base.DockBase)
    tree = ast.parse(Path(finetune_widget.__file__).read_text())
    imported = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert (
        "stain_widget" not in imported and "napari_lcm_stain._widgets.stain_widget" not in imported
    )
    # the side-by-side grid lives in its own module, not in the Stain dock
    assert not hasattr(stain_widget.StainWidget, "_apply_grid")


def test_latest_frame_mailbox_keeps_the_newest_and_counts_the_replaced():
    box = _jobs.LatestFrame()
    assert box.take(timeout=0.01) is None
    for i in range(3):
        box.put(_jobs.LiveFrame((i, 0), np.zeros(1), 0.0))
    assert box.take(timeout=0.01).key == (2, 0)  # the newest; 0 and 1 were skipped
    assert box.skipped == 2 and box.take(timeout=0.01) is None
    box.put(_jobs.LiveFrame((3, 0), np.zeros(1), 0.0))
    assert box.take(timeout=0.01).key == (3, 0) and box.skipped == 2


def test_live_job_stains_each_taken_frame_until_stopped(monkeypatch):
    box, stop = _jobs.LatestFrame(), threading.Event()
    calls = []

    class Engine:
        def __call__(self, image, *args, **kwargs):
            calls.append(np.asarray(image).copy())
            yield 1, 1
            return types.SimpleNamespace(mean=np.asarray(image) * 2, info={"model": "fake"})

    import napari_lcm_stain.engine as engine

    monkeypatch.setattr(engine, "iter_stain", Engine())
    monkeypatch.setattr(_jobs, "get_predictor", lambda *a: "predictor")
    gen = _jobs.live_job(
        box, stop, model=object(), steps=1, tile=64, overlap=8, device="cpu", seed=0,
        pixel_size=None, cache={},
    )  # fmt: skip
    box.put(_jobs.LiveFrame((0, 0), np.ones((4, 4), np.float32), 0.0))
    first = next(gen)
    assert first.frame.key == (0, 0) and first.dapi.dtype == np.float32
    np.testing.assert_array_equal(first.dapi, 2 * np.ones((4, 4)))
    assert first.provenance["frame"] == [0, 0] and first.provenance["model"] == "fake"
    stop.set()
    _items, value = _run(gen)
    assert value is None and len(calls) == 1


def test_live_job_passes_the_texture_setting(monkeypatch):
    box, stop = _jobs.LatestFrame(), threading.Event()
    loads, seen = [], []

    def iter_stain(image, *args, **kwargs):
        seen.append(kwargs.get("texture"))
        yield 1, 1
        return types.SimpleNamespace(mean=np.asarray(image), info={"texture": False})

    import napari_lcm_stain.engine as engine

    monkeypatch.setattr(engine, "iter_stain", iter_stain)
    monkeypatch.setattr(_jobs, "get_predictor", lambda *a: loads.append(a[4:]) or "predictor")
    gen = _jobs.live_job(
        box, stop, model="lcm", steps=1, tile=64, overlap=8, device="cpu", seed=0,
        pixel_size=None, cache={}, texture=False,
    )  # fmt: skip
    box.put(_jobs.LiveFrame((0, 0), np.ones((4, 4), np.float32), 0.0))
    first = next(gen)
    assert loads == [(False, None)] and seen == [False]
    assert first.provenance["texture"] is False
    stop.set()
    _run(gen)
