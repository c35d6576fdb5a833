"""Checkpoints: exact round trip, atomic writes, and a clear error for every bad file."""

import json
import pickle
import re
from pathlib import Path

import pytest
import torch

from napari_lcm_stain import checkpoints as ck
from napari_lcm_stain._version import __version__
from napari_lcm_stain.models import LatentUNet
from napari_lcm_stain.sampling import load_predictor


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    net = LatentUNet(4, 4, (8, 16))
    path = ck.save_checkpoint(tmp_path / "m.safetensors", {"unet": net}, {"kind": "test", "x": 1})
    return path, net


def test_round_trip_is_exact(saved):
    path, net = saved
    loaded = ck.load_checkpoint(path)
    assert loaded.config["kind"] == "test" and loaded.config["format_version"] == ck.FORMAT_VERSION
    other = LatentUNet(4, 4, (8, 16))
    ck.load_into(other, loaded.sub("unet"), "U-Net")
    for k, v in net.state_dict().items():
        assert torch.equal(v, other.state_dict()[k]), k
    assert not list(path.parent.glob("*.tmp"))


def test_missing_file(tmp_path):
    with pytest.raises(ck.CheckpointError, match="not found"):
        ck.load_checkpoint(tmp_path / "nope.safetensors")


def test_truncated_file(saved):
    path, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match="truncated|corrupt|not a valid"):
        ck.load_checkpoint(path)


def test_garbage_file(saved):
    path, _ = saved
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ck.CheckpointError):
        ck.load_checkpoint(path)


def test_pickle_renamed_is_refused_and_never_unpickled(tmp_path, monkeypatch):
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"a": 1}))
    (tmp_path / "evil.json").write_text(json.dumps({"format_version": ck.FORMAT_VERSION}))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled!"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled!"))
    with pytest.raises(ck.CheckpointError, match="pickle"):
        ck.load_checkpoint(path)
    tpath = tmp_path / "torch.safetensors"
    torch.save({"w": torch.zeros(2)}, tpath)
    (tmp_path / "torch.json").write_text(json.dumps({"format_version": ck.FORMAT_VERSION}))
    with pytest.raises(ck.CheckpointError, match="pickle"):
        ck.load_checkpoint(tpath)


@pytest.mark.parametrize("low_bytes", [b"\x80", b"PK"])
def test_header_length_that_looks_like_pickle_or_zip_magic_still_loads(tmp_path, low_bytes):
    """A safetensors header's length is its first 8 bytes; a length of 0x..80 or 0x..4B50
    starts like a pickle or a zip. It happened to a real texture-decoder checkpoint (header
    12,928 = 0x3280 bytes): a valid file is recognised before any magic is looked at."""
    from safetensors.torch import save_file

    target = int.from_bytes(low_bytes, "little")  # 128 or 19,280 (both multiples of 8)
    path = tmp_path / "odd.safetensors"

    def header_length(pad: int) -> int:
        save_file({"w": torch.arange(3.0)}, str(path), metadata={"p": "x" * pad})
        return int.from_bytes(path.read_bytes()[:8], "little")

    base = header_length(0)
    for pad in range(max(0, target - base - 8), target - base + 9):  # headers pad to 8 bytes
        if header_length(pad) == target:
            break
    assert path.read_bytes()[: len(low_bytes)] == low_bytes
    ck._check_safetensors_header(path)  # no error: it is a valid file


def test_incompatible_config_version(saved):
    path, _ = saved
    cfg = json.loads(ck.config_path(path).read_text())
    cfg["format_version"] = 99
    ck.config_path(path).write_text(json.dumps(cfg))
    with pytest.raises(ck.CheckpointError, match="format 99"):
        ck.load_checkpoint(path)


def test_missing_or_broken_config(saved):
    path, _ = saved
    ck.config_path(path).write_text("{broken")
    with pytest.raises(ck.CheckpointError, match="not valid JSON"):
        ck.load_checkpoint(path)
    ck.config_path(path).unlink()
    with pytest.raises(ck.CheckpointError, match="missing"):
        ck.load_checkpoint(path)


def test_wrong_shapes_named(saved):
    path, _ = saved
    loaded = ck.load_checkpoint(path)
    with pytest.raises(ck.CheckpointError, match="wrong shape|missing|unexpected"):
        ck.load_into(LatentUNet(4, 4, (8, 32)), loaded.sub("unet"), "U-Net")


def test_not_a_stain_model(saved):
    path, _ = saved
    with pytest.raises(ck.CheckpointError, match="not a stain model"):
        load_predictor(path)


def test_bad_model_names():
    with pytest.raises(ValueError, match="unknown model"):
        load_predictor("resnet50")
    with pytest.raises(TypeError):
        load_predictor(3.5)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    target.write_bytes(b"good")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck.os, "replace", boom)
    with pytest.raises(OSError):
        ck.atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"good"
    assert not list(tmp_path.glob("*.tmp"))


