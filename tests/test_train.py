"""Training on the tiny preset: every stage learns, resumes, and produces loadable predictors."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from napari_lcm_stain import checkpoints as ck
from napari_lcm_stain import finetune
from napari_lcm_stain import training as train
from napari_lcm_stain.sampling import load_predictor
from napari_lcm_stain.training import presets as presets_mod
from napari_lcm_stain.training import stages as stages_mod


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    paths = train.run_recipe("tiny", out, seed=0, quiet=True)
    return out, paths


def _losses(out, stage):
    rows = np.loadtxt(out / f"{stage}_loss.csv", delimiter=",", skiprows=1, ndmin=2)
    return rows[:, 1]


@pytest.mark.parametrize("stage", ["vae", "decoder", "teacher", "pix2pix"])
def test_each_stage_loss_falls(tiny_run, stage):
    out, _ = tiny_run
    loss = _losses(out, stage)
    assert len(loss) >= 3
    assert loss[-2:].mean() < loss[:2].mean(), (stage, loss)


@torch.no_grad()
def _one_step_error(unet, data, seed=0):
    """L1 of the consistency function's one-step estimate (t=999, pure noise) to the true latent."""
    from napari_lcm_stain.sampling import lcm_scheduler, train_scheduler

    rng = np.random.default_rng(seed)
    q, _, z0 = data.batch(rng, 16, 64)
    torch.manual_seed(seed)
    t = torch.full((16,), 999)
    z = torch.randn_like(z0)
    c_skip, c_out = lcm_scheduler().get_scalings_for_boundary_condition_discrete(t)
    x0 = train.x0_from_v(train_scheduler(), z, unet(z, t, q), t)
    f = c_skip.view(-1, 1, 1, 1) * z + c_out.view(-1, 1, 1, 1) * x0
    return float((f - z0).abs().mean())


def test_distillation_stage_learns(tiny_run):
    """The LCD loss chases a moving EMA target, so judge the stage by its one-step error."""
    out, paths = tiny_run
    p = train.get_train_preset("tiny")
    data = train.make_training_data(p, seed=0)
    lcm = ck.load_checkpoint(paths["lcm"])
    data.latents = None
    vae = finetune.build_from(lcm.config["architecture"]["vae"], None, "VAE")
    ck.load_into(vae.encoder, lcm.sub("encoder"), "encoder")
    data.latents = train.encode_latents(vae, data.dapi) * lcm.config["latent_scale"]
    teacher_ck = ck.load_checkpoint(paths["teacher"])
    teacher = finetune.build_from(
        teacher_ck.config["architecture"]["unet"], teacher_ck.sub("unet"), "t"
    )
    student = finetune.build_from(lcm.config["architecture"]["unet"], lcm.sub("unet"), "s")
    assert _one_step_error(student.eval(), data) < _one_step_error(teacher.eval(), data)


def test_checkpoints_carry_what_inference_needs(tiny_run):
    out, paths = tiny_run
    cfg = ck.load_checkpoint(paths["lcm"]).config
    for key in (
        "architecture",
        "scheduler",
        "normalization",
        "pixel_size",
        "latent_scale",
        "multiple",
        "version",
        "provenance",
    ):
        assert key in cfg, key
    assert cfg["scheduler"]["prediction_type"] == "v_prediction"
    assert cfg["provenance"]["preset"]["name"] == "tiny" and cfg["provenance"]["seed"] == 0
    assert cfg["normalization"]["type"] == "robust"  # per-image median / MAD, stored with the model


@pytest.mark.parametrize(
    ("name", "steps"), [("lcm", 1), ("lcm", 2), ("teacher", 3), ("pix2pix", None)]
)
def test_predictors_from_tiny_run(tiny_run, name, steps):
    _, paths = tiny_run
    p = load_predictor(paths[name], steps=steps, device="cpu")
    x = torch.zeros(1, 1, 64, 64)
    shape = p.noise_shape(64, 64)
    noise = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0)) if shape else None
    y = p(x, noise)
    assert y.shape == (1, 1, 64, 64) and float(y.min()) >= 0 and float(y.max()) <= 1
    assert p.pixel_size == pytest.approx(0.414, rel=0.2)


