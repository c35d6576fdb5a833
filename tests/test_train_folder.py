"""`lcm-stain train --data DIR`: folder discovery, bad input, split by pair, registration check,
the tiny preset end to end (from scratch and from the packaged weights), and the round trip
from `lcm-stain simulate`."""

import json
import time

import numpy as np
import pytest
import tifffile
import torch
from scipy.ndimage import shift as nd_shift

from napari_lcm_stain import checkpoints as ck
from napari_lcm_stain import cli
from napari_lcm_stain.io import read_image, write_image
from napari_lcm_stain.simulate import simulate_pair, write_dataset
from napari_lcm_stain.training import folder as fo
from napari_lcm_stain.training import run_recipe
from napari_lcm_stain.training.data import PairedData
from napari_lcm_stain.training.stages import encode_latents, make_vae

PX = 0.414


def _write_pair(folder, name, q, d, px=PX, ext=".ome.tif"):
    folder.mkdir(parents=True, exist_ok=True)
    md = {"pixel_size": px} if px else None
    write_image(folder / f"{name}_qobm{ext}", q, md)
    write_image(folder / f"{name}_dapi{ext}", d, md)


@pytest.fixture(scope="module")
def sim_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    write_dataset(out, n=4, size=128, seed=3)
    return out


# ----------------------------------------------------------------------------- discovery


def test_simulate_folder_is_valid_data(sim_folder):
    """simulate writes nuclei/distractor masks and meta JSON beside the pairs: they are skipped."""
    assert (sim_folder / "000_nuclei.ome.tif").exists()
    rows = fo.find_pairs(sim_folder)
    assert [r[0] for r in rows] == ["000", "001", "002", "003"]
    assert all(
        r[1].name.endswith("_qobm.ome.tif") and r[2].name.endswith("_dapi.ome.tif") for r in rows
    )
    pairs = fo.load_folder(sim_folder, PX)
    assert pairs[0].pixel_size_source == "metadata" and pairs[0].qobm.shape == (1, 128, 128)


def test_simulated_z_stacks_are_valid_data(tmp_path):
    write_dataset(tmp_path, n=2, size=64, seed=0, z_planes=3)
    pairs = fo.load_folder(tmp_path, PX)
    assert [p.qobm.shape for p in pairs] == [(3, 64, 64), (3, 64, 64)]


def test_stacks_give_one_sample_per_plane(tmp_path):
    rng = np.random.default_rng(0)
    q, d = rng.random((3, 96, 80), np.float32), rng.random((3, 96, 80), np.float32)
    _write_pair(tmp_path, "stack", q, d, ext=".zarr")
    (pair,) = fo.load_folder(tmp_path, PX)
    assert pair.qobm.shape == (3, 96, 80)
    np.testing.assert_allclose(pair.dapi[2], d[2])


def test_pairs_csv_pixel_size_resamples_to_the_model(tmp_path):
    rng = np.random.default_rng(1)
    tifffile.imwrite(tmp_path / "a.tif", rng.random((100, 60), np.float32))  # no pixel size
    tifffile.imwrite(tmp_path / "b.tif", rng.random((100, 60), np.float32))
    tifffile.imwrite(tmp_path / "c.tif", rng.random((50, 50), np.float32))
    tifffile.imwrite(tmp_path / "e.tif", rng.random((50, 50), np.float32))
    (tmp_path / "pairs.csv").write_text("qobm,dapi,pixel_size\na.tif,b.tif,0.828\nc.tif,e.tif,\n")
    notes = []
    p1, p2 = fo.load_folder(tmp_path, PX, notes)
    assert p1.pixel_size_source == "pairs.csv" and p1.qobm.shape == (1, 200, 120)
    assert p2.pixel_size_source == "assumed" and p2.qobm.shape == (1, 50, 50)
    assert any("pixel size unknown" in n and "0.414" in n for n in notes)


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        ("missing", r"a_qobm\.ome\.tif has no partner: add a_dapi\.tif"),
        (
            "shape",
            r"a_qobm\.ome\.tif \(64x64\) and its partner .*a_dapi\.ome\.tif \(64x48\) differ",
        ),
        ("rgb", r"a_dapi\.tif: the DAPI image has colour/channel axes"),
        ("none", r"no training pairs found in .*: expected NAME_qobm\.tif"),
        ("csv", r"pairs\.csv needs the columns qobm,dapi"),
        ("csvfile", r"pairs\.csv line 2: DAPI file .*nope\.tif not found"),
        ("twice", r"DAPI of pair 'a' is ambiguous: a_dapi\.ome\.tif, a_dapi\.zarr"),
    ],
)
def test_bad_folders_name_the_file(tmp_path, setup, match):
    rng = np.random.default_rng(2)
    img = rng.random((64, 64), np.float32)
    if setup == "missing":
        write_image(tmp_path / "a_qobm.ome.tif", img)
    elif setup == "shape":
        write_image(tmp_path / "a_qobm.ome.tif", img)
        write_image(tmp_path / "a_dapi.ome.tif", img[:, :48])
    elif setup == "rgb":
        write_image(tmp_path / "a_qobm.ome.tif", img)
        tifffile.imwrite(tmp_path / "a_dapi.tif", (rng.random((64, 64, 3)) * 255).astype(np.uint8))
    elif setup == "none":
        write_image(tmp_path / "a_nuclei.ome.tif", img)
    elif setup == "csv":
        (tmp_path / "pairs.csv").write_text("phase,fluor\na.tif,b.tif\n")
    elif setup == "csvfile":
        write_image(tmp_path / "a.ome.tif", img)
        (tmp_path / "pairs.csv").write_text("qobm,dapi\na.ome.tif,nope.tif\n")
    elif setup == "twice":
        _write_pair(tmp_path, "a", img, img)
        write_image(tmp_path / "a_dapi.zarr", img)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        fo.load_folder(tmp_path, PX)


