"""Reliability, round three (issue #25): engine memory, checkpoint files and configs, API inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_lcm_stain import checkpoints as ck
from napari_lcm_stain._drain import drain as _drain

# ------------------------------------------------------------------ item 13: truncated checkpoints


def _safetensors_with_header_length_low_byte(path, low: int) -> bytes:
    """A valid safetensors file whose 8-byte header length starts with byte `low` (0x80 looks
    like a pickle's first byte)."""
    from safetensors.torch import save_file

    for pad in range(0, 600):
        save_file({"w": torch.arange(1.0, 301.0)}, str(path), metadata={"p": "x" * pad})
        data = path.read_bytes()
        if data[0] == low:
            return data
    raise AssertionError("no padding gave the wanted header length")


@pytest.mark.parametrize(
    "where", ["in the header", "in the tensor data", "after 9 bytes", "after 8 bytes"]
)
def test_truncated_checkpoint_is_called_truncated_not_a_pickle(tmp_path, where):
    path = tmp_path / "cut.safetensors"
    data = _safetensors_with_header_length_low_byte(path, 0x80)
    n = int.from_bytes(data[:8], "little")
    cut = {"in the header": 8 + n // 2, "in the tensor data": len(data) - 100}
    cut.update({"after 9 bytes": 9, "after 8 bytes": 8})
    path.write_bytes(data[: cut[where]])
    (tmp_path / "cut.json").write_text(json.dumps({"format_version": ck.FORMAT_VERSION}))
    with pytest.raises(ck.CheckpointError, match=r"is truncated \(\d+ of \d+ bytes\)") as info:
        ck.load_checkpoint(path)
    assert "pickle" not in str(info.value)


def test_a_real_pickle_is_still_called_a_pickle(tmp_path):
    path = tmp_path / "p.safetensors"
    torch.save({"w": torch.zeros(300)}, path)
    with pytest.raises(ck.CheckpointError, match="pickle/zip"):
        ck._check_safetensors_header(path)
    path.write_bytes(b"\x80\x04\x95" + b"\x00" * 40)
    with pytest.raises(ck.CheckpointError, match="pickle/zip"):
        ck._check_safetensors_header(path)


# ------------------------------------------------------------------ item 14: hostile configs


def _lcm_config() -> dict:
    cfg = json.loads((ck.WEIGHTS_DIR / "lcm.json").read_text())
    cfg.pop("weights_sha256", None)
    return cfg


def _set(cfg: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    d = cfg
    for p in parents:
        d = d[int(p)] if isinstance(d, list) else d.setdefault(p, {})
    if isinstance(d, list):
        d[int(last)] = value
    else:
        d[last] = value
    return cfg


def _p2p_config() -> dict:
    cfg = json.loads((ck.WEIGHTS_DIR / "pix2pix.json").read_text())
    cfg.pop("weights_sha256", None)
    return cfg


HOSTILE = [
    # (config field, value, words the message must contain)
    ("architecture.unet.kwargs.channels.0", -8, "architecture.unet.kwargs.channels.0"),
    ("architecture.unet.kwargs.channels.1", 10**7, "architecture.unet.kwargs.channels.1"),
    ("architecture.unet.kwargs.latent_channels", -4, "architecture.unet.kwargs.latent_channels"),
    ("architecture.unet.kwargs.channels", [], "architecture.unet.kwargs.channels"),
    ("architecture.unet.kwargs.emb_dim", 10**9, "architecture.unet.kwargs.emb_dim"),
    ("architecture.unet.kwargs.factor", 3, "architecture.unet.kwargs.factor"),
    ("architecture.vae.kwargs.dec_channels", 0, "architecture.vae.kwargs.dec_channels"),
    ("architecture.vae.kwargs.enc_channels", 10**6, "architecture.vae.kwargs.enc_channels"),
    ("architecture.vae.kwargs.dec_texture", 1, "architecture.vae.kwargs.dec_texture"),
    ("architecture.vae.kwargs.mystery", 1, "architecture.vae.kwargs.mystery"),
    ("scheduler.num_train_timesteps", 10**12, "scheduler.num_train_timesteps"),
    ("scheduler.beta_end", 5.0, "scheduler.beta_end"),
    ("scheduler.beta_start", 0.5, "beta_start"),  # above beta_end
    ("scheduler.original_inference_steps", 10**9, "scheduler.original_inference_steps"),
    ("scheduler.beta_schedule", "cubic", "scheduler.beta_schedule"),
    ("normalization.smooth_sigma_px", 1e6, "normalization.smooth_sigma_px"),
    ("normalization.clip", -1, "normalization.clip"),
    ("normalization.mad_scale", 0, "normalization.mad_scale"),
    ("normalization.qobm_std", -1, "normalization.qobm_std"),
    ("normalization.max_stat_pixels", -1, "normalization.max_stat_pixels"),
    ("latent_scale", 1e300, "latent_scale"),
    ("pixel_size", 1e9, "pixel_size"),
    ("receptive_field", 10**8, "receptive_field"),
    ("multiple", 10**8, "multiple"),
]


@pytest.mark.parametrize(
    "field, value, words", HOSTILE, ids=[h[0] + "=" + str(h[1]) for h in HOSTILE]
)
def test_every_config_number_has_a_range(tmp_path, field, value, words):
    """Out-of-range numbers are named on load (never a traceback, an out-of-memory "use a smaller
    --tile", a hang or a silently wrong stain)."""
    cfg = _set(_lcm_config(), field, value)
    with pytest.raises(ck.CheckpointError, match="is not a valid checkpoint config") as info:
        ck.validate_config(cfg, tmp_path / "m.json")
    msg = str(info.value)
    assert words in msg and "\n" not in msg and "m.json" in msg


@pytest.mark.parametrize(
    "field, value",
    [("ngf", -1), ("ngf", 10**6), ("depth", 0), ("depth", 40), ("max_mult", 10**6)],
)
def test_pix2pix_architecture_numbers_have_a_range(tmp_path, field, value):
    cfg = _set(_p2p_config(), f"architecture.generator.kwargs.{field}", value)
    with pytest.raises(ck.CheckpointError, match=f"architecture.generator.kwargs.{field}"):
        ck.validate_config(cfg, tmp_path / "m.json")


def test_packaged_and_unknown_architectures_still_validate(tmp_path):
    for name in ("lcm", "teacher", "pix2pix"):
        ck.validate_config(json.loads((ck.WEIGHTS_DIR / f"{name}.json").read_text()), tmp_path)
    cfg = _set(_lcm_config(), "architecture.unet.class", "LatentUNetV9")
    cfg["architecture"]["unet"]["kwargs"]["new_knob"] = 3  # a newer class: build() names it
    ck.validate_config(cfg, tmp_path / "m.json")


def test_hostile_channel_counts_are_refused_before_any_allocation(tmp_path):
    """Negative or huge channel counts in a real checkpoint: a CheckpointError from the loader,
    not a torch traceback or an out-of-memory error."""
    from napari_lcm_stain.models import LatentUNet
    from napari_lcm_stain.sampling import load_predictor

    path = ck.save_checkpoint(
        tmp_path / "m.safetensors", {"unet": LatentUNet(4, 4, (8, 16))}, {"kind": "test"}
    )
    for channels in ([-8, 16], [8, 10**7]):
        cfg = _set(_lcm_config(), "architecture.unet.kwargs.channels", channels)
        ck.config_path(path).write_text(json.dumps(cfg))
        with pytest.raises(ck.CheckpointError, match="architecture.unet.kwargs.channels"):
            load_predictor(path, device="cpu")


@pytest.mark.parametrize("depth", [5_000, 200_000])
def test_deeply_nested_config_json_is_a_checkpoint_error(tmp_path, depth):
    from napari_lcm_stain.models import LatentUNet

    path = ck.save_checkpoint(
        tmp_path / "m.safetensors", {"unet": LatentUNet(4, 4, (8, 16))}, {"kind": "test"}
    )
    text = ck.config_path(path).read_text()
    nested = "[" * depth + "]" * depth
    ck.config_path(path).write_text(text.rstrip()[:-1] + f', "provenance": {nested}}}')
    with pytest.raises(ck.CheckpointError, match="nested too deeply"):
        ck.load_checkpoint(path)


# ------------------------------------------------------------------ item 18: Python API inputs


@pytest.fixture(scope="module")
def fake():
    from _fake_predictor import FakePredictor

    return FakePredictor()


SMALL = {"tile": 64, "overlap": 16}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.int16])
def test_torch_tensors_of_any_dtype_stain_like_their_float32_copy(fake, dtype):
    from napari_lcm_stain.engine import stain

    img = np.random.default_rng(0).normal(0.2, 0.3, (40, 48)).astype(np.float32) * 50
    t = torch.from_numpy(img).to(dtype)
    got = stain(t, fake, **SMALL)
    want = stain(t.float().numpy(), fake, **SMALL)
    assert got.shape == img.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert t.dtype == dtype  # the caller's tensor is not converted in place


def test_dask_array_with_unknown_chunk_sizes_is_computed_not_a_nan_error(fake):
    import dask.array as da

    from napari_lcm_stain.engine import stain

    img = np.random.default_rng(1).normal(0.2, 0.3, (40, 48)).astype(np.float32)
    lazy = da.from_array(img, chunks=16)
    unknown = lazy[lazy[:, 0] > -100]  # boolean indexing: rows of unknown count
    assert np.isnan(unknown.shape[0])
    got = stain(unknown, fake, **SMALL)
    np.testing.assert_array_equal(got, stain(img, fake, **SMALL))
    assert np.isnan(unknown.shape[0])  # the caller's array keeps its (unknown) chunks


def test_array_like_with_unknown_sizes_is_explained(fake):
    from napari_lcm_stain.engine import stain

    class Unknown:
        shape = (float("nan"), 40)
        dtype = np.dtype(np.float32)

        def __getitem__(self, key):
            raise AssertionError("read before the shape was checked")

    with pytest.raises(ValueError, match=r"unknown size.*compute"):
        stain(Unknown(), fake, **SMALL)


# ------------------------------------------------------------------ item 9: memory per tile


def _traced_peak(fn) -> int:
    """Peak bytes numpy (and everything else traced) allocated while `fn` ran."""
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("shape, pixel_size", [((2048, 128), 2.0), ((4096, 512), 0.07)])
def test_rescaled_plane_is_streamed_tile_by_tile(shape, pixel_size, monkeypatch):
    """A rescale no longer holds the whole resampled plane, nor the model's output at that size:
    8× up (a 16384 × 1024 working plane, 67 MB as float32) peaks at a fraction of one working
    plane (it held about 3 of them), and 0.28× down at a fraction of the input plane (it held
    2 copies). The echo model computes nothing, so only the engine's own memory is measured;
    the out-of-distribution score, bounded on its own, is left out."""
    from _fake_predictor import EchoPredictor
    from napari_lcm_stain import engine
    from napari_lcm_stain.engine import iter_stain

    monkeypatch.setattr(engine.ood, "check_plane", lambda plane, px: {"score": None})
    echo = EchoPredictor("input")
    img = np.random.default_rng(2).normal(0.2, 0.3, shape).astype(np.float32)
    out = np.empty_like(img)
    res = {}

    def run():
        res["r"] = _drain(
            iter_stain(img, echo, tile=256, overlap=32, pixel_size=pixel_size, out=out)
        )

    peak = _traced_peak(run)
    work = res["r"].info["work_shape"]
    work_bytes = 4 * work[0] * work[1]
    if pixel_size > 1:
        assert work == [16384, 1024]
        assert peak < 0.25 * work_bytes, (peak / 1e6, work_bytes / 1e6)
    else:
        assert work == [1147, 143]
        assert peak < 0.75 * img.nbytes, (peak / 1e6, img.nbytes / 1e6)


def test_out_of_distribution_score_of_a_coarse_input_reads_a_bounded_crop():
    """The score resamples to its reference pixel size after cropping to 1024 px: a 1024² input
    at 3.3 µm/px (8×) was scored on an 8192² plane; now on a crop that becomes ~1024²."""
    from napari_lcm_stain import engine, ood

    img = np.zeros((1024, 1500), np.float32)
    view = engine._ood_view(img, 3.3)
    assert max(view.shape) * 3.3 / ood.DEFAULT_PIXEL_SIZE <= ood.MAX_SIDE + 8
    assert view.base is img or view is img  # a view, not a copy
    assert engine._ood_view(img, 0.414) is img and engine._ood_view(img, 0.2) is img


def test_streamed_rescale_matches_whole_plane_resize():
    """The streamed resampling is skimage's resize (order 1, reflect, anti-aliased when
    shrinking), tile by tile: the echo model's stain (its normalised input, clipped to 0-1 at
    the working size) equals resize(clip(normalize(resize(x, work))), shape)."""
    from _fake_predictor import EchoPredictor
    from napari_lcm_stain.engine import _resize, stain

    echo = EchoPredictor("input")
    rng = np.random.default_rng(3)
    for shape, pixel_size in (((97, 130), 0.55), ((60, 41), 0.09), ((1, 300), 1.9), ((5, 2), 0.3)):
        img = rng.random(shape, dtype=np.float32)
        got = stain(img, echo, tile=64, overlap=16, pixel_size=pixel_size)
        scale = pixel_size / echo.pixel_size
        work = tuple(max(1, round(s * scale)) for s in shape)
        stained = np.clip(echo.normalize(_resize(img, work)), 0, 1)
        want = np.clip(_resize(stained, shape), 0, 1)
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=str((shape, pixel_size)))