def test_stain_checkpoints_carry_the_refitted_thin_decoder(tiny_run):
    """The thin decoder, refitted then polished on LCM latents, ships in teacher and LCM."""
    out, paths = tiny_run
    thin = ck.load_checkpoint(out / "polish.safetensors").sub("vae")
    refit = ck.load_checkpoint(out / "decoder.safetensors").sub("vae")
    assert not torch.equal(thin["decoder.stem.weight"], refit["decoder.stem.weight"])
    assert torch.equal(thin["encoder.0.weight"], refit["encoder.0.weight"])
    vae = ck.load_checkpoint(out / "vae.safetensors").sub("vae")
    for name in ("teacher", "lcm"):
        c = ck.load_checkpoint(paths[name])
        kwargs = c.config["architecture"]["vae"]["kwargs"]
        assert kwargs["dec_half_channels"] == 8 and kwargs["dec_half_conv"] is False
        for k, v in c.sub("decoder").items():
            assert torch.equal(v, thin[f"decoder.{k}"]), k
        for k, v in c.sub("encoder").items():
            assert torch.equal(v, vae[f"encoder.{k}"]), k
    assert "decoder.mid_res.1.weight" in vae and "decoder.mid_res.1.weight" not in thin


def test_decoder_stage_rewrites_earlier_stain_checkpoints(tmp_path):
    """A run whose teacher/LCM predate the decoder stage gets the new decoder written in."""
    import dataclasses

    p = dataclasses.replace(train.get_train_preset("tiny"), teacher_steps=5, lcm_steps=5)
    train.run_recipe(p, tmp_path, stages=["vae"], quiet=True)
    with pytest.raises(FileNotFoundError, match="run the decoder stage"):
        train.run_recipe(p, tmp_path, stages=["teacher"], quiet=True)
    old = dataclasses.replace(p, decoder_steps=0)
    _predate_decoder_steps(tmp_path)  # else resuming refuses the changed setting
    train.run_recipe(old, tmp_path, stages=["teacher", "lcm"], quiet=True)
    _predate_decoder_steps(tmp_path)
    unet_before = ck.load_checkpoint(tmp_path / "lcm.safetensors").sub("unet")
    train.run_recipe(p, tmp_path, stages=["decoder"], quiet=True)
    lcm = ck.load_checkpoint(tmp_path / "lcm.safetensors")
    thin = ck.load_checkpoint(tmp_path / "decoder.safetensors").sub("vae")
    assert all(torch.equal(v, thin[f"decoder.{k}"]) for k, v in lcm.sub("decoder").items())
    assert all(torch.equal(v, unet_before[k]) for k, v in lcm.sub("unet").items())
    assert load_predictor(tmp_path / "lcm.safetensors", 1, "cpu") is not None


def _predate_decoder_steps(run):
    """Make the run's stage checkpoints look written before the decoder stage existed: their
    recorded preset has no `decoder_steps` (a setting a checkpoint predates is not compared)."""
    for cfg_file in run.glob("*.json"):
        cfg = json.loads(cfg_file.read_text())
        if "provenance" in cfg:
            cfg["provenance"]["preset"].pop("decoder_steps", None)
            cfg_file.write_text(json.dumps(cfg))


def test_resume_skips_finished_stages(tiny_run):
    out, paths = tiny_run
    before = {k: p.stat().st_mtime_ns for k, p in paths.items()}
    train.run_recipe("tiny", out, seed=0, quiet=True)
    assert {k: p.stat().st_mtime_ns for k, p in paths.items()} == before


def test_bad_preset_and_stage(tmp_path):
    with pytest.raises(ValueError, match="unknown training preset"):
        train.run_recipe("huge", tmp_path)
    with pytest.raises(ValueError, match="unknown stage"):
        train.run_recipe("tiny", tmp_path, stages=["gan"])


