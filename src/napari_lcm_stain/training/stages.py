"""The six training stages and the networks they build. Each stage is one `loop.optimise` call
with its own loss; the recipe (`recipe.py`) decides which run, in what order, and saves them.

VAE -> thin inference decoder refit -> conditional latent teacher (v-prediction) -> latent
consistency distillation -> decoder polish on LCM latents -> Pix2Pix baseline.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models import VAE, LatentUNet, PatchDiscriminator, Pix2PixGenerator, build
from ..sampling import lcm_scheduler, train_scheduler
from .data import PairedData
from .diffusion import (
    consistency,
    drop_condition,
    guided,
    lcd_target,
    lcm_solver_grid,
    min_snr_weight,
    sample_guidance,
    sample_timesteps,
)
from .loop import ddp, dist_info, ema_update, optimise, seed_stage, unwrap
from .presets import TrainPreset

CPU = torch.device("cpu")

# ------------------------------------------------------------------------------- the networks


def arch(module_cls, **kwargs) -> dict:
    """An architecture entry of a checkpoint config (`models.build` turns it back into a net)."""
    return {"class": module_cls.__name__, "kwargs": kwargs}


def make_unet(p: TrainPreset, stage: str = "teacher") -> LatentUNet:
    return build(unet_arch(p, stage))


def unet_arch(p: TrainPreset, stage: str = "teacher") -> dict:
    """The U-Net's config entry for a stage ("teacher" or "lcm"); `cond_channels` only when set
    and the guidance input only for a guided LCM (`p.guidance_embed`), so configs (and
    checkpoints) of the network without them stay as they were."""
    extra = {"cond_channels": list(p.unet_cond_channels)} if p.unet_cond_channels else {}
    if stage == "lcm" and p.guidance_embed:
        extra.update(guidance_embed=True, guidance_default=float(p.guidance_default))
    return arch(
        LatentUNet,
        latent_channels=p.latent_channels,
        factor=p.latent_factor,
        channels=list(p.unet_channels),
        **extra,
    )


def guidance_config(p: TrainPreset, stage: str) -> dict | None:
    """What a latent checkpoint records of the guidance it accepts (`_params.check_guidance`):
    a guided LCM its trained range of w, a teacher trained with condition dropout the same
    range for classifier-free guidance (the LCM learns to give at w what the guided teacher
    gives at w, so one default serves both); None for every other model."""
    if (stage == "lcm" and p.guidance_embed) or (stage == "teacher" and p.cond_dropout > 0):
        return {"min": p.guidance_min, "max": p.guidance_max, "default": p.guidance_default}
    return None


def make_vae(p: TrainPreset) -> VAE:
    return VAE(p.latent_channels, p.vae_channels, p.vae_channels, p.latent_factor)


def make_inference_vae(p: TrainPreset) -> VAE:
    """The VAE the stain checkpoints carry: the training VAE, or its refitted thin decoder."""
    return build(vae_arch(p, inference=True))


def vae_arch(p: TrainPreset, inference: bool = False) -> dict:
    thin = {}
    if inference and p.decoder_steps > 0:
        thin = dict(
            dec_quarter_channels=p.dec_quarter_channels,
            dec_half_channels=p.dec_half_channels,
            dec_half_conv=p.dec_half_conv,
        )
        if p.texture:  # only when on: configs of deterministic decoders stay as they were
            thin["dec_texture"] = True
    return arch(
        VAE,
        latent_channels=p.latent_channels,
        enc_channels=p.vae_channels,
        dec_channels=p.vae_channels,
        factor=p.latent_factor,
        **thin,
    )


def pix2pix_arch(p: TrainPreset) -> dict:
    return arch(Pix2PixGenerator, ngf=p.pix2pix_ngf, depth=p.pix2pix_depth)


@torch.no_grad()
def encode_latents(vae: VAE, dapi):
    """Posterior means of the VAE for whole DAPI fields, in batches of 8; a list of planes (sizes
    may differ) gives a list of latents, one plane at a time."""
    if isinstance(dapi, list):
        return [vae.encode(torch.from_numpy(d)[None, None])[0][0].numpy() for d in dapi]
    out = []
    for i in range(0, len(dapi), 8):
        mean, _ = vae.encode(torch.from_numpy(dapi[i : i + 8])[:, None])
        out.append(mean.numpy())
    return np.concatenate(out)


def standardise_latents(vae: VAE, raw) -> dict:
    """Make the encoder's latents zero-mean and unit-variance per channel (`p.unit_latents`):
    the mean and std of `raw` (its posterior means of the training fields, an array or a list of
    planes) are folded, in place, into the encoder's last 1x1 convolution (mean rows scaled and
    shifted, log-variance rows shifted by 2·log scale), so encode() gives (raw - shift)·scale
    and nothing downstream changes. The training VAE's own decoder is not updated: the thin
    decoder (`decoder_steps` > 0) is fitted on the standardised latents. Returns the shift and
    scale (the checkpoint configs record them)."""
    c = vae.latent_channels
    chans = [r.reshape(-1, c, *r.shape[-2:]).transpose(1, 0, 2, 3).reshape(c, -1) for r in raw]
    flat = np.concatenate(chans, axis=1).astype(np.float64)
    shift, scale = flat.mean(axis=1), 1.0 / (flat.std(axis=1) + 1e-6)
    conv = vae.encoder[-1]
    s = torch.from_numpy(scale).float()
    with torch.no_grad():
        conv.weight[:c] *= s.view(-1, 1, 1, 1)
        conv.bias[:c] = (conv.bias[:c] - torch.from_numpy(shift).float()) * s
        conv.bias[c:] += 2.0 * torch.log(s)
    return {"shift": [float(v) for v in shift], "scale": [float(v) for v in scale]}


def reconstruction_loss(rec: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """L1 keeps edges sharp; the image-gradient L1 keeps chromatin texture."""
    gx = lambda a: a[..., :, 1:] - a[..., :, :-1]  # noqa: E731
    gy = lambda a: a[..., 1:, :] - a[..., :-1, :]  # noqa: E731
    return F.l1_loss(rec, d) + 0.5 * (F.l1_loss(gx(rec), gx(d)) + F.l1_loss(gy(rec), gy(d)))


def decoded(dec, z: torch.Tensor, d: torch.Tensor, nll_rows: int | None = None):
    """Decode `z` for a decoder stage: (the image a critic judges, the reconstruction loss).

    A texture decoder adds the Gaussian likelihood of the residual d - mean under its amplitude
    (the mean detached, so the likelihood only fits the amplitude) on the first `nll_rows` rows
    (None: all), and the image it returns is a sample, mean + amplitude x fresh noise."""
    mean, amp = dec(z, parts=True)
    loss = reconstruction_loss(mean, d)
    if amp is None:
        return mean, loss
    n = len(d) if nll_rows is None else nll_rows
    nll = F.gaussian_nll_loss(mean[:n].detach(), d[:n], amp[:n].pow(2), eps=1e-8)
    return mean + amp * torch.randn_like(mean), loss + nll


def latent_grid_excess(fake: torch.Tensor, real: torch.Tensor, factor: int) -> torch.Tensor:
    """How much more power the decoded crops put at the latent grid's period (`factor` px and
    its harmonics) than the true crops: mean over harmonics of relu(log10 ratio), from the
    column- and row-mean spectra of the batch. A deterministic decoder pushed towards texture
    draws it cell by cell from the latent, a visible grid (`scripts/grid_artefact.py`)."""

    def power(x: torch.Tensor) -> torch.Tensor:
        out = []
        for dim in (-2, -1):  # column means, then row means
            m = x.mean(dim=dim)
            spec = torch.fft.rfft(m - m.mean(dim=-1, keepdim=True), dim=-1).abs() ** 2
            n = m.shape[-1]
            idx = [n * k // factor for k in range(1, factor // 2 + 1) if n % factor == 0]
            out.append(spec[..., idx].mean(dim=0) / (spec.mean(dim=(0, -1)) + 1e-12))
        return torch.cat(out, dim=-1).flatten()

    ratio = torch.log10(power(fake) + 1e-8) - torch.log10(power(real).detach() + 1e-8)
    return F.relu(ratio).mean()


class RealismCritic:
    """A realism term for a stage whose output is a DAPI image: a PatchGAN critic that learns
    true from generated crops (hinge loss, one update per step), and for the generator a
    non-saturating adversarial loss plus feature matching (L1 between the critic's hidden
    activations on generated and true crops) and an optional latent-grid penalty
    (`latent_grid_excess`). L1 alone makes the mean of all plausible stains, a blur; the critic
    penalises that blur, as latent diffusion's own autoencoders and adversarial distillation do.
    `conditional`: the critic also sees the qOBM crop (as Pix2Pix's), so it can judge whether
    the stain fits the input, not only whether it looks like DAPI. Off when both weights are 0:
    then it trains nothing and returns the stage's own loss, plus the grid term if `grid` > 0."""

    def __init__(
        self, weight, fm, grid, start, ndf, factor, conditional=False, dev=CPU
    ):  # fmt: skip
        self.weight, self.fm, self.grid = float(weight), float(fm), float(grid)
        self.start, self.factor, self.conditional = int(start), int(factor), conditional
        self.on = self.weight > 0 or self.fm > 0
        self.history: list[tuple[float, ...]] = []
        if self.on:
            disc = PatchDiscriminator(ndf, in_channels=2 if conditional else 1)
            self.disc = ddp(disc.to(dev))
            self.opt = torch.optim.Adam(self.disc.parameters(), lr=2e-4, betas=(0.5, 0.999))

    @classmethod
    def for_decoder(cls, p: TrainPreset, steps: int, dev=CPU) -> RealismCritic:
        """The decoder and polish stages' critic (unconditional: the decoder only renders)."""
        start = p.adv_start * steps
        return cls(p.adv_weight, p.fm_weight, p.grid_weight, start, p.adv_ndf, p.latent_factor,
                   dev=dev)  # fmt: skip

    @classmethod
    def for_lcm(cls, p: TrainPreset, steps: int, dev=CPU) -> RealismCritic:
        """Adversarial distillation: a conditional critic on the decoded one-step output."""
        start = p.adv_start * steps
        return cls(p.lcm_adv_weight, 0.0, 0.0, start, p.adv_ndf, p.latent_factor, True, dev)

    def __call__(self, step, fake, base, real, cond=None) -> torch.Tensor:
        """One critic update; returns `base` (the stage's own loss) plus, from `start` on, the
        weighted adversarial, feature-matching and grid terms for `fake`."""
        if not self.on:  # no critic; a grid weight alone still applies its term
            if self.grid and step >= self.start:
                return base + self.grid * latent_grid_excess(fake, real, self.factor)
            return base
        pair = (lambda x: torch.cat([cond, x], 1)) if self.conditional else (lambda x: x)
        logits = self.disc(torch.cat([pair(real), pair(fake.detach())]))  # one forward: DDP
        real_logit, fake_logit = logits.chunk(2)
        loss_d = F.relu(1 - real_logit).mean() + F.relu(1 + fake_logit).mean()
        self.opt.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt.step()
        if step < self.start:
            return base
        feats = unwrap(self.disc).features(torch.cat([pair(fake), pair(real)]))
        halves = [f.chunk(2) for f in feats]
        adv = -halves[-1][0].mean()
        fm = sum(F.l1_loss(f, r.detach()) for f, r in halves[:-1]) / (len(halves) - 1)
        grid = latent_grid_excess(fake, real, self.factor) if self.grid else fake.new_zeros(())
        self.history.append((step, base.item(), loss_d.item(), adv.item(), fm.item(), grid.item()))
        return base + self.weight * adv + self.fm * fm + self.grid * grid

    def save(self, out: Path, stage: str) -> None:
        """`<stage>_critic.csv`: per step once the terms apply, the stage's own loss
        (reconstruction; LCD + anchor for the LCM), the critic's hinge loss, the adversarial,
        feature-matching and grid terms (the stage's CSV has only their weighted sum)."""
        if self.on and dist_info()[0] == 0:
            rows = "".join(",".join(f"{v:.6g}" for v in row) + "\n" for row in self.history)
            head = "step,base,critic,adversarial,feature_match,grid\n"
            (out / f"{stage}_critic.csv").write_text(head + rows)


# ------------------------------------------------------------------------------------ stages


def train_vae(data: PairedData, p: TrainPreset, seed: int, out: Path, quiet=False, dev=CPU) -> VAE:
    rng = seed_stage("vae", seed)
    vae = ddp(make_vae(p).to(dev))
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)

    def step_fn(step):
        _, d, _ = data.batch(rng, p.batch, p.vae_crop, device=dev)
        rec, mean, logvar = vae(d)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        return reconstruction_loss(rec, d) + 1e-5 * kl  # tiny KL keeps z smooth

    optimise("vae", p.vae_steps, opt, step_fn, p, out, quiet, lr=1e-3, device=dev)
    return unwrap(vae).eval()


