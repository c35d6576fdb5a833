"""The teacher switches of issue #24 on the tiny preset: condition dropout, min-SNR-γ weighting,
unit-variance latents and guided consistency distillation. Each is off by default (the tiny
fingerprint, `scripts/train_fingerprint.py`, is unchanged); on, each runs its stage and changes
what it should."""

import dataclasses

import numpy as np
import pytest
import torch

from napari_lcm_stain import checkpoints as ck
from napari_lcm_stain import training as train
from napari_lcm_stain.models import LatentUNet, ResBlock
from napari_lcm_stain.sampling import lcm_scheduler, load_predictor, train_scheduler
from napari_lcm_stain.training import diffusion as diff
from napari_lcm_stain.training import presets as presets_mod
from napari_lcm_stain.training import stages as st

TINY = train.get_train_preset("tiny")


def tiny(**kw):
    return dataclasses.replace(TINY, **kw)


@pytest.fixture(scope="module")
def data():
    """The tiny training fields with latents of an untrained VAE (scaled to unit std)."""
    d = train.make_training_data(TINY, seed=0)
    torch.manual_seed(0)
    raw = st.encode_latents(st.make_vae(TINY).eval(), d.dapi)
    d.latents = (raw / raw.std()).astype(np.float32)
    return d


def _unet(seed=0, **kw) -> LatentUNet:
    """A tiny U-Net whose residual branches are on (they start at zero, which would hide the
    time and guidance embeddings' effect)."""
    torch.manual_seed(seed)
    net = st.make_unet(tiny(**kw)).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, ResBlock):
                m.conv2.weight.normal_(0, 0.05)
    return net


def _inputs(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, TINY.latent_channels, 8, 8, generator=g)
    q = torch.randn(n, 1, 64, 64, generator=g)
    return z, torch.tensor([999, 500, 20][:n]), q


def test_switches_are_off_by_default_and_recorded():
    for name in ("default", "small", "tiny"):
        p = train.get_train_preset(name)
        assert p.cond_dropout == 0 and p.min_snr_gamma == 0
        assert not p.unit_latents and not p.guidance_embed
    assert "guidance_embed" not in st.unet_arch(tiny(guidance_embed=True), "teacher")["kwargs"]
    assert "guidance_embed" not in st.unet_arch(TINY, "lcm")["kwargs"]
    kw = st.unet_arch(tiny(guidance_embed=True, guidance_default=2.0), "lcm")["kwargs"]
    assert kw["guidance_embed"] is True and kw["guidance_default"] == 2.0


# ----------------------------------------------------------------------- condition dropout


def test_drop_condition_zeroes_a_fraction_of_whole_samples():
    rng = np.random.default_rng(0)
    q = torch.randn(2000, 1, 4, 4) + 5.0
    out = diff.drop_condition(rng, q, 0.1)
    zero = (out == 0).flatten(1).all(1)
    kept = ~zero
    assert 0.08 < float(zero.float().mean()) < 0.12
    assert torch.equal(out[kept], q[kept])
    assert torch.equal(diff.drop_condition(rng, q, 0.0), q)


def test_teacher_stage_drops_conditions(data, tmp_path, monkeypatch):
    seen = []

    def spy(rng, q, p):
        out = diff.drop_condition(rng, q, p)
        seen.append(((out == 0).flatten(1).all(1)).float().mean().item())
        return out

    monkeypatch.setattr(st, "drop_condition", spy)
    st.train_teacher(data, tiny(cond_dropout=0.5, teacher_steps=20), 0, tmp_path, quiet=True)
    assert len(seen) == 20 and 0.3 < np.mean(seen) < 0.7
    seen.clear()
    st.train_teacher(data, tiny(teacher_steps=5), 0, tmp_path, quiet=True)
    assert seen == []  # off: not even called (the random stream is the one before the switch)


# ------------------------------------------------------------------------------- min-SNR-γ


def test_min_snr_weights_follow_the_formula():
    sched = train_scheduler()
    t = torch.tensor([0, 20, 100, 300, 500, 700, 900, 999])
    a = sched.alphas_cumprod[t].double()
    snr = a / (1 - a)
    w = diff.min_snr_weight(sched, t, 5.0)
    expect = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1)
    assert torch.allclose(w.double(), expect, rtol=1e-6)
    assert w[0] == pytest.approx(5.0 / (float(snr[0]) + 1), rel=1e-5)  # high SNR: γ / (SNR + 1)
    assert float(w[-1]) < 1e-6  # zero-terminal SNR: no weight at t = 999
    assert torch.all(w <= 1.0) and torch.all(w >= 0.0)
    # below γ the weight is SNR / (SNR + 1), rising with the SNR
    low = snr < 5
    assert torch.allclose(w.double()[low], (snr / (snr + 1))[low], rtol=1e-6)


