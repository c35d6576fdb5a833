"""Training: VAE -> conditional latent teacher (v-prediction) -> LCM distillation -> Pix2Pix.

Every stage is reproducible from a seed, saves a checkpoint when done (so a rerun resumes at the
next stage), and logs losses to `<out>/<stage>_loss.csv` and progress to `<out>/train.log`.
Fine-tuning (`iter_finetune`) adapts the 1-step model to a user's paired images without a teacher.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoints as ckpt
from ._drain import drain
from ._version import __version__
from .device import resolve_device
from .models import (
    VAE,
    LatentUNet,
    PatchDiscriminator,
    Pix2PixGenerator,
    build,
    count_parameters,
)
from .sampling import SCHEDULER_CONFIG, lcm_scheduler, train_scheduler

STAGES = ("vae", "decoder", "teacher", "lcm", "polish", "pix2pix")


@dataclass
class TrainPreset:
    """Everything that defines a training run (stored in every checkpoint's provenance)."""

    name: str
    data_presets: tuple[str, ...] = ("brain-20x", "tumour-dense-20x")
    n_fields: int = 96
    field_size: int = 256
    crop: int = 128
    batch: int = 12
    vae_crop: int = 64
    vae_steps: int = 4000
    teacher_steps: int = 10000
    lcm_steps: int = 3000
    pix2pix_steps: int = 3300
    high_t_fraction: float = 0.5
    high_t_min: int = 600
    lr: float = 5e-4
    anchor_weight: float = 8.0
    ema_teacher: float = 0.999
    ema_target: float = 0.95
    huber_c: float = 1e-3
    unet_channels: tuple[int, ...] = (24, 48, 96, 160)
    vae_channels: int = 32
    pix2pix_ngf: int = 16
    pix2pix_depth: int = 6
    latent_channels: int = 4
    latent_factor: int = 4
    # Inference decoder: 0 steps = ship the VAE's own decoder; > 0 = after the VAE, refit a thinner
    # decoder on the frozen encoder for this many steps (the latent space does not change).
    decoder_steps: int = 0
    dec_quarter_channels: int = 16
    dec_half_channels: int = 8
    dec_half_conv: bool = False
    # After distillation, tune that decoder on a 50/50 mix of encoder and LCM-1 latents ("polish"):
    # fitted on encoder latents alone it draws an 8-px grid from the LCM's smoother latents.
    polish_steps: int = 0
    threads: int = 2
    log_every: int = 50
    data_seed_offset: int = 0


PRESETS = {
    # f=8 latent with 8 channels and a 3-level U-Net: the profile in docs/architecture.md puts a
    # 1-step f=4 model at ~2x Pix2Pix's latency, and this layout at ~0.5x for the same parameters.
    "default": TrainPreset(
        name="default",
        latent_factor=8,
        latent_channels=8,
        unet_channels=(40, 80, 160),
        vae_channels=48,
        vae_crop=96,
        decoder_steps=3000,
        polish_steps=1500,
    ),
    "tiny": TrainPreset(
        name="tiny",
        n_fields=4,
        field_size=64,
        crop=64,
        vae_crop=32,
        batch=4,
        vae_steps=30,
        teacher_steps=30,
        pix2pix_steps=30,
        lcm_steps=60,
        unet_channels=(8, 16, 16),
        latent_factor=8,
        vae_channels=8,
        decoder_steps=30,
        polish_steps=20,
        dec_quarter_channels=8,
        pix2pix_ngf=8,
        log_every=10,
        threads=1,
    ),
}


def get_train_preset(name: str) -> TrainPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown training preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


# --------------------------------------------------------------------------------------- data


@dataclass
class PairedData:
    """Full training fields in memory: normalised qOBM, DAPI (0-1), and optional latents."""

    qobm: np.ndarray  # (N, H, W) float32, normalised
    dapi: np.ndarray  # (N, H, W) float32
    pixel_size: float
    qobm_mean: float
    qobm_std: float
    latents: np.ndarray | None = None  # (N, C, H/4, W/4), scaled

    def batch(
        self, rng: np.random.Generator, n: int, crop: int, factor: int = 4, latents: bool = True
    ):
        """Random aligned crops (+ flips / 90° rotations) of qOBM, DAPI and (if `latents` and
        present) latents; crops start on multiples of `factor`, the latent downsampling."""
        N, H, W = self.qobm.shape
        crop = min(crop, H - H % factor, W - W % factor)
        q, d, z = [], [], []
        for _ in range(n):
            i = rng.integers(N)
            y = rng.integers(0, (H - crop) // factor + 1) * factor
            x = rng.integers(0, (W - crop) // factor + 1) * factor
            k, flip = int(rng.integers(4)), bool(rng.integers(2))

            def aug(a, k=k, flip=flip):
                a = np.rot90(a, k, axes=(-2, -1))
                return np.ascontiguousarray(a[..., ::-1] if flip else a)

            q.append(aug(self.qobm[i, y : y + crop, x : x + crop]))
            d.append(aug(self.dapi[i, y : y + crop, x : x + crop]))
            if latents and self.latents is not None:
                f = factor
                z.append(
                    aug(self.latents[i, :, y // f : (y + crop) // f, x // f : (x + crop) // f])
                )
        qt = torch.from_numpy(np.stack(q))[:, None]
        dt = torch.from_numpy(np.stack(d))[:, None]
        zt = torch.from_numpy(np.stack(z)) if z else None
        return qt, dt, zt


def make_training_data(preset: TrainPreset, seed: int) -> PairedData:
    """Simulate the training fields (seeded; disjoint from the evaluation benchmark's seeds)."""
    from .simulate import simulate_pair

    qs, ds, px = [], [], []
    for i in range(preset.n_fields):
        name = preset.data_presets[i % len(preset.data_presets)]
        s = simulate_pair(name, size=preset.field_size, seed=seed * 100_000 + i)
        qs.append(s.qobm.astype(np.float32))
        ds.append(s.dapi.astype(np.float32))
        px.append(s.pixel_size)
    q = np.stack(qs)
    mean, std = float(q.mean()), float(q.std() + 1e-6)
    return PairedData(
        qobm=np.clip((q - mean) / std, -10, 10).astype(np.float32),
        dapi=np.stack(ds),
        pixel_size=float(np.median(px)),
        qobm_mean=mean,
        qobm_std=std,
    )


# ---------------------------------------------------------------------------------- utilities


class Logger:
    """Logs the mean loss over each logging window (single-batch losses are too noisy to read)."""

    def __init__(self, out: Path, stage: str, quiet: bool = False, every: int = 50):
        self.out, self.stage, self.quiet, self.every = out, stage, quiet, every
        self.active = dist_info()[0] == 0  # under torchrun only rank 0 logs
        self.csv = out / f"{stage}_loss.csv"
        if self.active:
            self.csv.write_text("step,loss,seconds\n")
        self.t0 = time.time()
        self.window: list[float] = []

    def step(self, step: int, total: int, loss: float) -> None:
        self.window.append(loss)
        if (step + 1) % self.every == 0 or step == total - 1:
            self.log(step, total, float(np.mean(self.window)))
            self.window = []

    def log(self, step: int, total: int, loss: float) -> None:
        if not self.active:
            return
        dt = time.time() - self.t0
        with open(self.csv, "a") as f:
            f.write(f"{step},{loss:.6g},{dt:.1f}\n")
        msg = f"[{self.stage}] step {step + 1}/{total} loss {loss:.5f} ({dt:.0f}s)"
        with open(self.out / "train.log", "a") as f:
            f.write(msg + "\n")
        if not self.quiet:
            print(msg, flush=True)


# ------------------------------------------------------------------------ data-parallel (torchrun)


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) unless running under `torchrun` with an initialised group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def ddp(module: torch.nn.Module) -> torch.nn.Module:
    """Wrap for DistributedDataParallel (gradients averaged across ranks) when distributed."""
    if dist_info()[1] > 1:
        return torch.nn.parallel.DistributedDataParallel(module)
    return module


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)


def barrier() -> None:
    if dist_info()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def _maybe_init_distributed() -> bool:
    """Join the process group `torchrun` describes (gloo: CPU); returns True if this call made it."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
        return True
    return False


def _rank_rng(seed: int) -> np.random.Generator:
    """Each rank draws different batches; rank 0 draws exactly what a single process would."""
    return np.random.default_rng(seed + 1000 * dist_info()[0])


def ema_update(target: torch.nn.Module, source: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pt, ps in zip(target.parameters(), source.parameters()):
            pt.mul_(decay).add_(ps.detach(), alpha=1 - decay)


def cosine_lr(opt: torch.optim.Optimizer, base: float, step: int, total: int, warmup: int = 50):
    f = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step / max(total, 1), 1)))
    for g in opt.param_groups:
        g["lr"] = base * max(f, 0.02)


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def arch(module_cls, **kwargs) -> dict:
    return {"class": module_cls.__name__, "kwargs": kwargs}


def x0_from_v(sched, z_t, v, t):
    a = sched.alphas_cumprod.to(z_t.device)[t].view(-1, 1, 1, 1)
    return a.sqrt() * z_t - (1 - a).sqrt() * v


def eps_from_v(sched, z_t, v, t):
    a = sched.alphas_cumprod.to(z_t.device)[t].view(-1, 1, 1, 1)
    return (1 - a).sqrt() * z_t + a.sqrt() * v


# -------------------------------------------------------------------------------------- stages


def train_vae(data: PairedData, p: TrainPreset, seed: int, out: Path, quiet=False) -> VAE:
    torch.manual_seed(seed)
    rng = _rank_rng(seed + 1)
    vae = ddp(make_vae(p))
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    log = Logger(out, "vae", quiet, p.log_every)
    for step in range(p.vae_steps):
        cosine_lr(opt, 1e-3, step, p.vae_steps)
        _, d, _ = data.batch(rng, p.batch, p.vae_crop)
        rec, mean, logvar = vae(d)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = reconstruction_loss(rec, d) + 1e-5 * kl  # tiny KL keeps z smooth
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.step(step, p.vae_steps, loss.item())
    return unwrap(vae).eval()


def reconstruction_loss(rec: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """L1 keeps edges sharp; the image-gradient L1 keeps chromatin texture."""
    gx = lambda a: a[..., :, 1:] - a[..., :, :-1]  # noqa: E731
    gy = lambda a: a[..., 1:, :] - a[..., :-1, :]  # noqa: E731
    return F.l1_loss(rec, d) + 0.5 * (F.l1_loss(gx(rec), gx(d)) + F.l1_loss(gy(rec), gy(d)))


def train_decoder(data: PairedData, vae: VAE, p: TrainPreset, seed: int, out: Path, quiet=False):
    """Refit the thin inference decoder on the frozen VAE encoder (latents sampled as in the VAE
    stage). Returns a VAE holding the original encoder and the new decoder."""
    torch.manual_seed(seed + 8)
    rng = _rank_rng(seed + 9)
    slim = make_inference_vae(p)
    slim.encoder.load_state_dict(vae.encoder.state_dict())
    slim.encoder.requires_grad_(False).eval()
    dec = ddp(slim.decoder)
    opt = torch.optim.Adam(dec.parameters(), lr=1e-3)
    log = Logger(out, "decoder", quiet, p.log_every)
    for step in range(p.decoder_steps):
        cosine_lr(opt, 1e-3, step, p.decoder_steps)
        _, d, _ = data.batch(rng, p.batch, p.vae_crop, p.latent_factor)
        with torch.no_grad():
            z = slim.reparameterize(*slim.encode(d))
        loss = reconstruction_loss(dec(z), d)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.step(step, p.decoder_steps, loss.item())
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
) -> VAE:
    """Tune the thin decoder on half encoder latents, half the LCM's 1-step latents of the same
    crops (fresh noise each step), against the true DAPI. Returns `thin` with the tuned decoder."""
    torch.manual_seed(seed + 10)
    rng = _rank_rng(seed + 11)
    lcm = lcm_scheduler()
    lcm.set_timesteps(1)
    t = int(lcm.timesteps[0])
    thin.encoder.requires_grad_(False).eval()
    student.requires_grad_(False).eval()
    dec = ddp(thin.decoder)
    opt = torch.optim.Adam(dec.parameters(), lr=3e-4)
    log = Logger(out, "polish", quiet, p.log_every)
    half = max(1, p.batch // 2)
    for step in range(p.polish_steps):
        cosine_lr(opt, 3e-4, step, p.polish_steps)
        q, d, _ = data.batch(rng, p.batch, p.vae_crop, p.latent_factor, latents=False)
        with torch.no_grad():
            z_enc = thin.reparameterize(*thin.encode(d[:half]))
            f = p.latent_factor
            noise = torch.randn(
                len(d) - half, p.latent_channels, d.shape[-2] // f, d.shape[-1] // f
            )
            v = student(noise, torch.full((len(noise),), t), q[half:])
            z_lcm = lcm.step(v, t, noise).denoised / latent_scale
        loss = reconstruction_loss(dec(torch.cat([z_enc, z_lcm])), d)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.step(step, p.polish_steps, loss.item())
    return thin.eval()


@torch.no_grad()
def encode_latents(vae: VAE, dapi: np.ndarray) -> np.ndarray:
    out = []
    for i in range(0, len(dapi), 8):
        mean, _ = vae.encode(torch.from_numpy(dapi[i : i + 8])[:, None])
        out.append(mean.numpy())
    return np.concatenate(out)


def sample_timesteps(rng: np.random.Generator, n: int, high_fraction: float, high_min: int):
    """Uniform timesteps, with `high_fraction` of them drawn from [high_min, 999].

    1-4 step sampling only queries the teacher at high noise, where the prediction must come from
    the qOBM condition; an exploratory A/B favoured this over uniform sampling (docs/model-card.md).
    """
    t = rng.integers(0, 1000, size=n)
    high = rng.random(n) < high_fraction
    t[high] = rng.integers(high_min, 1000, size=int(high.sum()))
    return torch.from_numpy(t).long()


def make_unet(p: TrainPreset) -> LatentUNet:
    return LatentUNet(p.latent_channels, p.latent_factor, p.unet_channels)


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


def train_teacher(data: PairedData, p: TrainPreset, seed: int, out: Path, quiet=False):
    torch.manual_seed(seed + 2)
    rng = _rank_rng(seed + 3)
    sched = train_scheduler()
    unet = ddp(make_unet(p))
    ema = copy.deepcopy(unwrap(unet)).eval()
    opt = torch.optim.AdamW(unet.parameters(), lr=p.lr, weight_decay=1e-4)
    log = Logger(out, "teacher", quiet, p.log_every)
    for step in range(p.teacher_steps):
        cosine_lr(opt, p.lr, step, p.teacher_steps)
        q, _, z0 = data.batch(rng, p.batch, p.crop, p.latent_factor)
        noise = torch.randn_like(z0)
        t = sample_timesteps(rng, z0.shape[0], p.high_t_fraction, p.high_t_min)
        z_t = sched.add_noise(z0, noise, t)
        target = sched.get_velocity(z0, noise, t)
        loss = F.mse_loss(unet(z_t, t, q), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema_update(ema, unwrap(unet), p.ema_teacher if step > 200 else 0.0)
        log.step(step, p.teacher_steps, loss.item())
    return ema


def lcm_solver_grid(num_train: int = 1000, n: int = 50) -> tuple[np.ndarray, int]:
    """The skipping-step DDIM grid [k-1, 2k-1, …, 999] and skip k (Luo et al.; diffusers example)."""
    k = num_train // n
    return np.arange(1, n + 1) * k - 1, k


def distill_lcm(
    data: PairedData,
    teacher,
    p: TrainPreset,
    seed: int,
    out: Path,
    quiet=False,
    anchor_weight: float | None = None,
):
    """Latent consistency distillation with a skipping-step DDIM solver and an EMA target.

    `anchor_weight` adds an L1 term pulling the student's one-step estimate to the true latent
    (possible because our data are paired); 0 gives plain LCD.
    """
    anchor_weight = p.anchor_weight if anchor_weight is None else anchor_weight
    torch.manual_seed(seed + 4)
    rng = _rank_rng(seed + 5)
    sched = train_scheduler()
    lcm = lcm_scheduler()
    grid, k = lcm_solver_grid()
    teacher = teacher.eval().requires_grad_(False)
    student = ddp(copy.deepcopy(teacher).train().requires_grad_(True))
    target = copy.deepcopy(teacher).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=p.lr * 0.2, weight_decay=1e-4)
    log = Logger(out, "lcm", quiet, p.log_every)
    c = p.huber_c

    def consistency(net, z, t, q):
        c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(t)
        x0 = x0_from_v(sched, z, net(z, t, q), t)
        return c_skip.view(-1, 1, 1, 1) * z + c_out.view(-1, 1, 1, 1) * x0

    for step in range(p.lcm_steps):
        cosine_lr(opt, p.lr * 0.2, step, p.lcm_steps, warmup=20)
        q, _, z0 = data.batch(rng, p.batch, p.crop, p.latent_factor)
        idx = rng.integers(0, len(grid), size=z0.shape[0])
        start_t = torch.from_numpy(grid[idx]).long()
        t = torch.clamp(start_t - k, min=0)
        noise = torch.randn_like(z0)
        z_start = sched.add_noise(z0, noise, start_t)
        pred = consistency(student, z_start, start_t, q)
        with torch.no_grad():
            v = teacher(z_start, start_t, q)
            x0_t = x0_from_v(sched, z_start, v, start_t)
            eps_t = eps_from_v(sched, z_start, v, start_t)
            a_prev = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
            z_prev = a_prev.sqrt() * x0_t + (1 - a_prev).sqrt() * eps_t
            tgt = consistency(target, z_prev, t, q)
        loss = torch.mean(torch.sqrt((pred - tgt) ** 2 + c**2) - c)
        if anchor_weight:
            loss = loss + anchor_weight * F.l1_loss(pred, z0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        ema_update(target, unwrap(student), p.ema_target)
        log.step(step, p.lcm_steps, loss.item())
    return target


def train_pix2pix(data: PairedData, p: TrainPreset, seed: int, out: Path, quiet=False):
    torch.manual_seed(seed + 6)
    rng = _rank_rng(seed + 7)
    gen = ddp(Pix2PixGenerator(p.pix2pix_ngf, p.pix2pix_depth))
    disc = ddp(PatchDiscriminator(2 * p.pix2pix_ngf))
    parallel = dist_info()[1] > 1
    og = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
    od = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
    bce = torch.nn.BCEWithLogitsLoss()
    log = Logger(out, "pix2pix", quiet, p.log_every)
    m = unwrap(gen).multiple
    crop = max(m, p.crop - p.crop % m)
    for step in range(p.pix2pix_steps):
        q, d, _ = data.batch(rng, p.batch, crop, latents=False)
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
        loss_g = bce(g_logit, torch.ones_like(g_logit)) + 100.0 * F.l1_loss(fake, d)
        og.zero_grad(set_to_none=True)
        loss_g.backward()
        og.step()
        log.step(step, p.pix2pix_steps, loss_g.item())
    return unwrap(gen).eval()


# ------------------------------------------------------------------------------------- recipe


def _base_config(p: TrainPreset, data: PairedData, seed: int, kind: str) -> dict:
    return {
        "kind": kind,
        "normalization": {
            "type": "fixed",
            "qobm_mean": data.qobm_mean,
            "qobm_std": data.qobm_std,
            "clip": 10.0,
            "output": "DAPI 0-1",
        },
        "pixel_size": data.pixel_size,
        "version": __version__,
        "provenance": {
            "commit": git_commit(),
            "preset": asdict(p),
            "seed": seed,
            "data_presets": list(p.data_presets),
            "command": f"lcm-stain train --preset {p.name} --seed {seed}",
        },
    }


def _latent_config(p, data, seed, kind, unet, vae, latent_scale, timings) -> dict:
    cfg = _base_config(p, data, seed, kind)
    cfg.update(
        architecture={
            "unet": arch(
                LatentUNet,
                latent_channels=p.latent_channels,
                factor=p.latent_factor,
                channels=list(p.unet_channels),
            ),
            "vae": vae_arch(p, inference=True),
        },
        scheduler=dict(SCHEDULER_CONFIG),
        latent_scale=latent_scale,
        multiple=unet.multiple,
        receptive_field=64,
        parameters={
            "unet": count_parameters(unet),
            "decoder": count_parameters(vae.decoder),
            "encoder": count_parameters(vae.encoder),
        },
    )
    cfg["provenance"]["stage_seconds"] = timings
    return cfg


def run_recipe(
    preset="default",
    out=Path("runs/default"),
    seed=0,
    stages=None,
    resume=True,
    device="auto",
    package=False,
    quiet=False,
    threads: int | None = None,
    anchor_weight: float | None = None,
) -> dict[str, Path]:
    """Run VAE -> decoder -> teacher -> LCM -> polish -> Pix2Pix into `out`, skipping finished
    stages."""
    p = get_train_preset(preset) if isinstance(preset, str) else preset
    if anchor_weight is not None:
        p = replace(p, anchor_weight=float(anchor_weight))
    stages = list(stages or STAGES)
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ValueError(f"unknown stage(s) {bad}; choose from {list(STAGES)}")
    dev = resolve_device(device)
    if dev.type != "cpu":
        print(f"note: training runs on the CPU path in this version (requested {dev})")
    torch.set_num_threads(threads or p.threads)
    owns_group = _maybe_init_distributed()
    try:
        return _run_stages(p, Path(out), seed, stages, resume, package, quiet)
    finally:
        if owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _save_on_main(path: Path, modules: dict, config: dict) -> None:
    """Under torchrun only rank 0 writes; every rank waits until the file is there.

    Stain models get their measured `receptive_field` right away, so a run's own checkpoints tile
    seam-free without waiting for `--package`."""
    if dist_info()[0] == 0:
        ckpt.save_checkpoint(path, modules, config)
        if config.get("kind") in ("lcm", "teacher", "pix2pix"):
            calibrate_receptive_field(path)
    barrier()


def _run_stages(p, out, seed, stages, resume, package, quiet) -> dict[str, Path]:
    is_main = dist_info()[0] == 0
    out.mkdir(parents=True, exist_ok=True)
    timings_file = out / "timings.json"
    timings = json.loads(timings_file.read_text()) if (resume and timings_file.exists()) else {}

    def done(name):
        return resume and (out / f"{name}.safetensors").exists()

    def save_timing(name, t0):
        timings[name] = round(time.time() - t0, 1)
        if is_main:
            ckpt.atomic_write_bytes(timings_file, json.dumps(timings, indent=2).encode())

    t0 = time.time()
    data = make_training_data(p, seed)
    save_timing("data", t0)
    paths = {}

    if "vae" in stages and not done("vae"):
        t0 = time.time()
        vae = train_vae(data, p, seed, out, quiet)
        save_timing("vae", t0)
        _save_on_main(
            out / "vae.safetensors",
            {"vae": vae},
            {
                **_base_config(p, data, seed, "vae"),
                "architecture": {"vae": vae_arch(p)},
            },
        )
    vae = make_vae(p)
    ckpt.load_into(vae, ckpt.load_checkpoint(out / "vae.safetensors").sub("vae"), "VAE")
    vae.eval()
    raw = encode_latents(vae, data.dapi)
    latent_scale = float(1.0 / (raw.std() + 1e-6))
    data.latents = (raw * latent_scale).astype(np.float32)

    def inference_vae() -> VAE:
        if p.decoder_steps <= 0:
            return vae
        path = out / "decoder.safetensors"
        if p.polish_steps > 0 and (out / "polish.safetensors").exists():
            path = out / "polish.safetensors"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} missing: run the decoder stage (it follows the VAE) before teacher/lcm"
            )
        thin = make_inference_vae(p)
        ckpt.load_into(thin, ckpt.load_checkpoint(path).sub("vae"), "inference VAE")
        return thin.eval()

    def load_unet(name) -> LatentUNet:
        unet = make_unet(p)
        ckpt.load_into(unet, ckpt.load_checkpoint(out / f"{name}.safetensors").sub("unet"), name)
        return unet

    def rewrite_decoders():
        v = inference_vae()
        for name in ("teacher", "lcm"):
            if (out / f"{name}.safetensors").exists():
                latent_ckpt(name, load_unet(name), name, v)

    def save_thin_decoder(stage: str, thin: VAE) -> None:
        _save_on_main(
            out / f"{stage}.safetensors",
            {"vae": thin},
            {
                **_base_config(p, data, seed, stage),
                "architecture": {"vae": vae_arch(p, inference=True)},
            },
        )

    def latent_ckpt(name, unet, kind, v: VAE | None = None):
        v = inference_vae() if v is None else v
        cfg = _latent_config(p, data, seed, kind, unet, v, latent_scale, timings)
        _save_on_main(
            out / f"{name}.safetensors",
            {"unet": unet, "decoder": v.decoder, "encoder": v.encoder},
            cfg,
        )

    if p.decoder_steps > 0 and "decoder" in stages and not done("decoder"):
        t0 = time.time()
        thin = train_decoder(data, vae, p, seed, out, quiet)
        save_timing("decoder", t0)
        save_thin_decoder("decoder", thin)
        # Teacher and LCM never see the decoder (they live in latent space), so checkpoints saved
        # before this stage existed only need the new decoder written into them.
        rewrite_decoders()

    if "teacher" in stages and not done("teacher"):
        t0 = time.time()
        teacher = train_teacher(data, p, seed, out, quiet)
        save_timing("teacher", t0)
        latent_ckpt("teacher", teacher, "teacher")
    paths["teacher"] = out / "teacher.safetensors"

    if "lcm" in stages and not done("lcm"):
        teacher = make_unet(p)
        ckpt.load_into(
            teacher, ckpt.load_checkpoint(out / "teacher.safetensors").sub("unet"), "teacher"
        )
        t0 = time.time()
        student = distill_lcm(data, teacher, p, seed, out, quiet)
        save_timing("lcm", t0)
        latent_ckpt("lcm", student, "lcm")
    paths["lcm"] = out / "lcm.safetensors"

    if p.polish_steps > 0 and "polish" in stages and not done("polish"):
        t0 = time.time()
        polished = polish_decoder(
            data, inference_vae(), load_unet("lcm"), latent_scale, p, seed, out, quiet
        )
        save_timing("polish", t0)
        save_thin_decoder("polish", polished)
        rewrite_decoders()

    if "pix2pix" in stages and not done("pix2pix"):
        t0 = time.time()
        gen = train_pix2pix(data, p, seed, out, quiet)
        save_timing("pix2pix", t0)
        cfg = _base_config(p, data, seed, "pix2pix")
        cfg.update(
            architecture={
                "generator": arch(Pix2PixGenerator, ngf=p.pix2pix_ngf, depth=p.pix2pix_depth)
            },
            multiple=gen.multiple,
            receptive_field=64,
            parameters={"generator": count_parameters(gen)},
        )
        cfg["provenance"]["stage_seconds"] = timings
        _save_on_main(out / "pix2pix.safetensors", {"generator": gen}, cfg)
    paths["pix2pix"] = out / "pix2pix.safetensors"

    if package and is_main:
        package_weights(out)
    return paths


def calibrate_receptive_field(path: Path, tol: float = 0.002, size: int = 512) -> int:
    """Measure how much input context a checkpoint needs for tiled = whole-image (within `tol`)
    and store 2x (that margin + one tile multiple) as `receptive_field` in its JSON config (the
    engine adds half of it around every tile). Measured, not guessed: the U-Net's reach is far
    larger than its nominal window because of the 1/32-resolution level. The extra multiple is a
    safety margin: the measurement cuts one corner crop, while inner tiles are cut on four sides
    (at the bare measured margin a 1024² seam check gave 0.019 > 0.01)."""
    from .sampling import load_predictor
    from .simulate import simulate_pair
    from .tiling import measure_context

    pred = load_predictor(path, device="cpu")
    field = simulate_pair("brain-20x", size=size, seed=31_337).qobm
    ctx = measure_context(pred, pred.normalize(field), tol=tol) + int(pred.multiple)
    cfg_path = ckpt.config_path(path)
    cfg = json.loads(cfg_path.read_text())
    cfg["receptive_field"] = int(2 * ctx)
    cfg["receptive_field_measured"] = {"tolerance": tol, "context_px": int(ctx), "field": size}
    ckpt.atomic_write_bytes(cfg_path, json.dumps(cfg, indent=2, sort_keys=True).encode())
    return int(2 * ctx)


def package_weights(run_dir: Path) -> None:
    """Copy a finished run's stain models into the package, calibrate their tiling context and
    record their hashes."""
    ckpt.WEIGHTS_DIR.mkdir(exist_ok=True)
    for name in ("lcm", "teacher", "pix2pix"):
        for ext in (".safetensors", ".json"):
            src = Path(run_dir) / f"{name}{ext}"
            if not src.exists():
                raise FileNotFoundError(f"{src} missing: run all training stages before --package")
            ckpt.atomic_write_bytes(ckpt.WEIGHTS_DIR / f"{name}{ext}", src.read_bytes())
        rf = calibrate_receptive_field(ckpt.WEIGHTS_DIR / f"{name}.safetensors")
        print(f"packaged {name}: receptive_field {rf} px")
    ckpt.record_packaged_hashes()


# ----------------------------------------------------------------------------------- fine-tune
#
# Method: supervised consistency fine-tuning of the 1-step student on the user's pairs, no teacher.
# The user's DAPI is encoded by the (frozen) VAE encoder to a target latent z0; for a noise level t
# from the LCM inference grid the student's consistency output f(z_t, t) is pulled to z0 (latent
# L1), and its decoded image to the DAPI (pixel L1, which also adapts the thin decoder). This keeps
# the 1-step sampling path identical to inference and costs one student pass per step.


@dataclass
class FinetuneEvent:
    step: int
    total: int
    train_loss: float
    val_loss: float | None = None


@dataclass
class FinetuneResult:
    tensors: dict[str, torch.Tensor]
    config: dict
    metrics_before: dict = field(default_factory=dict)
    metrics_after: dict = field(default_factory=dict)
    best_step: int = 0
    stopped: bool = False
    history: list = field(default_factory=list)

    def save(self, path) -> Path:
        """Atomic safetensors + JSON; reload with `load_predictor(path)`."""
        modules = {}
        for prefix in ("unet", "decoder", "encoder"):
            p = prefix + "."
            modules[prefix] = {k[len(p) :]: v for k, v in self.tensors.items() if k.startswith(p)}
        cfg = {
            **self.config,
            "finetune": {
                **self.config.get("finetune", {}),
                "metrics_before": self.metrics_before,
                "metrics_after": self.metrics_after,
            },
        }
        return ckpt.save_checkpoint(Path(path), modules, cfg)

    def predictor(self, device="auto"):
        from .sampling import predictor_from_checkpoint

        return predictor_from_checkpoint(ckpt.Checkpoint(self.tensors, self.config), 1, device)


def dapi_to_model_units(dapi: np.ndarray) -> tuple[np.ndarray, dict]:
    """Map a user's DAPI (any units) to the model's 0-1 scale: percentiles 0.5 / 99.8 -> 0 / 0.9."""
    d = np.asarray(dapi, dtype=np.float32)
    lo, hi = np.percentile(d, [0.5, 99.8])
    scale = 0.9 / max(float(hi - lo), 1e-6)
    return np.clip((d - lo) * scale, 0, 1).astype(np.float32), {"lo": float(lo), "scale": scale}


def _as_planes(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a numeric image, got dtype {a.dtype}")
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"{name} must be 2D (Y, X) or a stack (N, Y, X), got shape {a.shape}")
    if 0 in a.shape:
        raise ValueError(f"{name} is empty (shape {a.shape}): fine-tuning needs at least one plane")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise ValueError(
            f"{name} contains NaN or Inf pixels; clean or crop them before fine-tuning"
        )
    return a


def _load_finetune_base(model) -> ckpt.Checkpoint:
    if isinstance(model, ckpt.Checkpoint):
        return model
    if isinstance(model, str) and model in ckpt.PACKAGED:
        base = ckpt.load_packaged(model)
    else:
        base = ckpt.load_checkpoint(Path(model))
    if base.config.get("kind") != "lcm":
        raise ValueError(
            "fine-tuning needs an LCM checkpoint (model='lcm' or a fine-tuned LCM file)"
        )
    if not base.sub("encoder"):
        raise ValueError("this checkpoint has no VAE encoder weights, so it cannot be fine-tuned")
    return base


def _pad_to(x: torch.Tensor, m: int) -> tuple[torch.Tensor, int, int]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % m, (-w) % m
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
    return x, h, w


@torch.no_grad()
def _predict_planes(unet, decoder, q: np.ndarray, latent_scale: float, seed: int = 0) -> np.ndarray:
    """1-step LCM prediction of whole (small) planes, for validation during fine-tuning."""
    lcm = lcm_scheduler()
    lcm.set_timesteps(1)
    t = int(lcm.timesteps[0])
    out = []
    for plane in q:
        x, h, w = _pad_to(torch.from_numpy(plane)[None, None], unet.multiple)
        g = torch.Generator().manual_seed(seed)
        f = unet.factor
        z = torch.randn((1, unet.latent_channels, x.shape[-2] // f, x.shape[-1] // f), generator=g)
        v = unet(z, torch.tensor([t]), x)
        den = lcm.step(v, t, z).denoised
        lcm.set_timesteps(1)
        out.append(decoder(den / latent_scale).clamp(0, 1)[0, 0, :h, :w].numpy())
    return np.stack(out)


def _val_metrics(pred: np.ndarray, target: np.ndarray, pixel_size: float) -> dict:
    from . import metrics

    rows = []
    for p, t in zip(pred, target):
        labels = metrics.segment_nuclei(t, pixel_size)
        m = metrics.image_metrics(p, t, true_labels=labels, pixel_size=pixel_size)
        rows.append(
            {k: float(m[k]) for k in ("pearson", "ssim", "recall", "precision", "f1") if k in m}
        )
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def iter_finetune(
    qobm,
    dapi,
    model="lcm",
    steps=300,
    lr=2e-4,
    patch=128,
    val=None,
    val_fraction=0.2,
    seed=0,
    device="auto",
    stop: threading.Event | None = None,
    val_every: int | None = None,
) -> Iterator[FinetuneEvent]:
    """Fine-tune the 1-step model on paired images; yields events, returns a `FinetuneResult`.

    `val` is an optional (qobm, dapi) validation pair; otherwise the bottom `val_fraction` of each
    plane is held out. Setting `stop` ends training early and keeps the best weights so far.
    """
    if not 1 <= int(steps) <= 100_000:
        raise ValueError(f"steps must be between 1 and 100000, got {steps}")
    if not 0 < float(lr) < 1:
        raise ValueError(f"learning rate must be in (0, 1), got {lr}")
    q, d = _as_planes(qobm, "qOBM image"), _as_planes(dapi, "DAPI image")
    if q.shape != d.shape:
        raise ValueError(
            f"qOBM {q.shape[1:] if q.shape[0] == 1 else q.shape} and DAPI "
            f"{d.shape[1:] if d.shape[0] == 1 else d.shape} must have the same shape (paired images)"
        )
    base = _load_finetune_base(model)
    cfg = copy.deepcopy(base.config)
    unet = build_from(cfg["architecture"]["unet"], base.sub("unet"), "latent U-Net")
    vae_arch = cfg["architecture"]["vae"]
    vae = build_from(vae_arch, None, "VAE")
    ckpt.load_into(vae.decoder, base.sub("decoder"), "VAE decoder")
    ckpt.load_into(vae.encoder, base.sub("encoder"), "VAE encoder")
    latent_scale = float(cfg["latent_scale"])
    norm = cfg["normalization"]
    px = float(cfg.get("pixel_size", 0.414))
    qn = np.clip((q - norm["qobm_mean"]) / norm["qobm_std"], -10, 10).astype(np.float32)
    dn, dapi_norm = dapi_to_model_units(d)
    m, fac = unet.multiple, unet.factor
    if val is not None:
        vq = _as_planes(val[0], "validation qOBM")
        vd = _as_planes(val[1], "validation DAPI")
        if vq.shape != vd.shape:
            raise ValueError("validation qOBM and DAPI must have the same shape")
        vq = np.clip((vq - norm["qobm_mean"]) / norm["qobm_std"], -10, 10).astype(np.float32)
        vd = dapi_to_model_units(vd)[0]
        tq, td = qn, dn
    else:
        H = q.shape[1]
        cut = int(round(H * (1 - val_fraction) / fac)) * fac
        if cut < m or H - cut < 16:
            raise ValueError(
                f"image too small ({q.shape[1]}x{q.shape[2]}) to hold out {val_fraction:.0%} for "
                "validation; give a larger image or a separate validation pair"
            )
        tq, td, vq, vd = qn[:, :cut], dn[:, :cut], qn[:, cut:], dn[:, cut:]
    patch = int(min(patch, tq.shape[1] - tq.shape[1] % m, tq.shape[2] - tq.shape[2] % m))
    if patch < m:
        raise ValueError(f"training region is smaller than the model's tile multiple ({m} px)")
    with torch.no_grad():
        z_all = [
            vae.encode(_pad_to(torch.from_numpy(p)[None, None], fac)[0])[0][0].numpy()
            * latent_scale
            for p in td
        ]
    data = PairedData(
        qobm=tq,
        dapi=td,
        pixel_size=px,
        qobm_mean=0.0,
        qobm_std=1.0,
        latents=np.stack([z[:, : td.shape[1] // fac, : td.shape[2] // fac] for z in z_all]),
    )
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    sched, lcm = train_scheduler(), lcm_scheduler()
    grid = np.array([999, 759, 499, 259])
    unet.train()
    vae.decoder.train()
    opt = torch.optim.AdamW(
        [
            {"params": unet.parameters(), "lr": lr},
            {"params": vae.decoder.parameters(), "lr": lr * 0.5},
        ],
        weight_decay=1e-4,
    )
    val_every = val_every or max(1, steps // 10)
    unet.eval()
    vae.decoder.eval()
    before = _val_metrics(_predict_planes(unet, vae.decoder, vq, latent_scale), vd, px)

    def snapshot():
        return {
            **{f"unet.{k}": v.clone() for k, v in unet.state_dict().items()},
            **{f"decoder.{k}": v.clone() for k, v in vae.decoder.state_dict().items()},
        }

    def selection_score(m: dict) -> float:
        # Pearson + nuclei F1 on validation (lower is better). L1 alone rewarded blurred nuclei.
        # A step that loses either metric against the base is not eligible: nuclei F1 on a small
        # validation region rests on a few dozen nuclei and alone can trade away real accuracy.
        if m.get("pearson", 0.0) < before.get("pearson", 0.0) or m.get("f1", 0.0) < before.get(
            "f1", 0.0
        ):
            return math.inf
        return -(m.get("pearson", 0.0) + m.get("f1", 0.0))

    # step 0 = the base model: fine-tuning never returns weights worse on validation than it got
    best = (selection_score(before), 0, snapshot())
    history = []
    stopped = False
    batch = 4
    for step in range(1, steps + 1):
        if stop is not None and stop.is_set():
            stopped = True
            break
        unet.train()
        vae.decoder.train()
        qb, db, zb = data.batch(rng, batch, patch, fac)
        t = torch.from_numpy(np.where(rng.random(batch) < 0.5, 999, rng.choice(grid, batch))).long()
        z_t = sched.add_noise(zb, torch.randn_like(zb), t)
        c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(t)
        f = c_skip.view(-1, 1, 1, 1) * z_t + c_out.view(-1, 1, 1, 1) * x0_from_v(
            sched, z_t, unet(z_t, t, qb), t
        )
        loss = F.l1_loss(f, zb) + F.l1_loss(vae.decoder(f / latent_scale), db)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(
            list(unet.parameters()) + list(vae.decoder.parameters()), 1.0
        )
        opt.step()
        val_loss = None
        if step % val_every == 0 or step == steps:
            unet.eval()
            vae.decoder.eval()
            pred = _predict_planes(unet, vae.decoder, vq, latent_scale)
            val_loss = float(np.mean(np.abs(pred - vd)))
            score = selection_score(_val_metrics(pred, vd, px))
            if score < best[0]:
                best = (score, step, snapshot())
        history.append((step, float(loss.item()), val_loss))
        yield FinetuneEvent(step, steps, float(loss.item()), val_loss)
    unet.eval()
    vae.decoder.eval()
    if best[2] is not None:  # always true: step 0 is the base model
        unet.load_state_dict({k[5:]: v for k, v in best[2].items() if k.startswith("unet.")})
        vae.decoder.load_state_dict(
            {k[8:]: v for k, v in best[2].items() if k.startswith("decoder.")}
        )
    after = _val_metrics(_predict_planes(unet, vae.decoder, vq, latent_scale), vd, px)
    tensors = {
        **{f"unet.{k}": v.detach().clone() for k, v in unet.state_dict().items()},
        **{f"decoder.{k}": v.detach().clone() for k, v in vae.decoder.state_dict().items()},
        **{f"encoder.{k}": v.detach().clone() for k, v in vae.encoder.state_dict().items()},
    }
    cfg["finetune"] = {
        "base": str(model) if not isinstance(model, ckpt.Checkpoint) else "checkpoint",
        "steps_run": len(history),
        "best_step": best[1],
        "lr": lr,
        "patch": patch,
        "seed": seed,
        "dapi_normalization": dapi_norm,
        "stopped": stopped,
    }
    return FinetuneResult(tensors, cfg, before, after, best[1], stopped, history)


def build_from(arch_cfg: dict, state: dict | None, what: str) -> torch.nn.Module:
    module = build(arch_cfg)
    if state is not None:
        ckpt.load_into(module, state, what)
    return module


def run_finetune(*args, **kwargs) -> FinetuneResult:
    """Drain `iter_finetune` and return its result (for scripts and the CLI)."""

    def report(ev: FinetuneEvent) -> None:
        if ev.val_loss is not None:
            print(
                f"[finetune] step {ev.step}/{ev.total} train {ev.train_loss:.4f} val {ev.val_loss:.4f}",
                flush=True,
            )

    return drain(iter_finetune(*args, **kwargs), report)


def finetune_files(
    qobm: Path,
    dapi: Path,
    out: Path,
    model="lcm",
    steps=300,
    lr=2e-4,
    patch=128,
    val_fraction=0.2,
    seed=0,
    device="auto",
    overwrite=False,
) -> Path:
    """`lcm-stain finetune`: read two images, fine-tune, save atomically (refuses to overwrite)."""
    from .io import read_image

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"output must end in .safetensors, got {out.name!r}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    for p in (qobm, dapi):
        if not Path(p).exists():
            raise FileNotFoundError(f"input not found: {p}")
    q = np.asarray(read_image(qobm)[0])
    d = np.asarray(read_image(dapi)[0])
    res = run_finetune(
        q,
        d,
        model=model,
        steps=steps,
        lr=lr,
        patch=patch,
        val_fraction=val_fraction,
        seed=seed,
        device=device,
    )
    res.save(out)
    print(f"fine-tuned checkpoint: {out} (best step {res.best_step})")
    for k in res.metrics_before:
        print(
            f"  {k:10s} before {res.metrics_before[k]:.3f}  after {res.metrics_after.get(k, float('nan')):.3f}"
        )
    return out
