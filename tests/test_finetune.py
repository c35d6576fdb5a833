"""Issue 12 item 4: fine-tuning on many pairs, the `finetune` command's checks, and safe saving.

Training runs use a tiny untrained LCM checkpoint (a few steps on 64-96 px images), so the file
tests the plumbing, not whether fine-tuning helps (`scripts/finetune_multi.py` measures that).
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import tifffile
import torch

from _fake_predictor import blobs
from napari_lcm_stain import checkpoints, cli, finetune
from napari_lcm_stain._drain import drain
from napari_lcm_stain.models import VAE
from napari_lcm_stain.training.data import PairedData
from test_reliability_cli import tiny_lcm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_finetunable(tmp_path_factory.mktemp("ckpt"))


def tiny_finetunable(folder) -> str:
    """An untrained tiny LCM with a VAE encoder in `folder`: enough to fine-tune."""
    path = tiny_lcm(folder / "tiny.safetensors")
    ck = checkpoints.load_checkpoint(path)
    torch.manual_seed(1)
    modules = {
        "unet": ck.sub("unet"),
        "decoder": ck.sub("decoder"),
        "encoder": VAE(4, 8, 8).encoder,
    }
    return str(checkpoints.save_checkpoint(path, modules, ck.config))


def pair(shape, seed):
    """A registered pair: phase blobs and a DAPI-like image of the same blobs."""
    q = blobs(shape, seed=seed)
    return q, np.clip(q, 0, None) * 100 + 10


def write_pairs(folder, shapes):
    folder.mkdir(exist_ok=True)
    for i, shape in enumerate(shapes):
        q, d = pair(shape, i)
        tifffile.imwrite(folder / f"f{i}_qobm.tif", q)
        tifffile.imwrite(folder / f"f{i}_dapi.tif", d)
    return folder


def digest(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def refuse_training(monkeypatch):
    """Make any start of training (or of reading the images) fail the test."""

    def boom(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(finetune, "run_finetune", boom)
    monkeypatch.setattr(finetune, "_read_plane_stack", boom)


# ------------------------------------------------------------------------- several pairs


@pytest.mark.parametrize(
    "n, held",
    [(1, []), (2, [1]), (3, [2]), (4, [3]), (5, [4]), (8, [3, 7]), (16, [3, 7, 11, 15])],
)
def test_held_out_pairs_are_every_fourth_at_least_one(n, held):
    assert finetune.held_out_pairs(n) == held


def test_sampler_draws_like_paired_data_for_equal_sizes():
    """One size: the same random stream and crops as PairedData (the single-pair path's data)."""
    rng = np.random.default_rng(0)
    q = rng.random((3, 64, 48), dtype=np.float32)
    d = rng.random((3, 64, 48), dtype=np.float32)
    z = rng.random((3, 2, 16, 12), dtype=np.float32)
    ref = PairedData(q, d, 0.4, {}, latents=z).batch(np.random.default_rng(5), 6, 32, 4)
    got = finetune._Planes(list(q), list(d), list(z)).batch(np.random.default_rng(5), 6, 32, 4)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)


