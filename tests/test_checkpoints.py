"""Checkpoints: exact round trip, atomic writes, and a clear error for every bad file."""

import json
import pickle

import pytest
import torch

from napari_lcm_stain import checkpoints as ck
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