def test_finetune_runs_stops_and_saves(tiny_run, tmp_path):
    import threading

    from napari_lcm_stain.simulate import simulate_pair

    _, paths = tiny_run
    s = simulate_pair("shifted-20x", size=96, seed=3)
    stop = threading.Event()
    gen = finetune.iter_finetune(
        s.qobm, s.dapi, model=str(paths["lcm"]), steps=50, patch=32, stop=stop, val_every=2
    )
    events = []
    while True:
        try:
            ev = next(gen)
        except StopIteration as e:
            res = e.value
            break
        events.append(ev)
        if ev.step == 4:
            stop.set()
    assert len(events) == 4 and res.stopped and res.best_step in (0, 2, 4)
    assert {"pearson", "ssim", "f1"} <= set(res.metrics_before) and set(res.metrics_after)
    path = res.save(tmp_path / "ft.safetensors")
    p = load_predictor(path, device="cpu")
    assert p.name == "LCM-1"
    assert ck.load_checkpoint(path).config["finetune"]["stopped"] is True


def test_finetune_rejects_bad_pairs(tiny_run):
    _, paths = tiny_run
    with pytest.raises(ValueError, match="same shape"):
        next(
            finetune.iter_finetune(np.zeros((64, 64)), np.zeros((64, 80)), model=str(paths["lcm"]))
        )
    with pytest.raises(ValueError, match="NaN"):
        next(
            finetune.iter_finetune(
                np.full((64, 64), np.nan), np.zeros((64, 64)), model=str(paths["lcm"])
            )
        )
    dapi = np.random.default_rng(0).random((64, 64))  # an empty DAPI is refused before the model
    with pytest.raises(ValueError, match="LCM checkpoint"):
        next(finetune.iter_finetune(np.zeros((64, 64)), dapi, model=str(paths["pix2pix"])))


def test_batch_crops_align_with_the_latent_grid():
    """Crops start on the latent grid; stages that need no latents (Pix2Pix) can skip them."""
    rng = np.random.default_rng(0)
    small = np.random.default_rng(1).random((3, 16, 16), dtype=np.float32)
    q = np.kron(small, np.ones((8, 8), np.float32))  # 8x8 blocks: subsampling commutes with flips
    lat = np.stack([small] * 2, axis=1)  # (3, 2, 16, 16): an f=8 "latent" of q
    data = train.PairedData(q, q.copy(), 0.414, {"type": "fixed"}, latents=lat)
    qb, db, zb = data.batch(rng, 6, 64, factor=8)
    assert qb.shape == (6, 1, 64, 64) and zb.shape == (6, 2, 8, 8)
    assert torch.equal(zb[:, 0], qb[:, 0, ::8, ::8])  # same crop, same flips/rotations
    _, _, none = data.batch(rng, 6, 64, latents=False)
    assert none is None


def test_training_refuses_a_missing_device_before_any_work(tmp_path):
    import napari_lcm_stain.device as device_mod

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="device 'cuda' requested"):
        train.run_recipe("tiny", tmp_path / "run", device="cuda", quiet=True)
    assert not (tmp_path / "run").exists()
    assert device_mod.resolve_device("cpu").type == "cpu"


def test_augmentation_changes_only_the_qobm_crops():
    from napari_lcm_stain.training.augment import augment_qobm

    rng = np.random.default_rng(0)
    q = np.random.default_rng(1).standard_normal((16, 32, 32)).astype(np.float32)
    aug = augment_qobm(q, rng)
    changed = [not np.array_equal(a, b) for a, b in zip(aug, q)]
    assert 8 <= sum(changed) < 16  # each transform on half the crops: most, not all, change
    assert aug.dtype == np.float32 and np.isfinite(aug).all()
    p = dataclasses.replace(train.get_train_preset("tiny"), n_fields=2)
    data = train.make_training_data(p, seed=0)
    assert data.augment
    _, d1, _ = data.batch(np.random.default_rng(3), 4, 32, latents=False)
    data.augment = False
    _, d2, _ = data.batch(np.random.default_rng(3), 4, 32, latents=False)
    assert torch.equal(d1, d2)  # the DAPI target is never augmented


