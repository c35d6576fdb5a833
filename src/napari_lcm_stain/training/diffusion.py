"""Diffusion maths for training that diffusers does not expose as functions: converting a
v-prediction to x0 / epsilon, the consistency function, the distillation solver grid and the
timestep sampler. The schedules themselves come from diffusers (`sampling.SCHEDULER_CONFIG`)."""

from __future__ import annotations

import numpy as np
import torch


def x0_from_v(sched, z_t, v, t):
    a = sched.alphas_cumprod.to(z_t.device)[t].view(-1, 1, 1, 1)
    return a.sqrt() * z_t - (1 - a).sqrt() * v


def eps_from_v(sched, z_t, v, t):
    a = sched.alphas_cumprod.to(z_t.device)[t].view(-1, 1, 1, 1)
    return (1 - a).sqrt() * z_t + a.sqrt() * v


def consistency(lcm, sched, net, z, t, q, w=None):
    """The consistency function f(z_t, t) = c_skip(t) z_t + c_out(t) x0(z_t, t) (Luo et al.), with
    diffusers' LCM boundary scalings and a v-predicting network `net(z, t, q)` (`net(z, t, q, w)`
    given a guidance scale `w`, for a student with a guidance input)."""
    c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(t)
    x0 = x0_from_v(sched, z, net(z, t, q) if w is None else net(z, t, q, w), t)
    c_skip, c_out = c_skip.to(z.device).view(-1, 1, 1, 1), c_out.to(z.device).view(-1, 1, 1, 1)
    return c_skip * z + c_out * x0


@torch.no_grad()
def lcd_target(lcm, sched, teacher, target, z_start, start_t, t, q, w=None):
    """The latent consistency distillation target: one teacher DDIM step from `start_t` to `t`,
    then the EMA `target` network's consistency function at `t`. Given `w` (guided
    distillation), the teacher's v is guided, uncond + w·(cond - uncond), with the unconditional
    branch the teacher with its qOBM condition zeroed, and `target` gets `w` too."""
    v = teacher(z_start, start_t, q)
    if w is not None:
        v = guided(v, teacher(z_start, start_t, torch.zeros_like(q)), w)
    x0_t = x0_from_v(sched, z_start, v, start_t)
    eps_t = eps_from_v(sched, z_start, v, start_t)
    a_prev = sched.alphas_cumprod.to(z_start.device)[t].view(-1, 1, 1, 1)
    z_prev = a_prev.sqrt() * x0_t + (1 - a_prev).sqrt() * eps_t
    return consistency(lcm, sched, target, z_prev, t, q, w)


def lcm_solver_grid(num_train: int = 1000, n: int = 50) -> tuple[np.ndarray, int]:
    """The skipping-step DDIM grid [k-1, 2k-1, …, 999] and skip k (Luo et al.; diffusers example)."""
    k = num_train // n
    return np.arange(1, n + 1) * k - 1, k


def sample_timesteps(rng: np.random.Generator, n: int, high_fraction: float, high_min: int):
    """Uniform timesteps, with `high_fraction` of them drawn from [high_min, 999].

    1-4 step sampling only queries the teacher at high noise, where the prediction must come from
    the qOBM condition; an exploratory A/B favoured this over uniform sampling (docs/model-card.md).
    """
    t = rng.integers(0, 1000, size=n)
    high = rng.random(n) < high_fraction
    t[high] = rng.integers(high_min, 1000, size=int(high.sum()))
    return torch.from_numpy(t).long()


def min_snr_weight(sched, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ weights of a v-prediction loss, min(SNR, γ) / (SNR + 1) per timestep (Hang et
    al. 2023; diffusers' `snr_gamma`): the x0-loss weight min(SNR, γ), divided by the SNR + 1
    that the v-loss already carries. With zero-terminal-SNR betas it is 0 at t = 999."""
    a = sched.alphas_cumprod.to(t.device)[t].double()
    snr = a / (1 - a)
    return (snr.clamp(max=gamma) / (snr + 1)).float()


def drop_condition(rng: np.random.Generator, q: torch.Tensor, p: float) -> torch.Tensor:
    """`q` with each sample's condition zeroed with probability `p` (classifier-free guidance's
    condition dropout; zero is the normalised median phase, a flat field)."""
    keep = torch.from_numpy(rng.random(len(q)) >= p).to(q.device, q.dtype)
    return q * keep.view(-1, *([1] * (q.ndim - 1)))


def sample_guidance(rng: np.random.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    """Guidance scales w ~ U[lo, hi], one per sample (diffusers' LCM distillation)."""
    return torch.from_numpy(rng.uniform(lo, hi, size=n)).float()


def guided(cond: torch.Tensor, uncond: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance uncond + w·(cond - uncond) per sample (w = 1: the conditional
    prediction). For one z_t, x0 and ε are linear in v, so guiding v guides both alike."""
    return uncond + w.view(-1, *([1] * (cond.ndim - 1))) * (cond - uncond)