def test_teacher_stage_with_min_snr_changes_the_loss(data, tmp_path):
    runs = {}
    for gamma in (0.0, 5.0):
        out = tmp_path / f"g{gamma}"
        out.mkdir()
        st.train_teacher(data, tiny(min_snr_gamma=gamma, teacher_steps=20), 0, out, quiet=True)
        runs[gamma] = np.loadtxt(out / "teacher_loss.csv", delimiter=",", skiprows=1, ndmin=2)
    assert np.all(np.isfinite(runs[5.0][:, 1]))
    # the same batches and timesteps, weighted: every weight is <= 1, so the loss is lower
    assert runs[5.0][0, 1] < runs[0.0][0, 1]


# ------------------------------------------------------------------------ unit-variance latents


def test_standardise_latents_folds_exactly_into_the_encoder():
    torch.manual_seed(0)
    vae = st.make_vae(TINY).eval()
    dapi = np.random.default_rng(0).random((3, 64, 64)).astype(np.float32)
    raw = st.encode_latents(vae, dapi)
    x = torch.from_numpy(dapi)[:, None]
    with torch.no_grad():
        _, logvar0 = vae.encode(x)
    stats = st.standardise_latents(vae, raw)
    shift, scale = np.array(stats["shift"]), np.array(stats["scale"])
    new = st.encode_latents(vae, dapi)
    ref = (raw - shift[None, :, None, None]) * scale[None, :, None, None]
    assert np.allclose(new, ref, atol=1e-4)
    per = new.transpose(1, 0, 2, 3).reshape(new.shape[1], -1)
    assert np.allclose(per.mean(1), 0, atol=1e-4) and np.allclose(per.std(1), 1, atol=1e-3)
    with torch.no_grad():
        _, logvar = vae.encode(x)
    want = (logvar0 + 2 * torch.log(torch.tensor(scale)).float().view(1, -1, 1, 1)).clamp(-20, 10)
    assert torch.allclose(logvar, want, atol=1e-4)  # the posterior's spread scales alike


# ---------------------------------------------------------------------------------- guidance


def test_zero_init_guidance_projection_starts_equal_to_the_teacher():
    teacher = _unet(0)
    student = st.guided_student(teacher, tiny(guidance_embed=True, cond_dropout=0.1))
    assert student.guidance_embed and not teacher.guidance_embed
    assert not student.guidance_proj.weight.detach().any()
    z, t, q = _inputs()
    with torch.no_grad():
        ref = teacher(z, t, q)
        for w in (None, 0.0, 1.0, 2.5, 7.0, torch.tensor([1.0, 2.0, 3.0])):
            assert torch.equal(student(z, t, q, w), ref), w
        # the input is wired: a non-zero projection makes w matter
        student.guidance_proj.weight.normal_(0, 0.5)
        assert not torch.allclose(student(z, t, q, 1.0), student(z, t, q, 3.0))
        assert torch.equal(student(z, t, q), student(z, t, q, student.guidance_default))
    assert st.guided_student(teacher, TINY) is teacher  # off: the teacher itself, as before
    with pytest.raises(ValueError, match="no guidance input"):
        teacher(z, t, q, 2.0)


def test_guided_target_differs_from_unguided_when_w_is_not_one():
    teacher = _unet(1)
    target = st.guided_student(teacher, tiny(guidance_embed=True, cond_dropout=0.1))
    sched, lcm = train_scheduler(), lcm_scheduler()
    z, _, q = _inputs()
    start_t = torch.tensor([999, 519, 99])
    t = start_t - 20
    plain = diff.lcd_target(lcm, sched, teacher, teacher, z, start_t, t, q)
    one = diff.lcd_target(lcm, sched, teacher, target, z, start_t, t, q, torch.ones(3))
    two = diff.lcd_target(lcm, sched, teacher, target, z, start_t, t, q, torch.full((3,), 2.0))
    assert torch.allclose(one, plain, atol=1e-5)  # w = 1: the conditional prediction
    assert (two - plain).abs().mean() > 1e-3
    # w extrapolates linearly away from the unconditional teacher (the target is still the
    # teacher at init, so the step's result is linear in v too)
    zero = diff.lcd_target(lcm, sched, teacher, target, z, start_t, t, q, torch.zeros(3))
    assert torch.allclose(two - one, one - zero, atol=1e-4)