def test_samples_draw_one_noise_canvas_at_a_time(fake, monkeypatch):
    """--samples K: the K noise canvases are drawn one by one, never all held (K = 100000 on
    256² reached 3.6 GB); the result is the same as drawing them up front."""
    import weakref

    from napari_lcm_stain import tiling
    from napari_lcm_stain.engine import iter_stain

    img = np.random.default_rng(4).normal(0.2, 0.3, (2, 48, 40)).astype(np.float32)
    before = _drain(iter_stain(img, fake, samples=6, **SMALL))
    alive, most = set(), [0]
    real = tiling.make_noise_canvas

    def counted(*a, **k):
        canvas = real(*a, **k)
        key = id(canvas)
        alive.add(key)
        weakref.finalize(canvas, alive.discard, key)
        most[0] = max(most[0], len(alive))
        return canvas

    monkeypatch.setattr(tiling, "make_noise_canvas", counted)
    after = _drain(iter_stain(img, fake, samples=6, **SMALL))
    assert most[0] <= 2
    np.testing.assert_array_equal(after.mean, before.mean)
    np.testing.assert_array_equal(after.std, before.std)


@pytest.mark.parametrize(
    "shape, out_shape",
    [((97, 130), (213, 286)), ((60, 41), (13, 9)), ((1, 300), (4, 1371)), ((5, 2), (1, 1)),
     ((1, 1), (8, 8)), ((300, 7), (37, 56)), ((33, 33), (32, 34))],
)  # fmt: skip
def test_resampled_plane_and_sink_equal_skimage_resize(shape, out_shape):
    """Both streaming halves are skimage's resize to float32 rounding: the lazy plane for any
    block (tiles, reflected tiles, strided statistics views) and the sink for rows arriving in
    blocks of any height."""
    from napari_lcm_stain import tiling
    from napari_lcm_stain.engine import _resize

    a = np.random.default_rng(5).random(shape, dtype=np.float32)
    want = _resize(a, out_shape)
    lazy = tiling.ResampledPlane(a, out_shape)
    np.testing.assert_allclose(np.asarray(lazy), want, atol=1e-6)
    np.testing.assert_allclose(lazy[..., ::3, 1::2], want[::3, 1::2], atol=1e-6)
    iy, ix = tiling.reflect_indices(out_shape[0], 0, 5), tiling.reflect_indices(out_shape[1], 2, 9)
    np.testing.assert_allclose(lazy[np.ix_(iy, ix)], want[np.ix_(iy, ix)], atol=1e-6)
    got = np.full(out_shape, np.nan, np.float32)
    sink = tiling.ResampleSink(shape, got)
    r = 0
    for step in (3, 1, 7) + (5,) * shape[0]:
        if r < shape[0]:
            sink[r : min(shape[0], r + step), : shape[1]] = a[r : r + step]
            r = min(shape[0], r + step)
    np.testing.assert_allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="in order"):
        sink[0:1, :] = a[:1]