def test_sampler_crops_every_plane_of_different_sizes():
    f = 4
    small = [np.full((64, 64), 1, np.float32), np.full((96, 160), 2, np.float32)]
    lat = [np.full((2, s.shape[0] // f, s.shape[1] // f), s[0, 0], np.float32) for s in small]
    q, d, z = finetune._Planes(small, small, lat).batch(np.random.default_rng(0), 40, 128, f)
    assert q.shape == (40, 1, 64, 64) and z.shape == (40, 2, 16, 16)  # the smallest plane fits
    assert set(q[:, 0, 0, 0].tolist()) == {1.0, 2.0}
    assert torch.equal(q[:, 0, ::f, ::f], z[:, 0]) and torch.equal(q, d)


def test_several_pairs_of_different_sizes_validate_on_a_held_out_pair(tiny, tmp_path):
    pairs = [pair((64, 64), 0), pair((96, 80), 1), pair((64, 96), 2)]
    res = finetune.run_finetune(
        [p[0] for p in pairs], [p[1] for p in pairs], model=tiny, steps=2, patch=32, device="cpu"
    )
    ft = res.config["finetune"]
    assert ft["pairs"] == 3 and ft["validation"] == "held-out pairs: pair 3"
    assert len(ft["dapi_normalization"]) == 3 and ft["steps_run"] == 2
    assert [h[0] for h in res.history] == [1, 2] and res.history[-1][2] is not None
    path = res.save(tmp_path / "multi.safetensors")
    assert checkpoints.load_checkpoint(path).config["finetune"]["pairs"] == 3


def test_events_carry_validation_metrics_and_the_best_so_far(tiny):
    pairs = [pair((64, 64), 0), pair((64, 80), 1)]
    gen = finetune.iter_finetune(
        [p[0] for p in pairs], [p[1] for p in pairs], model=tiny, steps=4, patch=32,
        device="cpu", val_every=2,
    )  # fmt: skip
    events = []
    res = drain(gen, events.append)
    assert [ev.val_metrics is not None for ev in events] == [False, True, False, True]
    assert set(events[1].val_metrics) >= {"pearson", "ssim", "f1"}
    assert all(ev.metrics_before == res.metrics_before for ev in events)
    assert events[-1].best_step == res.best_step
    assert events[-1].best_metrics == pytest.approx(res.metrics_after, nan_ok=True)
    kept = {0: res.metrics_before, **{ev.step: ev.val_metrics for ev in events if ev.val_metrics}}
    assert all(ev.best_metrics == kept[ev.best_step] for ev in events)


def test_read_folder_reads_the_pairs_find_pairs_finds(tmp_path):
    folder = write_pairs(tmp_path / "pairs", [(64, 64), (64, 80)])
    names, qs, ds = finetune.read_folder(folder)
    assert names == ["f0", "f1"] and [q.shape for q in qs] == [d.shape for d in ds]
    np.testing.assert_allclose(ds[1], pair((64, 80), 1)[1])


def test_a_list_of_one_pair_is_the_single_pair_path(tiny):
    q, d = pair((96, 96), 0)
    kw = {"model": tiny, "steps": 2, "patch": 32, "device": "cpu", "val_every": 1}
    one = finetune.run_finetune(q, d, **kw)
    listed = finetune.run_finetune([q], [d], **kw)
    assert one.history == listed.history and one.metrics_after == listed.metrics_after
    assert all(torch.equal(one.tensors[k], listed.tensors[k]) for k in one.tensors)
    assert one.config["finetune"]["validation"] == "bottom 20% of each plane"


def test_pair_errors_name_the_pair(tiny):
    q, d = pair((64, 64), 0)
    with pytest.raises(ValueError, match=r"DAPI \(64, 80\) of pair 2 must have the same shape"):
        next(finetune.iter_finetune([q, q], [d, np.zeros((64, 80))], model=tiny))
    with pytest.raises(ValueError, match="2 qOBM images but 1 DAPI images"):
        next(finetune.iter_finetune([q, q], [d], model=tiny))
    with pytest.raises(TypeError, match="two lists of images paired in order"):
        next(finetune.iter_finetune([q, q], d, model=tiny))
    with pytest.raises(ValueError, match="DAPI image of pair 1 of shape .* looks like RGB"):
        next(finetune.iter_finetune([q], [np.stack([d] * 3, -1)], model=tiny))


@pytest.mark.parametrize("dapi", [np.zeros((64, 64)), np.full((64, 64), 7.0)])
def test_empty_or_constant_dapi_is_refused(tiny, dapi):
    q, d = pair((64, 64), 0)
    with pytest.raises(ValueError, match="DAPI image has no contrast .*both (0|7)"):
        next(finetune.iter_finetune(q, dapi, model=tiny))
    with pytest.raises(ValueError, match="DAPI image of pair 2 has no contrast"):
        next(finetune.iter_finetune([q, q], [d, dapi], model=tiny))


def test_max_minutes_stops_and_keeps_the_base(tiny, tmp_path):
    data = write_pairs(tmp_path / "d", [(64, 64), (64, 64)])
    out = tmp_path / "t.safetensors"
    finetune.finetune_files(data=data, out=out, model=tiny, steps=50, patch=32, max_minutes=1e-6)
    ft = checkpoints.load_checkpoint(out).config["finetune"]
    assert ft["stopped"] is True and ft["steps_run"] == 0 and ft["best_step"] == 0


# ------------------------------------------------------------------------- pair discovery


def test_find_pairs_reads_the_simulate_folder(tmp_path):
    from napari_lcm_stain.simulate import write_dataset

    write_dataset(tmp_path, preset="shifted-20x", n=2, size=32, seed=0)
    found = finetune.find_pairs(tmp_path)  # nuclei/distractors/meta files are not pairs
    assert [(n, q.name, d.name) for n, q, d in found] == [
        ("000", "000_qobm.ome.tif", "000_dapi.ome.tif"),
        ("001", "001_qobm.ome.tif", "001_dapi.ome.tif"),
    ]


def test_find_pairs_errors(tmp_path):
    (tmp_path / "a_qobm.tif").touch()
    (tmp_path / "a_dapi.zarr").mkdir()
    (tmp_path / "b_dapi.ome.tif").touch()
    with pytest.raises(ValueError, match=r"b_dapi.ome.tif has no qobm partner: expected b_qobm"):
        finetune.find_pairs(tmp_path)
    (tmp_path / "b_qobm.tiff").touch()
    assert [n for n, _, _ in finetune.find_pairs(tmp_path)] == ["a", "b"]
    (tmp_path / "b_qobm.ome.tif").touch()
    with pytest.raises(ValueError, match="two qobm images for pair 'b'"):
        finetune.find_pairs(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no qOBM/DAPI pairs in .*empty: name each pair"):
        finetune.find_pairs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        finetune.find_pairs(tmp_path / "missing")


# ------------------------------------------------------------------------- command line


def test_cli_finetune_data_folder(tiny, tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs", [(64, 64), (80, 96), (64, 64)])
    out = tmp_path / "ft.safetensors"
    args = ["finetune", "--data", str(data), "--out", str(out), "--model", tiny]
    assert cli.main(args + ["--steps", "2", "--patch", "32", "--device", "cpu"]) == 0
    assert "3 pair(s); validation: held-out pairs: f2" in capsys.readouterr().out
    cfg = json.loads(out.with_suffix(".json").read_text())
    assert cfg["finetune"]["pairs"] == 3 and cfg[checkpoints.WEIGHTS_HASH_KEY] == digest(out)


def test_cli_finetune_repeated_qobm_dapi(tiny, tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs", [(64, 64), (64, 80)])
    out = tmp_path / "ft.safetensors"
    args = ["finetune", "--out", str(out), "--model", tiny, "--steps", "1", "--patch", "32"]
    for i in range(2):
        args += ["--qobm", str(data / f"f{i}_qobm.tif"), "--dapi", str(data / f"f{i}_dapi.tif")]
    assert cli.main(args) == 0
    assert "validation: held-out pairs: f1_qobm.tif + f1_dapi.tif" in capsys.readouterr().out
    assert cli.main(args[:-2] + ["--overwrite"]) == 2
    assert "2 --qobm but 1 --dapi images" in capsys.readouterr().err


def test_cli_missing_cuda_fails_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    refuse_training(monkeypatch)
    data = write_pairs(tmp_path / "pairs", [(64, 64)])
    out = tmp_path / "ft.safetensors"
    rc = cli.main(["finetune", "--data", str(data), "--out", str(out), "--device", "cuda"])
    err = capsys.readouterr().err
    assert rc == 2 and "lcm-stain finetune: error: device 'cuda' requested but" in err
    assert not out.exists()


def test_cli_constant_dapi_exits_2(tmp_path, capsys):
    tifffile.imwrite(tmp_path / "q.tif", blobs((64, 64)))
    tifffile.imwrite(tmp_path / "d.tif", np.zeros((64, 64), np.uint16))
    args = ["--qobm", str(tmp_path / "q.tif"), "--dapi", str(tmp_path / "d.tif")]
    assert cli.main(["finetune", *args, "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "error: DAPI image has no contrast" in capsys.readouterr().err


# ------------------------------------------------------------------------- output safety


def result_of(tiny: str, value: float) -> finetune.FinetuneResult:
    """A loadable FinetuneResult (the tiny LCM) whose first U-Net tensor is filled with `value`."""
    ck = checkpoints.load_checkpoint(tiny)
    tensors = dict(ck.tensors)
    first = next(k for k in tensors if k.startswith("unet."))
    tensors[first] = torch.full_like(tensors[first], value)
    cfg = {k: v for k, v in ck.config.items() if k != checkpoints.WEIGHTS_HASH_KEY}
    return finetune.FinetuneResult(tensors, {**cfg, "value": value})


def test_saved_config_records_the_tensors_hash(tiny, tmp_path):
    path = result_of(tiny, 1.0).save(tmp_path / "a.safetensors")
    cfg = json.loads(path.with_suffix(".json").read_text())
    assert cfg[checkpoints.WEIGHTS_HASH_KEY] == digest(path) and cfg["value"] == 1.0
    assert sorted(os.listdir(tmp_path)) == ["a.json", "a.safetensors"]


@pytest.mark.parametrize("had_old", [True, False])
def test_interrupt_between_the_renames_keeps_the_old_pair(tiny, tmp_path, monkeypatch, had_old):
    """Ctrl-C after the tensors are renamed, before the config: the old pair stays whole."""
    path = tmp_path / "ft.safetensors"
    if had_old:
        result_of(tiny, 1.0).save(path)
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    real = os.replace

    def replace(src, dst):
        if os.fspath(dst) == os.fspath(path.with_suffix(".json")):
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        result_of(tiny, 2.0).save(path)
    monkeypatch.undo()
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before
    if had_old:
        assert checkpoints.load_checkpoint(path).config["value"] == 1.0


def test_a_pair_torn_by_a_hard_kill_is_refused_on_load(tiny, tmp_path):
    """No rollback runs after SIGKILL or a power cut: the recorded hash catches the mismatch."""
    old = result_of(tiny, 1.0).save(tmp_path / "old.safetensors")
    new = result_of(tiny, 2.0).save(tmp_path / "new.safetensors")
    os.replace(new, old)  # new tensors beside the old config, as a kill between renames leaves
    with pytest.raises(checkpoints.CheckpointError, match="does not match the hash recorded in"):
        checkpoints.load_checkpoint(old)


def test_a_users_json_beside_out_needs_overwrite(tmp_path, capsys, monkeypatch):
    refuse_training(monkeypatch)
    (tmp_path / "mine.json").write_text('{"my": "notes"}')
    data = write_pairs(tmp_path / "pairs", [(64, 64)])
    out = tmp_path / "mine.safetensors"
    assert cli.main(["finetune", "--data", str(data), "--out", str(out)]) == 2
    assert f"{tmp_path / 'mine.json'} exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "mine.json").read_text() == '{"my": "notes"}' and not out.exists()


def test_a_folder_as_out_is_refused_before_training(tmp_path, capsys, monkeypatch):
    refuse_training(monkeypatch)
    data = write_pairs(tmp_path / "pairs", [(64, 64)])
    (tmp_path / "x.safetensors").mkdir()
    args = ["finetune", "--data", str(data), "--out", str(tmp_path / "x.safetensors")]
    assert cli.main([*args, "--overwrite"]) == 2
    assert "x.safetensors is a folder: give a file name" in capsys.readouterr().err


def test_missing_output_folder_is_reported_before_training(tmp_path, capsys, monkeypatch):
    refuse_training(monkeypatch)
    data = write_pairs(tmp_path / "pairs", [(64, 64)])
    out = tmp_path / "nope" / "ft.safetensors"
    assert cli.main(["finetune", "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"output folder {tmp_path / 'nope'} does not exist: create it" in err
    assert not (tmp_path / "nope").exists()


def test_unwritable_output_folder_is_reported_before_training(tmp_path, capsys, monkeypatch):
    refuse_training(monkeypatch)
    data = write_pairs(tmp_path / "pairs", [(64, 64)])
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root ignores permissions: fail the probe the way the OS would
        import tempfile

        def denied(*a, **k):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "TemporaryFile", denied)
    args = ["finetune", "--data", str(data), "--out", str(ro / "ft.safetensors")]
    try:
        assert cli.main(args) == 2
    finally:
        ro.chmod(0o755)
    err = capsys.readouterr().err
    assert f"cannot write to the output folder {ro} (Permission denied)" in err
    assert os.listdir(ro) == []


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--qobm", "q.tif", "--dapi", "d.tif"], "give either --data or --qobm/--dapi, not both"),
        (["--max-minutes", "0"], "--max-minutes must be a positive number of minutes, got 0.0"),
    ],
)
def test_cli_option_conflicts_fail_before_training(tmp_path, capsys, monkeypatch, extra, message):
    refuse_training(monkeypatch)
    data = write_pairs(tmp_path / "pairs", [(64, 64)])
    args = ["finetune", "--data", str(data), "--out", str(tmp_path / "o.safetensors"), *extra]
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err


def test_a_guided_lcm_is_finetuned_at_its_guidance_input(tmp_path):
    """A classifier-free guided LCM (the packaged kind since 0.3.0) is fine-tuned, validated
    and saved at one operating point: its guidance input at the default w."""
    import napari_lcm_stain.models as models_mod
    from _fake_predictor import guided_lcm

    guidance = {"min": 1.0, "max": 3.0, "default": 1.5, "method": "cfg"}
    path = guided_lcm(tmp_path / "guided.safetensors", guidance=guidance)
    ck = checkpoints.load_checkpoint(path)
    vae = VAE(**ck.config["architecture"]["vae"]["kwargs"])
    modules = {"unet": ck.sub("unet"), "decoder": ck.sub("decoder"), "encoder": vae.encoder}
    path = checkpoints.save_checkpoint(path, modules, ck.config)  # with an encoder: finetunable
    seen = []
    real = models_mod.LatentUNet.forward

    def spy(self, z, t, cond, w=None):
        seen.append(None if w is None else float(torch.as_tensor(w).flatten()[0]))
        return real(self, z, t, cond, w)

    pairs = [pair((64, 64), 0), pair((64, 64), 1)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models_mod.LatentUNet, "forward", spy)
        res = finetune.run_finetune([p[0] for p in pairs], [p[1] for p in pairs],
                                    model=str(path), steps=2, patch=32, device="cpu")  # fmt: skip
    assert set(seen) == {1.5}  # training and validation: the input at w = 1.5, one branch
    assert res.config["guidance"] == {**guidance, "method": "embedding"}