def test_guided_distillation_needs_a_dropout_teacher(data, tmp_path):
    with pytest.raises(ValueError, match="cond_dropout"):
        st.distill_lcm(data, _unet(0), tiny(guidance_embed=True, lcm_steps=2), 0, tmp_path, True)


def test_guided_distillation_trains_the_guidance_input(data, tmp_path):
    p = tiny(guidance_embed=True, cond_dropout=0.1, lcm_steps=15)
    student = st.distill_lcm(data, _unet(0), p, 0, tmp_path, quiet=True)
    assert student.guidance_embed
    assert float(student.guidance_proj.weight.abs().sum()) > 0
    z, t, q = _inputs()
    with torch.no_grad():
        assert not torch.equal(student(z, t, q, 1.0), student(z, t, q, 3.0))


# ------------------------------------------------------------------- all switches in a recipe


EVERY_SWITCH = tiny(
    cond_dropout=0.2,
    min_snr_gamma=5.0,
    unit_latents=True,
    guidance_embed=True,
    guidance_default=2.0,
    teacher_steps=15,
    lcm_steps=10,
    polish_steps=5,
)


@pytest.fixture(scope="module")
def every_switch(tmp_path_factory):
    """A tiny run with every switch on: a condition-dropout teacher and a guided LCM."""
    out = tmp_path_factory.mktemp("every-switch")
    return train.run_recipe(EVERY_SWITCH, out, stages=["vae", "decoder", "teacher", "lcm",
                            "polish"], quiet=True)  # fmt: skip


def test_recipe_with_every_switch_saves_and_loads(every_switch):
    p, paths = EVERY_SWITCH, every_switch
    teacher = ck.load_checkpoint(paths["teacher"])
    lcm = ck.load_checkpoint(paths["lcm"])
    assert "guidance_embed" not in teacher.config["architecture"]["unet"]["kwargs"]
    kw = lcm.config["architecture"]["unet"]["kwargs"]
    assert kw["guidance_embed"] is True and kw["guidance_default"] == 2.0
    assert "guidance_proj.weight" in lcm.sub("unet")
    prov = lcm.config["provenance"]["preset"]
    assert prov["cond_dropout"] == 0.2 and prov["min_snr_gamma"] == 5.0
    assert prov["unit_latents"] is True and prov["guidance_embed"] is True
    # unit latents: the checkpoint's encoder gives ~zero-mean, unit-std channels on the training set
    stdz = lcm.config["latent_standardisation"]
    assert len(stdz["shift"]) == len(stdz["scale"]) == p.latent_channels
    assert lcm.config["latent_scale"] == pytest.approx(1.0, abs=1e-3)
    vae = st.make_inference_vae(p)
    ck.load_into(vae.encoder, lcm.sub("encoder"), "encoder")
    z = st.encode_latents(vae.eval(), train.make_training_data(p, 0).dapi)
    per = z.transpose(1, 0, 2, 3).reshape(z.shape[1], -1)
    assert np.allclose(per.mean(1), 0, atol=1e-3) and np.allclose(per.std(1), 1, atol=1e-3)
    # both load as predictors; the guided LCM runs at its default guidance
    for name in ("teacher", "lcm"):
        pred = load_predictor(paths[name], steps=1, device="cpu")
        noise = torch.randn(
            1, *pred.noise_shape(64, 64), generator=torch.Generator().manual_seed(0)
        )
        y = pred(torch.zeros(1, 1, 64, 64), noise)
        assert y.shape == (1, 1, 64, 64) and torch.isfinite(y).all()
    moved = presets_mod.transfer_preset(TINY, lcm.config, None)
    assert moved.guidance_embed  # transfer keeps the guidance input (its weights must load)
    # what each accepts is recorded: the guided LCM its trained range, the teacher CFG from 1
    assert lcm.config["guidance"] == {"min": 1.0, "max": 3.0, "default": 2.0}
    assert teacher.config["guidance"] == {"min": 1.0, "max": 3.0, "default": 2.0}


def _run(pred, seed=0):
    noise = torch.randn(1, *pred.noise_shape(64, 64), generator=torch.Generator().manual_seed(seed))
    q = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(seed + 1))
    return pred(q, noise)