def test_bench_reports_the_peak_of_a_rescaled_big_image(monkeypatch):
    """`bench` runs the big-image memory test twice: as is, and at twice the model's pixel size
    (a (2·big)² working plane), and reports both peaks; the child gets --pixel-size."""
    from _fake_predictor import FakePredictor
    from napari_lcm_stain import bench

    calls = []

    def fake_big(size, device, tile, overlap, model="lcm", pixel_size=None):
        calls.append(pixel_size)
        return {"peak_rss_mb": 100.0 + len(calls), "seconds": 1.0, "mp_per_s": 1.0, "command": ""}

    monkeypatch.setattr(bench, "big_stain_rss", fake_big)
    res = bench.run_bench(size=64, repeats=1, big=128, predictors={"m": FakePredictor()},
                          tile=32, overlap=8, quiet=True, matmul_n=64)  # fmt: skip
    px = bench._packaged_pixel_size("lcm")
    assert calls == [None, pytest.approx(2 * px)]
    assert res["peak_rss_mb"] == 101.0 and res["rescaled"]["peak_rss_mb"] == 102.0
    assert res["rescaled"]["rescale"] == 2.0 and res["rescaled"]["size"] == 128

    monkeypatch.undo()  # the real big_stain_rss, with a fake child

    class Done:
        returncode, stderr = 0, ""

    seen = []
    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **k: seen.append(cmd) or Done)
    bench.big_stain_rss(16, "cpu", 32, 8, pixel_size=0.828)
    assert seen[0][-2:] == ["--pixel-size", "0.828"]


