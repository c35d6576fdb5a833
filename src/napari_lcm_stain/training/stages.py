"""The six training stages and the networks they build. Each stage is one `loop.optimise` call
with its own loss; the recipe (`recipe.py`) decides which run, in what order, and saves them.

VAE -> thin inference decoder refit -> conditional latent teacher (v-prediction) -> latent
consistency distillation -> decoder polish on LCM latents -> Pix2Pix baseline.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models import VAE, LatentUNet, PatchDiscriminator, Pix2PixGenerator, build
from ..sampling import lcm_scheduler, train_scheduler
from .data import PairedData
from .diffusion import consistency, eps_from_v, lcm_solver_grid, sample_timesteps, x0_from_v
from .loop import ddp, dist_info, ema_update, optimise, seed_stage, unwrap
from .presets import TrainPreset

CPU = torch.device("cpu")

# ------------------------------------------------------------------------------- the networks


def arch(module_cls, **kwargs) -> dict:
    """An architecture entry of a checkpoint config (`models.build` turns it back into a net)."""
    return {"class": module_cls.__name__, "kwargs": kwargs}


def make_unet(p: TrainPreset) -> LatentUNet:
    return LatentUNet(p.latent_channels, p.latent_factor, p.unet_channels)


def unet_arch(p: TrainPreset) -> dict:
    return arch(
        LatentUNet,
        latent_channels=p.latent_channels,
        factor=p.latent_factor,
        channels=list(p.unet_channels),
    )


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
def encode_latents(vae: VAE, dapi: np.ndarray) -> np.ndarray:
    """Posterior means of the VAE for whole DAPI fields, in batches of 8."""
    out = []
    for i in range(0, len(dapi), 8):
        mean, _ = vae.encode(torch.from_numpy(dapi[i : i + 8])[:, None])
        out.append(mean.numpy())
    return np.concatenate(out)


def reconstruction_loss(rec: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """L1 keeps edges sharp; the image-gradient L1 keeps chromatin texture."""
    gx = lambda a: a[..., :, 1:] - a[..., :, :-1]  # noqa: E731
    gy = lambda a: a[..., 1:, :] - a[..., :-1, :]  # noqa: E731
    return F.l1_loss(rec, d) + 0.5 * (F.l1_loss(gx(rec), gx(d)) + F.l1_loss(gy(rec), gy(d)))


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
    data: PairedData, vae: VAE, p: TrainPreset, seed: int, out: Path, quiet=False, dev=CPU
):
    """Refit the thin inference decoder on the frozen VAE encoder (latents sampled as in the VAE
    stage). Returns a VAE holding the original encoder and the new decoder."""
    rng = seed_stage("decoder", seed)
    slim = make_inference_vae(p)
    slim.encoder.load_state_dict(vae.encoder.state_dict())
    slim.to(dev)
    slim.encoder.requires_grad_(False).eval()
    dec = ddp(slim.decoder)
    opt = torch.optim.Adam(dec.parameters(), lr=1e-3)

    def step_fn(step):
        _, d, _ = data.batch(rng, p.batch, p.vae_crop, p.latent_factor, device=dev)
        with torch.no_grad():
            z = slim.reparameterize(*slim.encode(d))
        return reconstruction_loss(dec(z), d)

    optimise("decoder", p.decoder_steps, opt, step_fn, p, out, quiet, lr=1e-3, device=dev)
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

    def step_fn(step):
        q, d, _ = data.batch(rng, p.batch, p.vae_crop, f, latents=False, device=dev)
        with torch.no_grad():
            z_enc = thin.reparameterize(*thin.encode(d[:half]))
            shape = (len(d) - half, p.latent_channels, d.shape[-2] // f, d.shape[-1] // f)
            noise = torch.randn(shape, device=dev)
            v = student(noise, torch.full((len(noise),), t, device=dev), q[half:])
            z_lcm = lcm.step(v, t, noise).denoised / latent_scale
        return reconstruction_loss(dec(torch.cat([z_enc, z_lcm])), d)

    optimise("polish", p.polish_steps, opt, step_fn, p, out, quiet, lr=3e-4, device=dev)
    return thin.eval()


def train_teacher(data: PairedData, p: TrainPreset, seed: int, out: Path, quiet=False, dev=CPU):
    """The conditional latent diffusion teacher (v-prediction); returns its EMA weights."""
    rng = seed_stage("teacher", seed)
    sched = train_scheduler()
    unet = ddp(make_unet(p).to(dev))
    ema = copy.deepcopy(unwrap(unet)).eval()
    opt = torch.optim.AdamW(unet.parameters(), lr=p.lr, weight_decay=1e-4)

    def step_fn(step):
        q, _, z0 = data.batch(rng, p.batch, p.crop, p.latent_factor, device=dev)
        noise = torch.randn_like(z0)
        t = sample_timesteps(rng, z0.shape[0], p.high_t_fraction, p.high_t_min).to(dev)
        z_t = sched.add_noise(z0, noise, t)
        target = sched.get_velocity(z0, noise, t)
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
):
    """Latent consistency distillation with a skipping-step DDIM solver and an EMA target.

    `anchor_weight` adds an L1 term pulling the student's one-step estimate to the true latent
    (possible because our data are paired); 0 gives plain LCD.
    """
    anchor_weight = p.anchor_weight if anchor_weight is None else anchor_weight
    rng = seed_stage("lcm", seed)
    sched = train_scheduler()
    lcm = lcm_scheduler()
    grid, k = lcm_solver_grid()
    teacher = teacher.to(dev).eval().requires_grad_(False)
    student = ddp(copy.deepcopy(teacher).train().requires_grad_(True))
    target = copy.deepcopy(teacher).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=p.lr * 0.2, weight_decay=1e-4)
    c = p.huber_c

    def step_fn(step):
        q, _, z0 = data.batch(rng, p.batch, p.crop, p.latent_factor, device=dev)
        idx = rng.integers(0, len(grid), size=z0.shape[0])
        start_t = torch.from_numpy(grid[idx]).long().to(dev)
        t = torch.clamp(start_t - k, min=0)
        noise = torch.randn_like(z0)
        z_start = sched.add_noise(z0, noise, start_t)
        pred = consistency(lcm, sched, student, z_start, start_t, q)
        with torch.no_grad():
            v = teacher(z_start, start_t, q)
            x0_t = x0_from_v(sched, z_start, v, start_t)
            eps_t = eps_from_v(sched, z_start, v, start_t)
            a_prev = sched.alphas_cumprod.to(dev)[t].view(-1, 1, 1, 1)
            z_prev = a_prev.sqrt() * x0_t + (1 - a_prev).sqrt() * eps_t
            tgt = consistency(lcm, sched, target, z_prev, t, q)
        loss = torch.mean(torch.sqrt((pred - tgt) ** 2 + c**2) - c)
        if anchor_weight:
            loss = loss + anchor_weight * F.l1_loss(pred, z0)
        return loss

    optimise(
        "lcm", p.lcm_steps, opt, step_fn, p, out, quiet,
        lr=p.lr * 0.2, warmup=20, clip=student, device=dev,
        after_step=lambda step: ema_update(target, unwrap(student), p.ema_target),
    )  # fmt: skip
    return target


def train_pix2pix(data: PairedData, p: TrainPreset, seed: int, out: Path, quiet=False, dev=CPU):
    """The lab's baseline: U-Net generator + PatchGAN, vanilla GAN loss + 100 L1 (Isola et al.)."""
    rng = seed_stage("pix2pix", seed)
    gen = ddp(build(pix2pix_arch(p)).to(dev))
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