def test_decoder_realism_critic_moves_both_losses(tmp_path):
    """With adv/fm weights the decoder and polish stages train a PatchGAN critic: its hinge loss
    and the adversarial term both change over the stage, the reconstruction (stage) loss still
    falls, and the weights differ from the L1-only decoder's."""
    p = dataclasses.replace(
        train.get_train_preset("tiny"),
        decoder_steps=40,
        adv_weight=0.1,
        fm_weight=1.0,
        adv_start=0.25,
        teacher_steps=5,
        lcm_steps=5,
        polish_steps=20,
    )
    train.run_recipe(p, tmp_path, stages=["vae", "decoder", "teacher", "lcm", "polish"], quiet=True)
    for stage, steps in (("decoder", 40), ("polish", 20)):
        rows = np.loadtxt(tmp_path / f"{stage}_critic.csv", delimiter=",", skiprows=1, ndmin=2)
        assert rows[0, 0] == int(0.25 * steps) and rows[-1, 0] == steps - 1  # from adv_start on
        rec, critic, adv, fm = rows[:, 1], rows[:, 2], rows[:, 3], rows[:, 4]
        assert np.ptp(critic) > 1e-3 and np.ptp(adv) > 1e-3, stage
        assert np.all(fm > 0) and np.all(np.isfinite(rows))
        assert np.ptp(rec) > 1e-4, stage
    rec = np.loadtxt(tmp_path / "decoder_critic.csv", delimiter=",", skiprows=1)[:, 1]
    assert rec[-5:].mean() < rec[:5].mean()  # the reconstruction still improves
    # the same run without the critic: no critic CSV and other decoder weights
    plain = dataclasses.replace(p, adv_weight=0.0, fm_weight=0.0)
    train.run_recipe(plain, tmp_path / "plain", stages=["vae", "decoder"], quiet=True)
    assert not (tmp_path / "plain" / "decoder_critic.csv").exists()
    a = ck.load_checkpoint(tmp_path / "decoder.safetensors").sub("vae")
    b = ck.load_checkpoint(tmp_path / "plain" / "decoder.safetensors").sub("vae")
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("decoder."))
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("encoder."))


def test_texture_decoder_learns_the_residual_amplitude(tmp_path):
    """texture=True: the decoder and polish stages fit the texture head by the likelihood of
    what the latent cannot explain. Its amplitude moves from the start value to the residual's
    scale, the stage loss falls, and the stain checkpoints draw (with texture=True) a grainy stain
    around the texture-free prediction."""
    from napari_lcm_stain.models import TEXTURE_INIT_BIAS

    p = dataclasses.replace(
        train.get_train_preset("tiny"), texture=True, decoder_steps=300, polish_steps=20
    )
    train.run_recipe(p, tmp_path, stages=["vae", "decoder", "teacher", "lcm", "polish"], quiet=True)
    c = ck.load_checkpoint(tmp_path / "decoder.safetensors")
    assert c.config["architecture"]["vae"]["kwargs"]["dec_texture"] is True
    assert float(c.sub("vae")["decoder.amplitude.0.bias"].mean()) != TEXTURE_INIT_BIAS
    loss = np.loadtxt(tmp_path / "decoder_loss.csv", delimiter=",", skiprows=1)[:, 1]
    assert loss[-2:].mean() < loss[:2].mean()
    vae = train.stages.make_inference_vae(p)
    ck.load_into(vae, c.sub("vae"), "decoder")
    data = train.make_training_data(dataclasses.replace(p, n_fields=2), seed=5)
    _, d, _ = data.batch(np.random.default_rng(0), 4, 64, p.latent_factor, latents=False)
    with torch.no_grad():
        mean, amp = vae.decoder(vae.encode(d)[0], parts=True)
    rms = float((d - mean).pow(2).mean().sqrt())
    amp_rms = float(amp.pow(2).mean().sqrt())
    assert 0.5 * rms < amp_rms < 2 * rms, (amp_rms, rms)  # the residual's scale, not the start's
    pred = load_predictor(tmp_path / "lcm.safetensors", device="cpu", texture=True)
    assert pred.texture
    x = torch.randn(1, 1, 64, 64)
    noise = torch.randn(1, 1, p.latent_channels, 8, 8)
    textured = pred(x, noise)
    pred.texture = False
    smooth = pred(x, noise)
    assert float((textured - smooth).abs().mean()) > 1e-3
    assert torch.equal(pred(x, noise), smooth)  # texture off: deterministic given the noise