def test_packaged_weights_hash_mismatch_detected(tmp_path, monkeypatch, saved):
    path, _ = saved
    monkeypatch.setattr(ck, "WEIGHTS_DIR", path.parent)
    (path.parent / "lcm.safetensors").write_bytes(path.read_bytes())
    (path.parent / "lcm.json").write_text(ck.config_path(path).read_text())
    ck.record_packaged_hashes()
    assert ck.load_packaged("lcm").config["kind"] == "test"
    blob = bytearray((path.parent / "lcm.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (path.parent / "lcm.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ck.CheckpointError, match="hash"):
        ck.load_packaged("lcm")


# ------------------------------------------------------------------ structurally wrong configs


def _packaged_config() -> dict:
    """The packaged LCM's config without its weights hash (it is written beside other tensors)."""
    cfg = json.loads((ck.WEIGHTS_DIR / "lcm.json").read_text())
    cfg.pop("weights_sha256", None)
    return cfg


def _write_config(path, config) -> None:
    """Replace the config beside `path` (no weights hash, like a pre-hash checkpoint)."""
    ck.config_path(path).write_text(json.dumps(config))


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    import socket

    def refuse(*a, **k):
        pytest.fail("tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def _without(key):
    cfg = _packaged_config()
    del cfg[key]
    return cfg


def _with(**kw):
    cfg = _packaged_config()
    for k, v in kw.items():
        if k == "num_train_timesteps":
            cfg["scheduler"][k] = v
        else:
            cfg[k] = v
    return cfg


BAD_CONFIGS = [
    ("list", [], r"must be a JSON object \{\.\.\.\}, got an array"),
    ("null", None, r"must be a JSON object \{\.\.\.\}, got null"),
    ("string", "lcm", r"must be a JSON object \{\.\.\.\}, got a string"),
    ("no architecture", _without("architecture"), r"architecture: Field required"),
    ("no latent_scale", _without("latent_scale"), r"latent_scale: Field required"),
    ("null normalization", _with(normalization=None), r"normalization: Input should be a JSON object \{\.\.\.\}, got None"),
    ("string normalization", _with(normalization="fixed"), r"normalization: Input should be a JSON object \{\.\.\.\}, got 'fixed'"),
    ("negative timesteps", _with(num_train_timesteps=-5), r"scheduler.num_train_timesteps: Input should be greater than 0, got -5;"),
    ("string scheduler", _with(scheduler="abc"), r"scheduler: Input should be a JSON object \{\.\.\.\}, got 'abc'"),
    ("zero latent_scale", _with(latent_scale=0), r"latent_scale: Input should be greater than 0"),
    ("NaN latent_scale", _with(latent_scale=float("nan")), r"latent_scale: Input should be a finite number"),
    ("string latent_scale", _with(latent_scale="2"), r"latent_scale: Input should be a valid number"),
    ("no unet", _with(architecture={"vae": {"class": "VAE"}}), r"architecture.unet: Field required"),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_structurally_wrong_config_is_a_checkpoint_error(saved, no_network, case):
    path, _ = saved
    _name, config, match = case
    if isinstance(config, dict):
        config["format_version"] = ck.FORMAT_VERSION
    _write_config(path, config)
    with pytest.raises(ck.CheckpointError, match=match) as info:
        load_predictor(path, device="cpu")
    assert "\n" not in str(info.value) and "m.json" in str(info.value)


def test_new_normalization_types_and_extra_fields_are_accepted(saved):
    path, _ = saved
    cfg = {**_packaged_config(), "future_key": [1, 2]}
    cfg["normalization"] = {"type": "robust", "percentiles": [1, 99], "anything": None}
    _write_config(path, cfg)
    assert ck.load_checkpoint(path).config["normalization"]["type"] == "robust"
    del cfg["normalization"]["type"], cfg["scheduler"]  # absent keys take their defaults
    _write_config(path, cfg)
    assert ck.load_checkpoint(path).config["kind"] == "lcm"


@pytest.mark.parametrize("build", ["lcm_scheduler", "ddim_scheduler", "train_scheduler"])
def test_schedulers_are_built_from_dicts_only_never_the_network(no_network, build):
    from napari_lcm_stain import sampling

    make = getattr(sampling, build)
    with pytest.raises(ck.CheckpointError, match="scheduler config must be a JSON object.*'abc'"):
        make("abc")
    assert make().config.num_train_timesteps == 1000
    assert (
        make({**sampling.SCHEDULER_CONFIG, "num_train_timesteps": 500}).config[
            "num_train_timesteps"
        ]
        == 500
    )


def test_hub_is_offline_only_during_scheduler_construction(monkeypatch):
    import os

    from huggingface_hub import constants

    from napari_lcm_stain import sampling

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    seen = []
    real = sampling.LCMScheduler.from_config.__func__

    def spy(cls, config, **kw):
        seen.append((os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE))
        return real(cls, config, **kw)

    monkeypatch.setattr(sampling.LCMScheduler, "from_config", classmethod(spy))
    flag = constants.HF_HUB_OFFLINE
    sampling.lcm_scheduler()
    assert seen == [("1", True)]
    assert "HF_HUB_OFFLINE" not in os.environ and constants.HF_HUB_OFFLINE == flag


# ------------------------------------------------------------------ corrupt weights


def _damaged(path, net, how):
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    k0 = next(iter(sd))
    if how == "nan":
        sd[k0].view(-1)[0] = float("nan")
    elif how == "inf":
        sd[k0].view(-1)[-1] = float("inf")
    elif how == "bool":
        sd[k0] = sd[k0] > 0
    elif how == "int8":
        sd = {k: v.to(torch.int8) for k, v in sd.items()}
    elif how == "zero":
        sd = {k: torch.zeros_like(v) for k, v in sd.items()}
    # saved properly (its hash recorded), so only the tensor checks can refuse it
    return ck.save_checkpoint(path, {"unet": sd}, {"kind": "test"})


@pytest.mark.parametrize(
    "how, match",
    [
        ("nan", r"tensor .* has NaN or Inf values: the weights are damaged"),
        ("inf", r"tensor .* has NaN or Inf values"),
        ("bool", r"tensor .* has dtype torch.bool, not floating point"),
        ("int8", r"tensor .* has dtype torch.int8, not floating point"),
        ("zero", r"every 'unet' weight is zero: the weights are damaged or were never trained"),
    ],
)
def test_damaged_weights_are_refused_on_load(saved, how, match):
    path, net = saved
    _damaged(path, net, how)
    with pytest.raises(ck.CheckpointError, match=match):
        ck.load_checkpoint(path)


def test_batchnorm_step_counters_and_zero_initialised_layers_still_load(tmp_path):
    from napari_lcm_stain.models import Pix2PixGenerator

    torch.manual_seed(0)
    gen = Pix2PixGenerator()
    assert any(not v.is_floating_point() for v in gen.state_dict().values())
    path = ck.save_checkpoint(tmp_path / "g.safetensors", {"generator": gen}, {"kind": "x"})
    assert set(ck.load_checkpoint(path).sub("generator")) == set(gen.state_dict())


def test_saved_checkpoint_records_and_verifies_its_weights_hash(saved):
    path, _ = saved
    cfg = json.loads(ck.config_path(path).read_text())
    assert cfg[ck.WEIGHTS_HASH_KEY] == ck.sha256(path)
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0x01  # one flipped bit in a weight: still finite, still loads as safetensors
    path.write_bytes(bytes(blob))
    with pytest.raises(ck.CheckpointError, match=r"does not match the hash recorded in m\.json"):
        ck.load_checkpoint(path)
    del cfg[ck.WEIGHTS_HASH_KEY]  # a checkpoint from before hashes were recorded still loads
    ck.config_path(path).write_text(json.dumps(cfg))
    assert ck.load_checkpoint(path).config["kind"] == "test"


def test_packaged_configs_are_hash_verified(tmp_path, monkeypatch, saved):
    path, _ = saved
    monkeypatch.setattr(ck, "WEIGHTS_DIR", path.parent)
    (path.parent / "lcm.safetensors").write_bytes(path.read_bytes())
    (path.parent / "lcm.json").write_text(ck.config_path(path).read_text())
    assert set(ck.record_packaged_hashes()) == {
        "lcm.safetensors", "lcm.json", "m.safetensors", "m.json"
    }  # fmt: skip
    assert ck.load_packaged("lcm").config["kind"] == "test"
    cfg = json.loads((path.parent / "lcm.json").read_text())
    cfg["x"] = 2  # an edit that is still a valid config
    (path.parent / "lcm.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ck.CheckpointError, match=r"lcm\.json does not match the hash recorded in the package"
    ):
        ck.load_packaged("lcm")


def test_shipped_hash_file_covers_every_packaged_file():
    hashes = ck.packaged_hashes()
    if not hashes:
        pytest.skip("no packaged weights")
    for name in ck.PACKAGED:
        for f in (ck.packaged_path(name), ck.config_path(ck.packaged_path(name))):
            assert hashes[f.name] == ck.sha256(f), f.name


def _version_key(v):
    return tuple(int(p) for p in v.split("."))


def test_packaged_configs_record_the_release_version():
    """Every packaged config names the package version it was trained under (`version`, written
    by the recipe) and the one that saved it (`package_version`, written by `save_checkpoint`);
    CHANGELOG.md has an entry for the LCM's and for the package's version, which is not older."""
    if not ck.packaged_hashes():
        pytest.skip("no packaged weights")
    changelog = (Path(__file__).parents[1] / "CHANGELOG.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^## (\d+\.\d+\.\d+)\b", changelog, flags=re.M))
    assert __version__ in listed, f"CHANGELOG.md has no '## {__version__}' entry"
    for name in ck.PACKAGED:
        cfg = json.loads(ck.config_path(ck.packaged_path(name)).read_text())
        for key in ("version", "package_version"):
            assert re.fullmatch(r"\d+\.\d+\.\d+", str(cfg.get(key))), (name, key, cfg.get(key))
    lcm = json.loads(ck.config_path(ck.packaged_path("lcm")).read_text())["version"]
    assert lcm in listed, f"the packaged LCM records version {lcm}: add it to CHANGELOG.md"
    assert _version_key(lcm) <= _version_key(__version__), (lcm, __version__)
