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


def consistency(lcm, sched, net, z, t, q):
    """The consistency function f(z_t, t) = c_skip(t) z_t + c_out(t) x0(z_t, t) (Luo et al.), with
    diffusers' LCM boundary scalings and a v-predicting network `net(z, t, q)`."""
    c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(t)
    x0 = x0_from_v(sched, z, net(z, t, q), t)
    c_skip, c_out = c_skip.to(z.device).view(-1, 1, 1, 1), c_out.to(z.device).view(-1, 1, 1, 1)
    return c_skip * z + c_out * x0


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