def test_cli_bad_folder_is_one_line_exit_2(tmp_path, capsys):
    write_image(tmp_path / "x_dapi.ome.tif", np.zeros((64, 64), np.float32))
    rc = cli.main(
        ["train", "--preset", "tiny", "--data", str(tmp_path), "--out", str(tmp_path / "r")]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "x_dapi.ome.tif has no partner: add x_qobm.tif" in err
    assert len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------ split, data


def test_split_is_by_pair():
    assert fo.split_by_pair(1) == ([0], [])
    for n, k in ((2, 1), (4, 1), (8, 1), (16, 2), (24, 3)):
        train, val = fo.split_by_pair(n, seed=5)
        assert len(val) == k and sorted(train + val) == list(range(n)) and not set(train) & set(val)
    assert fo.split_by_pair(16, seed=5) == fo.split_by_pair(16, seed=5)


def test_paired_data_holds_planes_of_different_sizes():
    q = [np.ones((128, 96), np.float32), np.zeros((64, 192), np.float32)]
    data = PairedData(qobm=q, dapi=[a.copy() for a in q], pixel_size=PX, normalization={})
    vae = make_vae(_tiny())
    data.latents = encode_latents(vae, data.dapi)
    assert [z.shape for z in data.latents] == [(4, 16, 12), (4, 8, 24)]
    qt, dt, zt = data.batch(np.random.default_rng(0), 6, 128, factor=8)
    assert qt.shape == (6, 1, 64, 64) and zt.shape == (6, 4, 8, 8)  # the smallest plane's side
    assert torch.equal(qt, dt)


def test_paired_data_from_pairs_of_different_sizes(tmp_path):
    """Each plane is cropped to the networks' multiple, DAPI mapped to 0-1, qOBM normalised."""
    from napari_lcm_stain.normalization import robust_config
    from napari_lcm_stain.training.recipe import _std

    rng = np.random.default_rng(4)
    pairs = [
        fo.Pair(
            n,
            tmp_path / n,
            tmp_path / n,
            5 + 2 * rng.random(s, np.float32),
            1000 * rng.random(s, np.float32),
            PX,
            "metadata",
        )
        for n, s in (("a", (2, 130, 70)), ("b", (1, 64, 200)))
    ]
    data = fo.paired_data(pairs, robust_config(), PX, 64)
    assert [q.shape for q in data.qobm] == [(128, 64), (128, 64), (64, 192)]
    assert all(0 <= d.min() and d.max() <= 1 for d in data.dapi)
    assert abs(float(np.median(data.qobm[2]))) < 0.1  # per-plane robust centre
    raw = encode_latents(make_vae(_tiny()), data.dapi)
    assert [z.shape[1:] for z in raw] == [(16, 8), (16, 8), (8, 24)]
    assert _std(raw) == pytest.approx(np.concatenate([z.ravel() for z in raw]).std())
    with pytest.raises(
        ValueError,
        match=r"b: 64x40 px at the model's pixel size is smaller than the networks' 64 px",
    ):
        fo.paired_data(
            [
                fo.Pair(
                    "b",
                    tmp_path / "b",
                    tmp_path / "b",
                    np.ones((1, 64, 40), np.float32),
                    np.ones((1, 64, 40), np.float32),
                    PX,
                    "metadata",
                )
            ],
            robust_config(),
            PX,
            64,
        )


def _tiny():
    from napari_lcm_stain.training import get_train_preset

    return get_train_preset("tiny")


# --------------------------------------------------------------------------------- registration


@pytest.fixture(scope="module")
def field():
    s = simulate_pair("brain-20x", size=512, seed=101)
    return s.qobm.astype(np.float32)[None], s.dapi.astype(np.float32)[None]


def test_registration_recovers_a_known_shift(field):
    from napari_lcm_stain.engine import stain

    q, d = field
    predicted = stain(q, "lcm", pixel_size=PX, device="cpu")
    known = np.array([2.3, -1.6])
    base = fo.estimate_shift(predicted, d)
    moved = fo.estimate_shift(predicted, nd_shift(d, (0, *(-known)), order=1, mode="nearest"))
    np.testing.assert_allclose(moved - base, known, atol=0.5)


def _pair(field, shift, tmp_path):
    q, d = field
    d = nd_shift(d, (0, *shift), order=1, mode="nearest")
    return fo.Pair(
        "p", tmp_path / "p_qobm.tif", tmp_path / "p_dapi.tif", q.copy(), d, PX, "metadata"
    )


def test_register_corrects_a_shift_and_crops(field, tmp_path):
    pair = _pair(field, (-5, 4), tmp_path)
    logs = []
    fo.check_registration([pair], "lcm", PX, "cpu", register=True, max_shift=8, log=logs.append)
    dy, dx = pair.report["shift_px"]
    assert pair.report["registered"] and pair.report["shift_reliable"]
    assert 3.5 < dy < 7 and -6 < dx < -2.5, pair.report
    assert pair.qobm.shape == pair.dapi.shape == (1, 512 - np.ceil(dy), 512 - np.ceil(-dx))
    assert pair.report["pearson_vs_model_shifted"] > pair.report["pearson_vs_model"]
    assert "p: DAPI shift to the model's prediction" in logs[0] and "corrected" in logs[0]


def test_register_leaves_an_aligned_pair_alone(field, tmp_path):
    pair, logs = _pair(field, (0, 0), tmp_path), []
    fo.check_registration([pair], "lcm", PX, "cpu", register=True, log=logs.append)
    assert not pair.report["registered"] and pair.qobm.shape == (1, 512, 512)
    assert max(map(abs, pair.report["shift_px"])) < fo.MIN_SHIFT and "left as is" in logs[0]


def test_register_refuses_a_shift_over_the_bound(field, tmp_path):
    pair = _pair(field, (-12, 0), tmp_path)
    with pytest.raises(
        ValueError, match=r"p_dapi\.tif is shifted by \(\+1[0-4]\.\d, .* more than --max-shift 8 px"
    ):
        fo.check_registration(
            [pair], "lcm", PX, "cpu", register=True, max_shift=8, log=lambda m: None
        )
    report_only = _pair(field, (-12, 0), tmp_path)
    fo.check_registration([report_only], "lcm", PX, "cpu", register=False, log=lambda m: None)
    assert not report_only.report["registered"] and report_only.qobm.shape == (1, 512, 512)


def test_register_needs_data(tmp_path):
    with pytest.raises(ValueError, match="--register needs --data"):
        run_recipe("tiny", tmp_path, register=True, quiet=True)


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def folder_run(sim_folder, tmp_path_factory):
    """`lcm-stain train --preset tiny --data <simulate's folder>` once, timed in CPU seconds."""
    run = tmp_path_factory.mktemp("folder-run") / "run"
    t0 = time.process_time()
    rc = cli.main(["train", "--preset", "tiny", "--data", str(sim_folder), "--out", str(run)])
    return run, rc, time.process_time() - t0


def test_tiny_trains_from_a_4_pair_folder_in_under_a_minute(folder_run, sim_folder):
    run, rc, cpu_s = folder_run
    assert rc == 0
    assert cpu_s < 60, f"tiny preset from a 4-pair folder took {cpu_s:.0f} CPU s"
    report = json.loads((run / "validation.json").read_text())
    val = [p["name"] for p in report["data"]["validation_pairs"]]
    train = [p["name"] for p in report["data"]["train_pairs"]]
    assert len(val) == 1 and sorted(train + val) == ["000", "001", "002", "003"]
    assert [r["name"] for r in report["lcm"]["pairs"]] == val
    assert {"pearson", "ssim", "f1"} <= set(report["lcm"]["mean"]) and "baseline" in report
    assert all("shift_px" in p for p in report["data"]["train_pairs"])
    cfg = ck.load_checkpoint(run / "lcm.safetensors").config
    assert cfg["provenance"]["data"]["folder"] == str(sim_folder.resolve())
    assert "--data" in cfg["provenance"]["command"] and cfg["normalization"]["type"] == "robust"
    assert "[register] 000" in (run / "train.log").read_text()


def test_simulate_train_stain_round_trip(folder_run, sim_folder, tmp_path):
    run, rc, _ = folder_run
    out = tmp_path / "stained.ome.tif"
    argv = ["stain", str(sim_folder / "000_qobm.ome.tif"), "-o", str(out)]
    assert cli.main([*argv, "--model", str(run / "lcm.safetensors")]) == 0
    img = np.asarray(read_image(out)[0])
    assert img.shape == (128, 128) and 0 <= img.min() and img.max() <= 1


def test_folder_run_resumes(folder_run, sim_folder):
    run, _, _ = folder_run
    names = ("vae", "decoder", "teacher", "lcm", "polish", "pix2pix")
    before = {n: (run / f"{n}.safetensors").stat().st_mtime_ns for n in names}
    run_recipe("tiny", run, data_dir=sim_folder, quiet=True)
    assert before == {n: (run / f"{n}.safetensors").stat().st_mtime_ns for n in names}


def test_init_from_a_lone_lcm_checkpoint(folder_run, sim_folder, tmp_path):
    """--init PATH: the LCM's encoder and U-Net start the stages; a teacher missing beside it is
    started from the LCM's U-Net (and the log says so)."""
    run, _, _ = folder_run
    lone = tmp_path / "lone"
    lone.mkdir()
    for ext in (".safetensors", ".json"):
        (lone / f"lcm{ext}").write_bytes((run / f"lcm{ext}").read_bytes())
    out = tmp_path / "out"
    run_recipe(
        "tiny",
        out,
        data_dir=sim_folder,
        init=lone / "lcm.safetensors",
        stages=["teacher"],
        quiet=True,
    )
    log = (out / "train.log").read_text()
    assert "no teacher.safetensors beside" in log and "Pix2Pix starts from scratch" in log
    teacher = ck.load_checkpoint(out / "teacher.safetensors")
    base = ck.load_checkpoint(lone / "lcm.safetensors")
    assert all(torch.equal(v, base.sub("encoder")[k]) for k, v in teacher.sub("encoder").items())
    assert teacher.config["latent_scale"] == base.config["latent_scale"]
    with pytest.raises(ValueError, match="not an LCM checkpoint"):
        run_recipe("tiny", out, data_dir=sim_folder, init=run / "pix2pix.safetensors", quiet=True)


def test_tiny_transfer_from_the_packaged_weights(sim_folder, tmp_path):
    """--init packaged: no VAE stage, the packaged encoder and latent scale are kept, every other
    network starts from its packaged counterpart and moves."""
    paths = run_recipe("tiny", tmp_path, data_dir=sim_folder, init="packaged", quiet=True)
    assert not (tmp_path / "vae.safetensors").exists()
    lcm, packaged = ck.load_checkpoint(paths["lcm"]), ck.load_packaged("lcm")
    assert lcm.config["architecture"] == packaged.config["architecture"]
    assert lcm.config["latent_scale"] == packaged.config["latent_scale"]
    assert lcm.config["normalization"] == packaged.config["normalization"]
    assert lcm.config["provenance"]["init"] == "packaged"
    assert lcm.config["receptive_field"] == packaged.config["receptive_field"]
    assert lcm.config["receptive_field_measured"]["inherited_from_init"] is True
    for k, v in lcm.sub("encoder").items():
        assert torch.equal(v, packaged.sub("encoder")[k]), k
    moved = [k for k, v in lcm.sub("unet").items() if not torch.equal(v, packaged.sub("unet")[k])]
    assert moved
    # a fine-tuned start, not a fresh network: the weights stay close to the packaged ones
    w, w0 = (
        lcm.sub("unet")["down_blocks.0.conv1.weight"],
        packaged.sub("unet")["down_blocks.0.conv1.weight"],
    )
    assert float((w - w0).norm() / w0.norm()) < 0.2
    p2p = ck.load_checkpoint(paths["pix2pix"]).sub("generator")
    p2p0 = ck.load_packaged("pix2pix").sub("generator")
    assert all(v.shape == p2p0[k].shape for k, v in p2p.items())
