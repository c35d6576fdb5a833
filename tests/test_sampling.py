"""Scheduler math comes from diffusers; check our distillation grid and scalings against it."""

import numpy as np
import torch
from diffusers import LCMScheduler

from napari_lcm_stain import sampling
from napari_lcm_stain import training as train


def test_solver_grid_matches_lcm_scheduler_and_ddim():
    grid, k = train.lcm_solver_grid()
    assert k == 20 and grid[0] == 19 and grid[-1] == 999 and len(grid) == 50
    lcm = LCMScheduler.from_config(sampling.SCHEDULER_CONFIG)
    lcm.set_timesteps(4)
    # LCM's inference timesteps are drawn from the same 50-step skipping grid
    assert set(int(t) for t in lcm.timesteps) <= set(int(t) for t in grid)
    ddim = sampling.ddim_scheduler()
    ddim.set_timesteps(50)
    assert sorted(int(t) for t in ddim.timesteps) == list(grid)


def test_boundary_scalings_are_diffusers_and_match_the_paper():
    lcm = sampling.lcm_scheduler()
    t = torch.tensor([0, 19, 499, 999])
    c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(t)
    s = 10.0 * t.double()
    np.testing.assert_allclose(c_skip.double(), 0.25 / (s**2 + 0.25), rtol=1e-5)
    np.testing.assert_allclose(c_out.double(), s / torch.sqrt(s**2 + 0.25), rtol=1e-5)
    assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0


def test_v_prediction_inversion_is_exact():
    sched = sampling.train_scheduler()
    z0, eps = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 100, 700, 999])
    zt = sched.add_noise(z0, eps, t)
    v = sched.get_velocity(z0, eps, t)
    torch.testing.assert_close(train.x0_from_v(sched, zt, v, t), z0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(train.eps_from_v(sched, zt, v, t)[:3], eps[:3], atol=1e-4, rtol=1e-4)


def test_zero_terminal_snr_and_v_prediction_config():
    sched = sampling.train_scheduler()
    assert float(sched.alphas_cumprod[-1]) < 1e-6
    assert sched.config.prediction_type == "v_prediction"
    assert sampling.lcm_scheduler().config.clip_sample is False


def test_pixel_noise_is_white_standard_normal_and_crops_with_the_latent_canvas():
    """The texture decoder's per-pixel noise: N(0, 1), no correlation between neighbours or at
    the latent period, independent of the latent noise it is hashed from, and a crop of the
    latent canvas gives exactly the same crop of the pixel noise (tiled = whole)."""
    import numpy as np

    from napari_lcm_stain.sampling import pixel_noise

    lat = torch.randn(2, 8, 64, 64, generator=torch.Generator().manual_seed(1))
    eps = pixel_noise(lat, 8)
    assert eps.shape == (2, 1, 512, 512) and eps.dtype == torch.float32
    a = eps.numpy().ravel()
    assert abs(a.mean()) < 0.01 and abs(a.std() - 1) < 0.01
    e = eps[0, 0].numpy()
    for dy, dx in ((0, 1), (1, 0), (0, 8), (8, 0), (1, 1)):
        r = np.corrcoef(e[dy:, dx:].ravel(), e[: 512 - dy, : 512 - dx].ravel())[0, 1]
        assert abs(r) < 0.02, (dy, dx, r)
    up = np.kron(lat[0, 0].numpy(), np.ones((8, 8)))
    assert abs(np.corrcoef(up.ravel(), e.ravel())[0, 1]) < 0.02
    col = e.mean(0)
    spec = np.abs(np.fft.rfft(col - col.mean())) ** 2
    assert spec[512 // 8] < 10 * np.median(spec)  # no power peak at the latent period
    crop = pixel_noise(lat[:, :, 8:40, 16:48], 8)
    assert torch.equal(crop, eps[:, :, 64:320, 128:384])
    assert not torch.equal(pixel_noise(lat + 1e-3, 8), eps)  # other noise, other pixels
    half = pixel_noise(lat.to(torch.bfloat16), 8)  # GPU half-precision canvases work too
    assert half.shape == eps.shape and abs(float(half.std()) - 1) < 0.02
