"""Reliability, round three (issue #25): engine memory, checkpoint files and configs, API inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_lcm_stain import checkpoints as ck

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


@pytest.mark.parametrize("where", ["in the header", "in the tensor data", "after 9 bytes"])
def test_truncated_checkpoint_is_called_truncated_not_a_pickle(tmp_path, where):
    path = tmp_path / "cut.safetensors"
    data = _safetensors_with_header_length_low_byte(path, 0x80)
    n = int.from_bytes(data[:8], "little")
    cut = {"in the header": 8 + n // 2, "in the tensor data": len(data) - 100, "after 9 bytes": 9}
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
