"""A tiny fixed conv net implementing the `sampling.Predictor` contract, for engine tests.

It has the structure that matters to the tiler: a `multiple` of 16, a noise input on a 1/4-scale
latent grid, a pointwise normalisation, and a receptive field (~30 px) below the default overlap, so
tiled and whole-image predictions must agree when blending and noise cropping are right.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class FakePredictor:
    """Deterministic stand-in for `sampling.load_predictor(...)` (weights from a fixed seed)."""

    multiple = 16
    latent_factor = 4
    noise_channels = 4
    pixel_size = 0.25
    receptive_field = 30

    def __init__(self, n_noise: int = 1, noise_gain: float = 0.3, seed: int = 0, name="Fake"):
        self.n_noise = n_noise
        self.noise_gain = noise_gain
        self.name = name
        self.device = torch.device("cpu")
        self.calls = 0
        g = torch.Generator().manual_seed(seed)
        self.enc = nn.Conv2d(1, 8, 5, padding=2)
        self.mid = nn.Conv2d(8 + self.noise_channels, 8, 3, padding=1)
        self.dec = nn.Conv2d(8, 1, 3, padding=1)
        for m in (self.enc, self.mid, self.dec):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.3)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            m.requires_grad_(False)

    def noise_shape(self, h: int, w: int):
        if not self.n_noise:
            return None
        f = self.latent_factor
        return (self.n_noise, self.noise_channels, h // f, w // f)

    def normalize(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float32) - 0.1) / 0.5

    def __call__(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        with torch.inference_mode():
            h = torch.tanh(self.enc(x))
            h = nn.functional.avg_pool2d(h, self.latent_factor)
            if self.n_noise:
                if noise is None:
                    raise ValueError("noise required")
                z = noise.sum(dim=1) * self.noise_gain
            else:
                z = torch.zeros(h.shape[0], self.noise_channels, *h.shape[2:])
            h = torch.tanh(self.mid(torch.cat([h, z], dim=1)))
            h = nn.functional.interpolate(h, scale_factor=self.latent_factor, mode="nearest")
            return torch.sigmoid(self.dec(h) + x * 0.5)


def fake_loader() -> FakePredictor:
    """Picklable zero-argument loader, as dask workers use to build their own predictor."""
    return FakePredictor()


def blobs(shape=(256, 256), seed=0, n=None) -> np.ndarray:
    """Random smooth blobs (nucleus-like phase features) for tests: float32, roughly -0.4..1."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    shape = tuple(shape)
    img = np.zeros(shape, np.float32)
    n = n or max(1, int(np.prod(shape) / 600))
    idx = tuple(rng.integers(0, s, n) for s in shape)
    img[idx] = rng.uniform(0.5, 2.0, n).astype(np.float32)
    sigma = (0,) * (len(shape) - 2) + (3.0, 3.0)
    img = ndimage.gaussian_filter(img, sigma) * 20
    img += rng.normal(0, 0.02, shape).astype(np.float32)
    return img.astype(np.float32)


class EchoPredictor(FakePredictor):
    """Returns the input (n_noise=0) or its first noise channel upsampled: exact tiling checks."""

    def __init__(self, mode: str = "input"):
        super().__init__(n_noise=1 if mode == "noise" else 0)
        self.mode = mode

    def __call__(self, x, noise=None):
        self.calls += 1
        if self.mode == "input":
            return x.clone()
        z = noise[:, 0, :1]
        return torch.nn.functional.interpolate(z, scale_factor=self.latent_factor, mode="nearest")


def packaged_predictor(name: str = "lcm", steps=None):
    """The packaged model on CPU, or None while the weights are not trained/packaged yet."""
    try:
        from napari_lcm_stain import checkpoints
        from napari_lcm_stain.sampling import load_predictor
    except ImportError:
        return None
    if not checkpoints.packaged_path(name).exists():
        return None
    return load_predictor(name, steps=steps, device="cpu")


def texture_lcm(path, seed: int = 0):
    """A small LCM checkpoint whose decoder has a texture head (`models.Decoder(texture=True)`):
    random, untrained weights with a visible grain amplitude, loaded by the real loader. The
    packaged weights may not have a texture head, so texture tests build their own model."""
    return small_lcm(path, seed, texture=True)


def guided_lcm(path, seed: int = 0, guidance=None):
    """A small guided LCM checkpoint (a guidance input, issue #24): random, untrained weights,
    its config accepting `guidance` (default: w from 1 to 3, default 2), so guidance tests do
    not depend on what the packaged release accepts."""
    return small_lcm(path, seed, guidance=guidance or {"min": 1.0, "max": 3.0, "default": 2.0})


def small_lcm(path, seed: int = 0, *, texture: bool = False, guidance: dict | None = None):
    """A small random LCM checkpoint (non-trivial weights: the zero-initialised convolutions
    are perturbed too), optionally with a texture head or a guidance input and range."""
    from napari_lcm_stain import checkpoints
    from napari_lcm_stain.models import VAE, LatentUNet
    from napari_lcm_stain.normalization import robust_config

    unet_kwargs = {"latent_channels": 4, "factor": 4, "channels": [8, 16]}
    if guidance:
        unet_kwargs.update(guidance_embed=True, guidance_default=float(guidance["default"]))
    vae_kwargs = {"latent_channels": 4, "enc_channels": 8, "dec_channels": 8, "factor": 4}
    if texture:
        vae_kwargs["dec_texture"] = True
    with torch.random.fork_rng():  # the global RNG of the other tests is left alone
        torch.manual_seed(seed)
        unet = LatentUNet(**{**unet_kwargs, "channels": tuple(unet_kwargs["channels"])})
        vae = VAE(**vae_kwargs)
        if texture:
            nn.init.constant_(vae.decoder.amplitude[0].bias, -0.2)  # amplitude ~exp(-2) = 0.13
        nn.init.constant_(vae.decoder.up2[0].bias, 0.5)  # a mean inside 0-1, not clipped
        for m in (unet, vae.decoder):
            for p in m.parameters():  # non-trivial weights (zero-initialised convs too)
                p.data += 0.05 * torch.randn_like(p)
    cfg = {
        "kind": "lcm",
        "architecture": {
            "unet": {"class": "LatentUNet", "kwargs": unet_kwargs},
            "vae": {"class": "VAE", "kwargs": vae_kwargs},
        },
        "latent_scale": 1.0,
        "normalization": robust_config(),
        "pixel_size": 0.414,
        "receptive_field": 16,
    }
    if guidance:
        cfg["guidance"] = dict(guidance)
    return checkpoints.save_checkpoint(path, {"unet": unet, "decoder": vae.decoder}, cfg)