def test_guided_lcm_takes_the_guidance_as_an_input(every_switch):
    pred = load_predictor(every_switch["lcm"], device="cpu")
    assert pred.guidance == 2.0  # the trained default
    low, high = pred.with_guidance(1.0), pred.with_guidance(3.0)
    assert (low.guidance, high.guidance, pred.guidance) == (1.0, 3.0, 2.0)  # copies
    assert low.unet is pred.unet  # sharing the networks
    assert not torch.equal(_run(low), _run(high))
    assert torch.equal(_run(pred), _run(load_predictor(every_switch["lcm"], device="cpu",
                                                       guidance=2.0)))  # fmt: skip
    for bad in (0.5, 3.5, float("nan")):
        with pytest.raises(ValueError, match="guidance must be 1-3 for this model"):
            pred.with_guidance(bad)
    with pytest.raises(ValueError, match="guidance must be a number"):
        load_predictor(every_switch["lcm"], device="cpu", guidance="strong")


def test_dropout_teacher_samples_with_classifier_free_guidance(every_switch, monkeypatch):
    pred = load_predictor(every_switch["teacher"], steps=2, device="cpu", guidance=1.0)
    assert pred.guidance == 1.0
    assert load_predictor(every_switch["teacher"], steps=2, device="cpu").guidance == 2.0
    calls = []
    real = pred.unet.forward

    def spy(z, t, q, *rest):
        calls.append(len(z))
        return real(z, t, q, *rest)

    monkeypatch.setattr(pred.unet, "forward", spy)
    plain = _run(pred)
    assert calls == [1, 1]  # w = 1: the conditional model alone, one pass a step
    guided = pred.with_guidance(2.5)
    calls.clear()
    y = _run(guided)
    assert calls == [2, 2]  # conditional and unconditional branches in one batch
    assert not torch.allclose(y, plain)
    with pytest.raises(ValueError, match="guidance must be 1-3"):
        pred.with_guidance(4.0)


def test_models_without_guidance_accept_only_one(tmp_path):
    paths = train.run_recipe(tiny(teacher_steps=3, lcm_steps=3), tmp_path,
                             stages=["vae", "decoder", "teacher", "lcm"], quiet=True)  # fmt: skip
    for name in ("teacher", "lcm"):
        pred = load_predictor(paths[name], steps=1, device="cpu")
        assert pred.guidance is None
        assert pred.with_guidance(1.0) is pred and pred.with_guidance(None) is pred
        with pytest.raises(ValueError, match="has no guidance control"):
            pred.with_guidance(2.0)


def test_unit_latents_need_a_thin_decoder(tmp_path):
    with pytest.raises(ValueError, match="decoder_steps"):
        train.run_recipe(tiny(unit_latents=True, decoder_steps=0, vae_steps=2), tmp_path,
                         stages=["vae"], quiet=True)  # fmt: skip


def test_guidance_projection_learns_at_its_own_rate():
    from napari_lcm_stain.training.loop import cosine_lr

    student = st.guided_student(_unet(0), tiny(guidance_embed=True, cond_dropout=0.1))
    groups = st.lcm_param_groups(student, tiny(guidance_embed=True, guidance_lr_mult=10.0))
    assert len(groups) == 2 and groups[1]["lr_mult"] == 10.0
    assert groups[1]["params"] == [student.guidance_proj.weight]
    assert sum(t.numel() for g in groups for t in g["params"]) == sum(
        t.numel() for t in student.parameters()
    )
    opt = torch.optim.AdamW(groups, lr=1e-4)
    cosine_lr(opt, 1e-4, step=100, total=200, warmup=10)
    assert opt.param_groups[1]["lr"] == pytest.approx(10 * opt.param_groups[0]["lr"])
    assert len(st.lcm_param_groups(_unet(0), TINY)) == 1  # unguided: one group, as before


def test_anchor_fade_changes_only_guided_distillation(data, tmp_path):
    losses = {}
    for fade in (False, True):
        out = tmp_path / f"fade{fade}"
        out.mkdir()
        p = tiny(guidance_embed=True, cond_dropout=0.1, lcm_steps=10, anchor_fade=fade)
        st.distill_lcm(data, _unet(0), p, 0, out, quiet=True)
        losses[fade] = np.loadtxt(out / "lcm_loss.csv", delimiter=",", skiprows=1, ndmin=2)
    # the same batches, w and timesteps: the faded anchor (weight <= 1 per sample) lowers the loss
    assert losses[True][0, 1] < losses[False][0, 1]