def train_decoder(
    data: PairedData,
    vae: VAE,
    p: TrainPreset,
    seed: int,
    out: Path,
    quiet=False,
    dev=CPU,
    *,
    init=None,
):
    """Refit the thin inference decoder on the frozen VAE encoder (latents sampled as in the VAE
    stage). Returns a VAE holding the original encoder and the new decoder. `init`: a thin
    decoder's state dict to start from (transfer) instead of random weights."""
    rng = seed_stage("decoder", seed)
    slim = make_inference_vae(p)
    slim.encoder.load_state_dict(vae.encoder.state_dict())
    if init is not None:
        slim.decoder.load_state_dict(slim.decoder.with_texture_defaults(init))
    slim.to(dev)
    slim.encoder.requires_grad_(False).eval()
    dec = ddp(slim.decoder)
    opt = torch.optim.Adam(dec.parameters(), lr=1e-3)
    critic = RealismCritic.for_decoder(p, p.decoder_steps, dev)

    def step_fn(step):
        _, d, _ = data.batch(rng, p.batch, p.vae_crop, p.latent_factor, device=dev)
        with torch.no_grad():
            z = slim.reparameterize(*slim.encode(d))
        return critic(step, *decoded(dec, z, d), d)

    optimise("decoder", p.decoder_steps, opt, step_fn, p, out, quiet, lr=1e-3, device=dev)
    critic.save(out, "decoder")
    return slim.eval()