def test_grid_penalty_without_a_critic():
    """grid_weight alone: no critic is built, and the stage loss gets the latent-grid excess of
    the decoded crops, with a gradient that lowers a drawn 8-px pattern; no excess, no term."""
    from napari_lcm_stain.training.stages import RealismCritic

    crit = RealismCritic(0.0, 0.0, 1.0, start=0, ndf=8, factor=8)
    assert not crit.on and not hasattr(crit, "disc")
    g = torch.Generator().manual_seed(0)
    real = torch.rand(4, 1, 64, 64, generator=g)
    stripes = (torch.arange(64) % 8 == 0).float().view(1, 1, 1, 64)
    fake = (real + 0.5 * stripes).requires_grad_(True)
    base = torch.tensor(1.0)
    loss = crit(10, fake, base, real)
    assert float(loss) > 1.0  # the excess at period 8 is added
    loss.backward()
    assert float((fake.grad * stripes).sum()) > 0  # descending it weakens the stripes
    assert float(crit(10, real.clone(), base, real)) == 1.0  # no excess: the loss as it was
    off = RealismCritic(0.0, 0.0, 0.0, start=0, ndf=8, factor=8)
    assert off(10, fake, base, real) is base


def test_conditioning_encoder_trains_saves_and_transfers(tmp_path):
    """`unet_cond_channels`: the teacher trains with the encoder, its checkpoint records it and
    loads as a predictor, and a transfer preset from that checkpoint keeps it; without it the
    config has no `cond_channels` key (older checkpoints and fingerprints unchanged)."""
    p = dataclasses.replace(
        train.get_train_preset("tiny"), unet_cond_channels=(4, 8, 8, 8), teacher_steps=20
    )
    train.run_recipe(p, tmp_path, stages=["vae", "decoder", "teacher"], quiet=True)
    rows = np.loadtxt(tmp_path / "teacher_loss.csv", delimiter=",", skiprows=1, ndmin=2)
    assert rows[-1, 1] < rows[0, 1]
    ckpt = ck.load_checkpoint(tmp_path / "teacher.safetensors")
    assert ckpt.config["architecture"]["unet"]["kwargs"]["cond_channels"] == [4, 8, 8, 8]
    assert any(k.startswith("cond_encoder.") for k in ckpt.sub("unet"))
    pred = load_predictor(tmp_path / "teacher.safetensors", 1, "cpu")
    assert pred.unet.cond_encoder is not None
    moved = presets_mod.transfer_preset(train.get_train_preset("tiny"), ckpt.config, None)
    assert moved.unet_cond_channels == (4, 8, 8, 8)
    plain = stages_mod.unet_arch(train.get_train_preset("tiny"))
    assert "cond_channels" not in plain["kwargs"]


def test_transfer_on_simulated_fields_keeps_the_init_normalisation(tiny_run, tmp_path):
    """`--init` without `--data`: the simulated fields are normalised as the init checkpoint says
    (its mad_scale), not with the default robust parameters, so its U-Net sees what it knows."""
    out, _ = tiny_run
    cfg = ck.load_checkpoint(out / "lcm.safetensors").config["normalization"]
    assert cfg["type"] == "robust"
    odd = dict(cfg, mad_scale=3.0)
    data = train.make_training_data(train.get_train_preset("tiny"), 0, odd)
    ref = train.make_training_data(train.get_train_preset("tiny"), 0)
    assert data.normalization == odd and ref.normalization == cfg
    ratio = np.median(np.abs(ref.qobm)) / np.median(np.abs(data.qobm))
    assert ratio == pytest.approx(3.0 / cfg["mad_scale"], rel=1e-3)