def test_guidance_distillation_learns_the_lcms_own_guided_output(data, tmp_path):
    """LCD without guidance, then a guided copy regressed onto uncond + w·(cond − uncond) of
    the LCM itself: w = 1 stays that LCM, and the guided copy moves towards the guided target."""
    lcm_net = _unet(3)
    p = tiny(guidance_embed=True, cond_dropout=0.1, guidance_distill_steps=150, lr=1e-3)
    guided_net = st.distill_guidance(data, lcm_net, p, 0, tmp_path, quiet=True)
    assert guided_net.guidance_embed and (tmp_path / "guidance_loss.csv").exists()
    sched, lcm = train_scheduler(), lcm_scheduler()
    z, _, q = _inputs()
    t = torch.full((3,), 999)
    with torch.no_grad():
        cond = diff.consistency(lcm, sched, lcm_net, z, t, q)
        uncond = diff.consistency(lcm, sched, lcm_net, z, t, torch.zeros_like(q))
        w = torch.full((3,), 3.0)
        target = diff.guided(cond, uncond, w)
        start = (cond - target).abs().mean()  # the zero-initialised copy gives cond at every w
        after = (diff.consistency(lcm, sched, guided_net, z, t, q, w) - target).abs().mean()
    assert after < 0.95 * start  # (slow on the tiny U-Net; the release measures it at size)
    # in a recipe: the LCM stage distils unguided first (its loss log), then the guidance
    paths = train.run_recipe(
        tiny(guidance_embed=True, cond_dropout=0.1, guidance_distill_steps=5, teacher_steps=3,
             lcm_steps=3), tmp_path / "run", stages=["vae", "decoder", "teacher", "lcm"],
        quiet=True,
    )  # fmt: skip
    assert (tmp_path / "run" / "lcm_loss.csv").exists()
    assert (tmp_path / "run" / "guidance_loss.csv").exists()
    lcm_ckpt = ck.load_checkpoint(paths["lcm"])
    assert "guidance_proj.weight" in lcm_ckpt.sub("unet")
    assert lcm_ckpt.config["guidance"]["max"] == 3.0


def test_an_lcm_can_be_guided_classifier_free(every_switch, tmp_path, monkeypatch):
    """`guidance.method = "cfg"`: the LCM runs both branches (its guidance input at 1) and
    combines them, as the teacher does; the method is checked by the config schema."""
    import json
    import shutil

    for ext in ("safetensors", "json"):
        shutil.copy(every_switch["lcm"].with_suffix(f".{ext}"), tmp_path / f"lcm.{ext}")
    cfg = json.loads((tmp_path / "lcm.json").read_text())
    cfg["guidance"]["method"] = "cfg"
    (tmp_path / "lcm.json").write_text(json.dumps(cfg))
    pred = load_predictor(tmp_path / "lcm.safetensors", device="cpu", guidance=2.5)
    assert pred.guidance_method == "cfg"
    seen = []
    real = pred.unet.forward

    def spy(z, t, q, *rest):
        seen.append((len(z), rest))
        return real(z, t, q, *rest)

    monkeypatch.setattr(pred.unet, "forward", spy)
    y = _run(pred)
    assert seen == [(2, (1.0,))]  # one step, both branches at w = 1
    with torch.no_grad():
        noise = torch.randn(
            1, *pred.noise_shape(64, 64), generator=torch.Generator().manual_seed(0)
        )
        q = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(1))
        z, t = noise[:, 0], torch.full((1,), pred.timesteps[0])
        v_c, v_u = real(z, t, q, 1.0), real(z, t, torch.zeros_like(q), 1.0)
    v = v_u + 2.5 * (v_c - v_u)
    x0 = pred.scheduler.step(v, pred.timesteps[0], z).denoised
    assert torch.allclose(y, pred.decoder(x0 / pred.latent_scale).clamp(0, 1), atol=1e-5)
    cfg["guidance"]["method"] = "sideways"
    (tmp_path / "lcm.json").write_text(json.dumps(cfg))
    with pytest.raises(ck.CheckpointError, match="method"):
        load_predictor(tmp_path / "lcm.safetensors", device="cpu")


def test_set_guidance_changes_the_packaged_default(monkeypatch, tmp_path, every_switch):
    import shutil

    from napari_lcm_stain.training import packaging

    for ext in ("safetensors", "json"):
        shutil.copy(every_switch["lcm"].with_suffix(f".{ext}"), tmp_path / f"lcm.{ext}")
    monkeypatch.setattr(ck, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setattr(ck, "record_packaged_hashes", lambda: None)
    g = packaging.set_guidance("lcm", default=1.2, method="cfg")
    assert g == {"min": 1.0, "max": 3.0, "default": 1.2, "method": "cfg"}
    assert load_predictor(tmp_path / "lcm.safetensors", device="cpu").guidance == 1.2
    with pytest.raises(ValueError, match="guidance must be 1-3"):
        packaging.set_guidance("lcm", default=5.0)
    with pytest.raises(ValueError, match="method must be"):
        packaging.set_guidance("lcm", method="sideways")