def polish_decoder(
    data: PairedData,
    thin: VAE,
    student: LatentUNet,
    latent_scale: float,
    p: TrainPreset,
    seed: int,
    out: Path,
    quiet=False,
    dev=CPU,
) -> VAE:
    """Tune the thin decoder on half encoder latents, half the LCM's 1-step latents of the same
    crops (fresh noise each step), against the true DAPI. Returns `thin` with the tuned decoder."""
    rng = seed_stage("polish", seed)
    lcm = lcm_scheduler()
    lcm.set_timesteps(1)
    t = int(lcm.timesteps[0])
    thin.to(dev).encoder.requires_grad_(False).eval()
    student.to(dev).requires_grad_(False).eval()
    dec = ddp(thin.decoder)
    opt = torch.optim.Adam(dec.parameters(), lr=3e-4)
    half = max(1, p.batch // 2)
    f = p.latent_factor
    critic = RealismCritic.for_decoder(p, p.polish_steps, dev)

    def step_fn(step):
        q, d, _ = data.batch(rng, p.batch, p.vae_crop, f, latents=False, device=dev)
        with torch.no_grad():
            z_enc = thin.reparameterize(*thin.encode(d[:half]))
            shape = (len(d) - half, p.latent_channels, d.shape[-2] // f, d.shape[-1] // f)
            noise = torch.randn(shape, device=dev)
            v = student(noise, torch.full((len(noise),), t, device=dev), q[half:])
            z_lcm = lcm.step(v, t, noise).denoised / latent_scale
        # the texture amplitude learns only from encoder latents: on the LCM's, the residual is
        # mostly the student's error, which noise must not imitate
        fake, loss = decoded(dec, torch.cat([z_enc, z_lcm]), d, nll_rows=half)
        return critic(step, fake, loss, d)

    optimise("polish", p.polish_steps, opt, step_fn, p, out, quiet, lr=3e-4, device=dev)
    critic.save(out, "polish")
    return thin.eval()


def train_teacher(
    data: PairedData, p: TrainPreset, seed: int, out: Path, quiet=False, dev=CPU, *, init=None
):
    """The conditional latent diffusion teacher (v-prediction); returns its EMA weights.
    `init`: a U-Net state dict to start from (transfer)."""
    rng = seed_stage("teacher", seed)
    sched = train_scheduler()
    unet = make_unet(p)
    if init is not None:
        unet.load_state_dict(init)
    unet = ddp(unet.to(dev))
    ema = copy.deepcopy(unwrap(unet)).eval()
    opt = torch.optim.AdamW(unet.parameters(), lr=p.lr, weight_decay=1e-4)

    def step_fn(step):
        q, _, z0 = data.batch(rng, p.batch, p.crop, p.latent_factor, device=dev)
        noise = torch.randn_like(z0)
        t = sample_timesteps(rng, z0.shape[0], p.high_t_fraction, p.high_t_min).to(dev)
        if p.cond_dropout > 0:  # classifier-free guidance: some samples see no qOBM
            q = drop_condition(rng, q, p.cond_dropout)
        z_t = sched.add_noise(z0, noise, t)
        target = sched.get_velocity(z0, noise, t)
        if p.min_snr_gamma > 0:
            per_sample = (unet(z_t, t, q) - target).pow(2).mean(dim=(1, 2, 3))
            return (min_snr_weight(sched, t, p.min_snr_gamma) * per_sample).mean()
        return F.mse_loss(unet(z_t, t, q), target)

    def ema_step(step):
        ema_update(ema, unwrap(unet), p.ema_teacher if step > 200 else 0.0)

    optimise(
        "teacher", p.teacher_steps, opt, step_fn, p, out, quiet,
        lr=p.lr, clip=unet, after_step=ema_step, device=dev,
    )  # fmt: skip
    return ema


def distill_lcm(
    data: PairedData,
    teacher,
    p: TrainPreset,
    seed: int,
    out: Path,
    quiet=False,
    dev=CPU,
    anchor_weight: float | None = None,
    *,
    init=None,
    decoder=None,
    latent_scale: float = 1.0,
):
    """Latent consistency distillation with a skipping-step DDIM solver and an EMA target.

    `anchor_weight` adds an L1 term pulling the student's one-step estimate to the true latent
    (possible because our data are paired); 0 gives plain LCD. `init`: an LCM U-Net state dict
    that student and EMA target start from (transfer) instead of the teacher's weights. With
    `p.lcm_adv_weight` > 0, the student's estimate is decoded by `decoder` (frozen; latents are
    divided by `latent_scale`) and a conditional critic adds an adversarial term (adversarial
    distillation, `RealismCritic.for_lcm`); with `p.lcm_pixel_weight` > 0 the decoded estimate
    also gets the pixel reconstruction loss against the true DAPI crop.
    """
    if p.guidance_embed and p.guidance_distill_steps > 0:  # unguided LCD, then guidance
        plain = replace(p, guidance_embed=False)
        if init is not None:  # a guided init (a transfer from a guided release): its LCD part
            init = {k: v for k, v in init.items() if not k.startswith("guidance_proj.")}
        lcm_net = distill_lcm(
            data, teacher, plain, seed, out, quiet, dev, anchor_weight, init=init,
            decoder=decoder, latent_scale=latent_scale,
        )  # fmt: skip
        return distill_guidance(data, lcm_net, p, seed, out, quiet, dev)
    anchor_weight = p.anchor_weight if anchor_weight is None else anchor_weight
    rng = seed_stage("lcm", seed)
    sched = train_scheduler()
    lcm = lcm_scheduler()
    grid, k = lcm_solver_grid()
    teacher = teacher.to(dev).eval().requires_grad_(False)
    guide = bool(p.guidance_embed)
    if guide and p.cond_dropout <= 0 and init is None:  # (transfer: the init's teacher)
        raise ValueError(
            "guidance_embed needs a teacher trained with cond_dropout > 0 (its unconditional "
            "branch is the teacher with the qOBM zeroed); set cond_dropout, e.g. 0.1"
        )
    first = guided_student(teacher, p)
    student = ddp(copy.deepcopy(first).train().requires_grad_(True))
    target = copy.deepcopy(first).eval().requires_grad_(False)
    if init is not None:
        init = target.with_guidance_defaults(init)
        unwrap(student).load_state_dict(init)
        target.load_state_dict(init)
    opt = torch.optim.AdamW(lcm_param_groups(unwrap(student), p), lr=p.lr * 0.2,
                            weight_decay=1e-4)  # fmt: skip
    c = p.huber_c
    critic = RealismCritic.for_lcm(p, p.lcm_steps, dev)
    pixel_weight = float(p.lcm_pixel_weight)
    if critic.on or pixel_weight > 0:
        if decoder is None:
            raise ValueError(
                "lcm_adv_weight or lcm_pixel_weight > 0 needs the decoder (both judge images)"
            )
        decoder = decoder.to(dev).eval().requires_grad_(False)

    def step_fn(step):
        q, d, z0 = data.batch(rng, p.batch, p.crop, p.latent_factor, device=dev)
        if p.cond_dropout > 0 and not guide:  # the LCM learns the unconditional branch too,
            q = drop_condition(rng, q, p.cond_dropout)  # for its own guidance (distill_guidance)
        idx = rng.integers(0, len(grid), size=z0.shape[0])
        start_t = torch.from_numpy(grid[idx]).long().to(dev)
        t = torch.clamp(start_t - k, min=0)
        noise = torch.randn_like(z0)
        w = None
        if guide:
            w = sample_guidance(rng, z0.shape[0], p.guidance_min, p.guidance_max).to(dev)
        z_start = sched.add_noise(z0, noise, start_t)
        pred = consistency(lcm, sched, student, z_start, start_t, q, w)
        tgt = lcd_target(lcm, sched, teacher, target, z_start, start_t, t, q, w)
        loss = torch.mean(torch.sqrt((pred - tgt) ** 2 + c**2) - c)
        if anchor_weight and guide and p.anchor_fade:
            fade = ((p.guidance_max - w) / (p.guidance_max - p.guidance_min)).clamp(0, 1)
            per_sample = (pred - z0).abs().mean(dim=(1, 2, 3))
            loss = loss + anchor_weight * (fade * per_sample).mean()
        elif anchor_weight:
            loss = loss + anchor_weight * F.l1_loss(pred, z0)
        if critic.on or pixel_weight > 0:
            image = decoder(pred / latent_scale)  # a texture decoder's mean: no grain here
            if pixel_weight > 0:
                loss = loss + pixel_weight * reconstruction_loss(image, d)
            loss = critic(step, image, loss, d, cond=q)
        return loss

    optimise(
        "lcm", p.lcm_steps, opt, step_fn, p, out, quiet,
        lr=p.lr * 0.2, warmup=20, clip=student, device=dev,
        after_step=lambda step: ema_update(target, unwrap(student), p.ema_target),
    )  # fmt: skip
    critic.save(out, "lcm")
    return target


def distill_guidance(
    data: PairedData, lcm_net: LatentUNet, p: TrainPreset, seed: int, out: Path, quiet=False,
    dev=CPU,
):  # fmt: skip
    """Guidance distillation of a consistency model (`p.guidance_distill_steps`): a copy of
    `lcm_net` with a zero-initialised guidance input learns to give, at guidance w, the
    classifier-free guided consistency output of `lcm_net` itself, f_u + w·(f_c − f_u), with
    the qOBM zeroed for f_u. A direct regression at the sampler's timesteps (half at t = 999,
    the one-step query; the rest on the 50-step grid), so it needs no bootstrap through the
    grid, and w = 1 stays the unguided LCM. Returns the guided network."""
    rng = seed_stage("guidance", seed)
    sched, lcm = train_scheduler(), lcm_scheduler()
    grid, _ = lcm_solver_grid()
    frozen = lcm_net.to(dev).eval().requires_grad_(False)
    student = ddp(copy.deepcopy(guided_student(frozen, p)).train().requires_grad_(True))
    # the stage's full rate (LCD runs at a fifth): a direct regression, no bootstrap to upset
    opt = torch.optim.AdamW(lcm_param_groups(unwrap(student), p), lr=p.lr, weight_decay=1e-4)
    c = p.huber_c

    def step_fn(step):
        q, _, z0 = data.batch(rng, p.batch, p.crop, p.latent_factor, device=dev)
        n = z0.shape[0]
        t = np.where(rng.random(n) < 0.5, grid[-1], grid[rng.integers(0, len(grid), size=n)])
        t = torch.from_numpy(t).long().to(dev)
        z_t = sched.add_noise(z0, torch.randn_like(z0), t)
        w = sample_guidance(rng, n, p.guidance_min, p.guidance_max).to(dev)
        with torch.no_grad():
            cond = consistency(lcm, sched, frozen, z_t, t, q)
            uncond = consistency(lcm, sched, frozen, z_t, t, torch.zeros_like(q))
            target = guided(cond, uncond, w)
        pred = consistency(lcm, sched, student, z_t, t, q, w)
        return torch.mean(torch.sqrt((pred - target) ** 2 + c**2) - c)

    optimise(
        "guidance", p.guidance_distill_steps, opt, step_fn, p, out, quiet,
        lr=p.lr, warmup=20, clip=student, device=dev,
    )  # fmt: skip
    return unwrap(student).eval()


def lcm_param_groups(student: LatentUNet, p: TrainPreset) -> list[dict]:
    """The student's parameters for the optimiser: one group, or with a guidance input its
    zero-initialised projection in a second group at `p.guidance_lr_mult` times the rate."""
    if not p.guidance_embed:
        return [{"params": list(student.parameters())}]
    proj = list(student.guidance_proj.parameters())
    ids = {id(t) for t in proj}
    rest = [t for t in student.parameters() if id(t) not in ids]
    return [{"params": rest}, {"params": proj, "lr_mult": float(p.guidance_lr_mult)}]


def guided_student(teacher: LatentUNet, p: TrainPreset) -> LatentUNet:
    """The network distillation starts from: the teacher itself, or with `p.guidance_embed` the
    LCM's guided U-Net holding the teacher's weights and a zero guidance projection (so it
    computes the teacher's function for every w)."""
    if not p.guidance_embed:
        return teacher
    net = make_unet(p, "lcm")
    net.load_state_dict(net.with_guidance_defaults(teacher.state_dict()))
    return net.to(next(teacher.parameters()).device).eval()


def train_pix2pix(
    data: PairedData, p: TrainPreset, seed: int, out: Path, quiet=False, dev=CPU, *, init=None
):
    """The lab's baseline: U-Net generator + PatchGAN, vanilla GAN loss + 100 L1 (Isola et al.).
    `init`: a generator state dict to start from (transfer; the discriminator starts fresh)."""
    rng = seed_stage("pix2pix", seed)
    gen = build(pix2pix_arch(p))
    if init is not None:
        gen.load_state_dict(init)
    gen = ddp(gen.to(dev))
    disc = ddp(PatchDiscriminator(2 * p.pix2pix_ngf).to(dev))
    parallel = dist_info()[1] > 1
    og = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
    od = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
    bce = torch.nn.BCEWithLogitsLoss()
    m = unwrap(gen).multiple
    crop = max(m, p.crop - p.crop % m)

    def step_fn(step):
        """One discriminator update here; the generator loss goes back to the loop."""
        q, d, _ = data.batch(rng, p.batch, crop, latents=False, device=dev)
        fake = gen(q)
        if parallel:  # DDP allows one forward per backward: real and fake in one batch
            logits = disc(torch.cat([q, q]), torch.cat([d, fake.detach()]))
            real_logit, fake_logit = logits.chunk(2)
        else:
            real_logit, fake_logit = disc(q, d), disc(q, fake.detach())
        loss_d = 0.5 * (
            bce(real_logit, torch.ones_like(real_logit))
            + bce(fake_logit, torch.zeros_like(fake_logit))
        )
        od.zero_grad(set_to_none=True)
        loss_d.backward()
        od.step()
        g_logit = disc(q, fake)
        return bce(g_logit, torch.ones_like(g_logit)) + 100.0 * F.l1_loss(fake, d)

    optimise("pix2pix", p.pix2pix_steps, og, step_fn, p, out, quiet, device=dev)
    return unwrap(gen).eval()
