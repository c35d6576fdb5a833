"""Issue 25 (reliability, round three), items 1-4, 15 and 17: `train --data` and `finetune`
refuse implausible pixel sizes, `finetune` resamples pairs to the model's pixel size, resuming a
run folder compares what it was trained with, duplicate pairs are refused, `finetune`'s argument
errors, and a constant DAPI names its pair.

Training is avoided where the check comes first; where it runs, it is the tiny preset's VAE stage
or the tiny fine-tuning checkpoint of `test_finetune.py` for a step or two."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tifffile

from _fake_predictor import blobs
from napari_lcm_stain import checkpoints as ck
from napari_lcm_stain import cli, finetune
from napari_lcm_stain.io import write_image
from napari_lcm_stain.training import folder as fo
from napari_lcm_stain.training import run_recipe
from test_finetune import pair, refuse_training, tiny_finetunable, write_pairs

PX = 0.414
#: The plausibility message `stain` gives (engine.rescale_factor), from its fixed parts.
IMPLAUSIBLE = r"times the model's 0\.414 µm/px, outside the supported 0\.125-8: check the value"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_finetunable(tmp_path_factory.mktemp("ckpt"))


def _tif(path, shape=(16, 16), seed=0, **kw):
    tifffile.imwrite(path, np.random.default_rng(seed).random(shape, np.float32), **kw)
    return path


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    return err


# ------------------------------------------------------------- 1. implausible pixel sizes


def test_stain_and_train_data_share_the_plausibility_message(tmp_path):
    from napari_lcm_stain.engine import rescale_factor

    with pytest.raises(ValueError, match=IMPLAUSIBLE):
        rescale_factor(100, PX, "--pixel-size")


def test_train_data_refuses_a_pairs_csv_pixel_size_of_100(tmp_path):
    _tif(tmp_path / "a.tif")
    _tif(tmp_path / "b.tif", seed=1)
    _tif(tmp_path / "c.tif", seed=2)
    _tif(tmp_path / "e.tif", seed=3)
    (tmp_path / "pairs.csv").write_text("qobm,dapi,pixel_size\nc.tif,e.tif,\na.tif,b.tif,100\n")
    with pytest.raises(ValueError, match=IMPLAUSIBLE) as e:
        fo.load_folder(tmp_path, PX)
    assert "pixel size 100 µm/px" in str(e.value)
    assert f"pixel_size in {tmp_path / 'pairs.csv'} line 3" in str(e.value)
    assert "a.tif" in str(e.value)


def test_train_data_refuses_a_72_px_per_cm_tiff_on_the_command_line(tmp_path, capsys):
    """A plain TIFF's 72 px/cm resolution tag reads as 138.9 µm/px: refused, not resampled to
    ~21,000² px."""
    res = {"resolution": (72, 72), "resolutionunit": "CENTIMETER"}
    _tif(tmp_path / "a_qobm.tif", **res)
    _tif(tmp_path / "a_dapi.tif", seed=1, **res)
    argv = ["train", "--preset", "tiny", "--data", str(tmp_path), "--out", str(tmp_path / "r")]
    assert cli.main(argv) == 2
    err = _err(capsys)
    assert "pixel size 138.889 µm/px" in err and IMPLAUSIBLE.replace("\\", "") in err
    assert f"the metadata of {tmp_path / 'a_qobm.tif'}" in err


def test_finetune_refuses_implausible_pixel_sizes(tmp_path, capsys, monkeypatch):
    refuse_training(monkeypatch)
    monkeypatch.setattr(finetune, "run_finetune", _no_training)
    res = {"resolution": (72, 72), "resolutionunit": "CENTIMETER"}
    q, d = _tif(tmp_path / "q.tif", **res), _tif(tmp_path / "d.tif", seed=1, **res)
    out = tmp_path / "o.safetensors"
    assert cli.main(["finetune", "--qobm", str(q), "--dapi", str(d), "--out", str(out)]) == 2
    err = _err(capsys)
    assert "pixel size 138.889 µm/px" in err and f"the metadata of {q}" in err
    data = tmp_path / "data"
    data.mkdir()
    _tif(data / "a_qobm.tif", seed=2)  # no pixel size: the DAPI's 10 µm/px is the pair's
    _tif(data / "a_dapi.tif", seed=3, resolution=(1000, 1000), resolutionunit="CENTIMETER")
    assert cli.main(["finetune", "--data", str(data), "--out", str(out)]) == 2
    err = _err(capsys)
    assert "pixel size 10 µm/px" in err and f"the metadata of {data / 'a_dapi.tif'}" in err
    assert not out.exists()


def _no_training(*a, **k):
    raise AssertionError("training started")


# ------------------------------------------------------- 2. finetune at the model's pixel size


def test_finetune_resamples_pairs_to_the_models_pixel_size(tiny, tmp_path, monkeypatch, capsys):
    """Pairs at 0.207 µm/px (OME PhysicalSizeX) are trained at the model's 0.414, as `train
    --data` does; the checkpoint records the pairs' own pixel size."""
    seen = []
    real = finetune.run_finetune

    def spy(q, d, **kw):
        seen.append([np.shape(a) for a in (q if isinstance(q, list) else [q])])
        return real(q, d, **kw)

    monkeypatch.setattr(finetune, "run_finetune", spy)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        q, d = pair((128, 192), i)
        write_image(data / f"f{i}_qobm.ome.tif", q, {"pixel_size": 0.207})
        write_image(data / f"f{i}_dapi.ome.tif", d, {"pixel_size": 0.207})
    out = tmp_path / "ft.safetensors"
    args = ["finetune", "--data", str(data), "--out", str(out), "--model", tiny]
    assert cli.main([*args, "--steps", "1", "--patch", "32", "--device", "cpu"]) == 0
    assert seen == [[(1, 64, 96), (1, 64, 96)]]
    printed = capsys.readouterr().out
    assert "resampled 128x192 px at 0.207 µm/px to 64x96 px at the model's 0.414 µm/px" in printed
    cfg = json.loads(ck.config_path(out).read_text())
    assert cfg["pixel_size"] == PX
    assert [p["pixel_size"] for p in cfg["finetune"]["pair_pixel_sizes"]] == [0.207, 0.207]
    assert cfg["finetune"]["base"] == tiny


def test_finetune_assumes_the_models_pixel_size_with_a_note(tiny, tmp_path, capsys):
    q, d = pair((96, 96), 0)
    tifffile.imwrite(tmp_path / "q.tif", q)  # no pixel size
    tifffile.imwrite(tmp_path / "d.tif", d)
    out = tmp_path / "ft.safetensors"
    args = ["--qobm", str(tmp_path / "q.tif"), "--dapi", str(tmp_path / "d.tif")]
    argv = ["finetune", *args, "--out", str(out), "--model", tiny, "--steps", "1", "--patch", "32"]
    assert cli.main(argv) == 0
    assert "pixel size unknown" in capsys.readouterr().out
    cfg = json.loads(ck.config_path(out).read_text())
    assert cfg["finetune"]["pair_pixel_sizes"][0]["pixel_size_source"] == "assumed"


# -------------------------------------------------------------------- 3. resuming a run folder


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    """The tiny preset's VAE stage on simulated fields (seed 0): a run folder to resume."""
    out = tmp_path_factory.mktemp("resume") / "run"
    run_recipe("tiny", out, stages=["vae"], quiet=True)
    return out


def test_a_matching_run_resumes_and_says_so(vae_run, capsys):
    before = (vae_run / "vae.safetensors").stat().st_mtime_ns
    run_recipe("tiny", vae_run, stages=["vae"])
    assert "resuming: stages vae already done" in capsys.readouterr().out
    assert (vae_run / "vae.safetensors").stat().st_mtime_ns == before


@pytest.mark.parametrize(
    ("kw", "diff"),
    [
        ({"seed": 1}, "seed 0 there, 1 now"),
        ({"anchor_weight": 3.0}, "preset setting anchor_weight 8.0 there, 3.0 now"),
        ({"init": "packaged"}, "--init none there, 'packaged' now"),
    ],
)
def test_a_run_with_other_settings_is_refused_with_the_difference(vae_run, kw, diff):
    before = (vae_run / "vae.safetensors").stat().st_mtime_ns
    with pytest.raises(ValueError, match="pass --overwrite to restart") as e:
        run_recipe("tiny", vae_run, stages=["vae"], quiet=True, **kw)
    assert diff in str(e.value) and str(vae_run) in str(e.value)
    assert (vae_run / "vae.safetensors").stat().st_mtime_ns == before


def _other_run_folder(tmp_path):
    """A folder holding the packaged LCM (preset default, simulated data) and its scores."""
    out = tmp_path / "run"
    out.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copy(ck.WEIGHTS_DIR / f"lcm{suffix}", out / f"lcm{suffix}")
    (out / "validation.json").write_text('{"old": true}')
    return out


def test_other_data_and_preset_are_refused_on_the_command_line(tmp_path, capsys):
    """The old run's LCM must not be scored (validation.json) as if trained on the new data."""
    out = _other_run_folder(tmp_path)
    data = write_pairs(tmp_path / "pairs", [(64, 64), (64, 64)])
    argv = ["train", "--preset", "tiny", "--data", str(data), "--out", str(out)]
    assert cli.main([*argv, "--stages", "vae"]) == 2
    err = _err(capsys)
    packaged = json.loads((out / "lcm.json").read_text())["provenance"]["preset"]["name"]
    assert f"preset {packaged!r} there, 'tiny' now" in err
    assert f"data simulated fields there, the pairs in {data} now" in err
    assert "--overwrite" in err
    assert (out / "validation.json").read_text() == '{"old": true}'


def test_changed_data_content_is_refused_and_overwrite_restarts(tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs", [(64, 64)])
    out = tmp_path / "run"
    argv = ["train", "--preset", "tiny", "--data", str(data), "--out", str(out), "--stages", "vae"]
    assert cli.main(argv) == 0
    first = (out / "vae.safetensors").stat().st_mtime_ns
    q, d = pair((64, 64), 5)
    tifffile.imwrite(data / "f0_dapi.tif", d)  # same name, other content
    capsys.readouterr()
    assert cli.main(argv) == 2
    assert f"{data / 'f0_dapi.tif'} changed since" in _err(capsys)
    assert (out / "vae.safetensors").stat().st_mtime_ns == first
    for name in ("lcm.safetensors", "lcm.json"):  # a stale stage of the old run
        shutil.copy(ck.WEIGHTS_DIR / name, out / name)
    assert cli.main([*argv, "--overwrite"]) == 0
    assert (out / "vae.safetensors").stat().st_mtime_ns != first
    assert not (out / "lcm.safetensors").exists() and not (out / "lcm.json").exists()
    report = json.loads((out / "validation.json").read_text())
    assert "lcm" not in report  # no scores for an LCM this run did not train
    prov = ck.load_checkpoint(out / "vae.safetensors").config["provenance"]
    files = prov["data_files"]["pairs"][0]
    assert files["dapi_sha256"] == ck.sha256(data / "f0_dapi.tif")


# ------------------------------------------------------------------------ 4. duplicate pairs


def test_a_pair_listed_twice_in_pairs_csv_is_refused(tmp_path):
    _tif(tmp_path / "a.tif")
    _tif(tmp_path / "b.tif", seed=1)
    (tmp_path / "pairs.csv").write_text("qobm,dapi\na.tif,b.tif\na.tif,b.tif\n")
    csv = tmp_path / "pairs.csv"
    with pytest.raises(ValueError, match="each file may be in one pair only") as e:
        fo.find_pairs(tmp_path)
    assert f"File '{tmp_path / 'a.tif'}' is in {csv} line 2 and {csv} line 3" in str(e.value)


def test_a_file_as_both_qobm_and_dapi_is_refused(tmp_path):
    _tif(tmp_path / "a.tif")
    (tmp_path / "pairs.csv").write_text("qobm,dapi\na.tif,./a.tif\n")
    with pytest.raises(ValueError, match="as both qOBM and DAPI") as e:
        fo.find_pairs(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'pairs.csv'} line 2 uses file '")


def test_a_symlinked_pair_in_a_named_folder_is_refused(tmp_path):
    _write = write_pairs(tmp_path / "d", [(32, 32)])
    (_write / "g_qobm.tif").symlink_to(_write / "f0_qobm.tif")
    (_write / "g_dapi.tif").symlink_to(_write / "f0_dapi.tif")
    with pytest.raises(ValueError, match="is in pair 'f0' and pair 'g'"):
        fo.find_pairs(_write)


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ([("q", "q")], "Pair 1 (--qobm/--dapi) uses file '{q}' as both qOBM and DAPI"),
        ([("q", "d"), ("q", "d")], "File '{q}' is in pair 1 (--qobm/--dapi) and pair 2"),
    ],
)
def test_finetune_refuses_a_file_used_twice(tmp_path, capsys, monkeypatch, pairs, message):
    refuse_training(monkeypatch)
    monkeypatch.setattr(finetune, "run_finetune", _no_training)
    files = {"q": _tif(tmp_path / "q.tif", (64, 64)), "d": _tif(tmp_path / "d.tif", (64, 64), 1)}
    argv = ["finetune", "--out", str(tmp_path / "o.safetensors")]
    for q, d in pairs:
        argv += ["--qobm", str(files[q]), "--dapi", str(files[d])]
    assert cli.main(argv) == 2
    assert message.format(q=files["q"]) in _err(capsys)


# ----------------------------------------------------------------- 15. finetune argument errors


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-minutes", "inf"], "--max-minutes must be a positive number of minutes, got inf"),
        (["--max-minutes", "nan"], "--max-minutes must be a positive number of minutes, got nan"),
        (["--val-fraction", "nan"], "--val-fraction must be a number between 0 and 1, got nan"),
        (["--val-fraction", "1"], "--val-fraction must be a number between 0 and 1, got 1.0"),
        (["--patch", "0"], "--patch must be a positive number of px, got 0"),
        (["--steps", "0"], "--steps must be between 1 and 100000, got 0"),
        (["--lr", "nan"], "--lr (learning rate) must be in (0, 1), got nan"),
    ],
)
def test_finetune_argument_errors_are_clear(tmp_path, capsys, monkeypatch, extra, message):
    refuse_training(monkeypatch)
    monkeypatch.setattr(finetune, "run_finetune", _no_training)
    data = write_pairs(tmp_path / "pairs", [(64, 64)])
    argv = ["finetune", "--data", str(data), "--out", str(tmp_path / "o.safetensors"), *extra]
    assert cli.main(argv) == 2
    assert f"lcm-stain finetune: error: {message}" in _err(capsys)


def test_a_patch_under_the_tile_multiple_says_so(tiny):
    q, d = pair((96, 96), 0)
    with pytest.raises(
        ValueError, match=r"--patch 4 is smaller than the model's tile multiple \(8 px\)"
    ):
        next(finetune.iter_finetune(q, d, model=tiny, patch=4))


# ---------------------------------------------------------------- 17. constant DAPI in train


def test_train_with_a_constant_dapi_names_the_pair(tmp_path, capsys):
    write_image(tmp_path / "a_qobm.ome.tif", blobs((64, 64)), {"pixel_size": PX})
    write_image(tmp_path / "a_dapi.ome.tif", np.full((64, 64), 7.0), {"pixel_size": PX})
    argv = ["train", "--preset", "tiny", "--data", str(tmp_path), "--out", str(tmp_path / "r")]
    assert cli.main(argv) == 2
    err = _err(capsys)
    assert f"DAPI image {tmp_path / 'a_dapi.ome.tif'} (pair 'a') has no contrast" in err