def test_adversarial_distillation_critic_moves(tmp_path):
    """lcm_adv_weight > 0: the LCM stage decodes the student's estimate and a conditional critic
    trains beside it (its CSV has moving critic and adversarial terms); the U-Net differs from
    plain distillation's, which writes no critic CSV."""
    p = dataclasses.replace(
        train.get_train_preset("tiny"), lcm_steps=20, lcm_adv_weight=0.1, adv_start=0.25
    )
    stages = ["vae", "decoder", "teacher", "lcm"]
    train.run_recipe(p, tmp_path / "adv", stages=stages, quiet=True)
    rows = np.loadtxt(tmp_path / "adv" / "lcm_critic.csv", delimiter=",", skiprows=1, ndmin=2)
    assert rows[0, 0] == 5 and rows[-1, 0] == 19
    assert np.ptp(rows[:, 2]) > 1e-3 and np.ptp(rows[:, 3]) > 1e-3 and np.all(rows[:, 1] > 0)
    plain = dataclasses.replace(p, lcm_adv_weight=0.0)
    train.run_recipe(plain, tmp_path / "plain", stages=stages, quiet=True)
    assert not (tmp_path / "plain" / "lcm_critic.csv").exists()
    a = ck.load_checkpoint(tmp_path / "adv" / "lcm.safetensors").sub("unet")
    b = ck.load_checkpoint(tmp_path / "plain" / "lcm.safetensors").sub("unet")
    t = ck.load_checkpoint(tmp_path / "plain" / "teacher.safetensors").sub("unet")
    t_adv = ck.load_checkpoint(tmp_path / "adv" / "teacher.safetensors").sub("unet")
    assert all(torch.equal(t[k], t_adv[k]) for k in t)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_pixel_space_distillation_pulls_the_decoded_estimate_to_the_truth(tmp_path):
    """lcm_pixel_weight > 0: the LCM stage decodes the student's one-step estimate and adds its
    pixel reconstruction loss; the decoded estimate ends closer to the true DAPI (pixel L1) than
    plain distillation's from the same teacher, and the teacher is untouched."""
    from napari_lcm_stain.sampling import lcm_scheduler
    from napari_lcm_stain.training.stages import reconstruction_loss

    base = dataclasses.replace(train.get_train_preset("tiny"), lcm_steps=40)
    stages = ["vae", "decoder", "teacher", "lcm"]
    train.run_recipe(base, tmp_path / "plain", stages=stages, quiet=True)
    pix = dataclasses.replace(base, lcm_pixel_weight=50.0)
    train.run_recipe(pix, tmp_path / "pix", stages=stages, quiet=True)
    t = ck.load_checkpoint(tmp_path / "plain" / "teacher.safetensors").sub("unet")
    t_pix = ck.load_checkpoint(tmp_path / "pix" / "teacher.safetensors").sub("unet")
    assert all(torch.equal(t[k], t_pix[k]) for k in t)

    data = train.make_training_data(dataclasses.replace(base, n_fields=4), seed=11)
    q, d, _ = data.batch(np.random.default_rng(2), 8, 64, base.latent_factor, latents=False)
    lcm = lcm_scheduler()
    lcm.set_timesteps(1)
    step = int(lcm.timesteps[0])
    noise = torch.randn(8, base.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    err = {}
    for name in ("plain", "pix"):
        c = ck.load_checkpoint(tmp_path / name / "lcm.safetensors")
        unet, vae = train.stages.make_unet(base), train.stages.make_inference_vae(base)
        ck.load_into(unet, c.sub("unet"), "unet")
        ck.load_into(vae.decoder, c.sub("decoder"), "decoder")
        with torch.no_grad():
            v = unet(noise, torch.full((8,), step), q)
            z = lcm.step(v, step, noise).denoised / c.config["latent_scale"]
            err[name] = float(reconstruction_loss(vae.decode(z), d))
    assert err["pix"] < err["plain"], err


def test_transfer_keeps_or_adds_a_texture_head():
    """`--init` from a texture checkpoint keeps the head (its weights must load); a preset with
    texture on adds one to a deterministic init's decoder; neither on: no head."""
    from napari_lcm_stain.training.presets import transfer_preset

    cfg = json.loads(ck.packaged_path("lcm").with_suffix(".json").read_text())
    vae = cfg["architecture"]["vae"]["kwargs"]
    off = dataclasses.replace(train.get_train_preset("default"), texture=False)
    with_head = {**cfg, "architecture": {**cfg["architecture"], "vae": {
        "class": "VAE", "kwargs": {**vae, "dec_texture": True}}}}  # fmt: skip
    without = {**cfg, "architecture": {**cfg["architecture"], "vae": {
        "class": "VAE", "kwargs": {k: v for k, v in vae.items() if k != "dec_texture"}}}}  # fmt: skip
    assert transfer_preset(off, with_head, None).texture is True
    assert transfer_preset(off, without, None).texture is False
    on = dataclasses.replace(off, texture=True)
    assert transfer_preset(on, without, None).texture is True