def test_rescaled_stain_streams_into_a_zarr_output(fake):
    """The rescaled stain is written band by band into a lazy output too (a zarr plane view has
    no shape of its own), and equals staining into memory."""
    import zarr

    from napari_lcm_stain.engine import iter_stain

    img = np.random.default_rng(6).normal(0.2, 0.3, (2, 50, 70)).astype(np.float32)
    want = _drain(iter_stain(img, fake, pixel_size=0.6, **SMALL)).mean
    out = zarr.zeros(img.shape, chunks=(1, 16, 16), dtype="f4")
    _drain(iter_stain(img, fake, pixel_size=0.6, out=out, **SMALL))
    np.testing.assert_array_equal(out[:], want)


def test_rescaled_stain_on_a_dask_scheduler_equals_the_local_one(fake):
    """The dask path reads the same lazily resampled plane (whole, as its graph needs it) and
    writes back through the same sink: the result equals the streamed local one."""
    from napari_lcm_stain.engine import stain

    img = np.random.default_rng(7).normal(0.2, 0.3, (60, 90)).astype(np.float32)
    for pixel_size in (0.6, 0.11):
        local = stain(img, fake, pixel_size=pixel_size, **SMALL)
        graph = stain(img, fake, pixel_size=pixel_size, scheduler="threads", **SMALL)
        np.testing.assert_allclose(graph, local, atol=1e-6)
