"""The compact networks: a VAE with a thin decoder, a conditional latent U-Net, and Pix2Pix.

Design rules (measured on a 2-core CPU, see docs/architecture.md):
- no normalisation that pools over space (GroupNorm/InstanceNorm/attention): a network whose output
  at a pixel depends only on a local window gives identical results tiled or whole;
- the full-resolution stage is nearly free: the decoder works at 1/4 resolution and reaches full
  resolution through pixel shuffles;
- the qOBM condition enters the latent U-Net by pixel-unshuffle (a free, lossless re-arrangement),
  not through a second VAE encoder.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class ChannelNorm(nn.Module):
    """LayerNorm over channels at each pixel (tile-invariant, unlike GroupNorm)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ResBlock(nn.Module):
    """Pre-norm residual block; optional FiLM from a time embedding."""

    def __init__(self, cin: int, cout: int, emb_dim: int = 0):
        super().__init__()
        self.norm1 = ChannelNorm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = ChannelNorm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * cout) if emb_dim else None
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.film is not None and emb is not None:
            scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


# --------------------------------------------------------------------------------------------- VAE


class VAE(nn.Module):
    """DAPI autoencoder with a 4x or 8x downsampling latent; the decoder is deliberately thin."""

    def __init__(
        self,
        latent_channels: int = 4,
        enc_channels: int = 32,
        dec_channels: int = 32,
        factor: int = 4,
        dec_quarter_channels: int | None = None,
        dec_half_channels: int = 16,
        dec_half_conv: bool = True,
        dec_texture: bool = False,
    ):
        super().__init__()
        if factor not in (4, 8):
            raise ValueError(f"VAE factor must be 4 or 8, got {factor}")
        self.latent_channels = latent_channels
        self.factor = factor
        c, d = enc_channels, dec_channels
        extra = [] if factor == 4 else [nn.Conv2d(c, c, 3, stride=2, padding=1), ResBlock(c, c)]
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c // 2, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(c // 2, c, 3, stride=2, padding=1),
            ResBlock(c, c),
            nn.Conv2d(c, c, 3, stride=2, padding=1),
            ResBlock(c, c),
            *extra,
            ChannelNorm(c),
            nn.SiLU(),
            nn.Conv2d(c, 2 * latent_channels, 1),
        )
        self.decoder = Decoder(
            latent_channels, d, factor, dec_quarter_channels, dec_half_channels, dec_half_conv,
            dec_texture,
        )  # fmt: skip

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-20.0, 10.0)

    def decode(self, z: torch.Tensor, pixel_noise: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder(z, pixel_noise)

    @staticmethod
    def reparameterize(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """A latent drawn from the posterior N(mean, exp(logvar))."""
        return mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)

    def forward(self, x: torch.Tensor, sample: bool = True):
        mean, logvar = self.encode(x)
        z = self.reparameterize(mean, logvar) if sample else mean
        return self.decode(z), mean, logvar


#: The texture head predicts log(amplitude) / TEXTURE_GAIN: the gain is a learning-rate multiplier
#: for this one small head, so its amplitude can travel from the start (0.02 on the DAPI 0-1 scale,
#: a faint shot noise) to the data's within a stage's steps.
TEXTURE_GAIN = 10.0
TEXTURE_INIT_BIAS = math.log(0.02) / TEXTURE_GAIN


class Decoder(nn.Module):
    """Latent -> image: a little work at latent resolution, then pixel-shuffle steps to full size.

    factor 4: two ResBlocks at 1/4 res, shuffle to 1/2 (16 ch), one conv, shuffle to full res.
    factor 8: one ResBlock at 1/8 res and a first shuffle to 1/4 res (`quarter` channels, default
    channels/2), then the same two steps. `half` channels (16; 8 in the packaged inference decoder)
    run at 1/2 res, with an optional 3x3 conv there (`half_conv`): on a CPU the high-resolution
    end of the decoder costs as much as the whole latent U-Net, so it is kept as thin as possible.

    `texture`: a second head at the same features predicts, per pixel, the standard deviation of
    what the latent cannot say (shot noise, chromatin grain); given `pixel_noise` (N(0, 1), one
    value per output pixel) the output is mean + amplitude x noise, a stochastic decoder. Why
    noise and not a sharper deterministic decoder: a decoder that must invent texture from the 8x
    latent draws it cell by cell, a periodic hatching (docs/experiments.md, decoder critic);
    per-pixel noise has no period. Without `pixel_noise` it returns the mean.
    """

    def __init__(
        self,
        latent_channels: int = 4,
        channels: int = 32,
        factor: int = 4,
        quarter: int | None = None,
        half: int = 16,
        half_conv: bool = True,
        texture: bool = False,
    ):
        super().__init__()
        c = channels
        self.stem = nn.Conv2d(latent_channels, c, 3, padding=1)
        self.blocks = nn.Sequential(*[ResBlock(c, c) for _ in range(2 if factor == 4 else 1)])
        if factor == 8:
            q = quarter or c // 2
            self.up0 = nn.Sequential(nn.SiLU(), nn.Conv2d(c, 4 * q, 3, padding=1))
            self.up0.append(nn.PixelShuffle(2))
            c = q
        self.up1 = nn.Sequential(
            nn.SiLU(), nn.Conv2d(c, 4 * half, 3, padding=1), nn.PixelShuffle(2)
        )
        if half_conv:
            self.mid_res = nn.Sequential(nn.SiLU(), nn.Conv2d(half, half, 3, padding=1), nn.SiLU())
        else:
            self.mid_res = nn.SiLU()
        self.up2 = nn.Sequential(nn.Conv2d(half, 4, 3, padding=1), nn.PixelShuffle(2))
        self.texture = bool(texture)
        if self.texture:
            self.amplitude = nn.Sequential(nn.Conv2d(half, 4, 3, padding=1), nn.PixelShuffle(2))
            nn.init.zeros_(self.amplitude[0].weight)  # start at a faint shot noise
            nn.init.constant_(self.amplitude[0].bias, TEXTURE_INIT_BIAS)

    def with_texture_defaults(self, state: dict) -> dict:
        """`state` of a decoder without a texture head, completed with this one's starting head
        (transfer from a deterministic decoder); any other state is returned as is."""
        return _with_own_part(self, state, "amplitude.") if self.texture else state

    def forward(
        self, z: torch.Tensor, pixel_noise: torch.Tensor | None = None, parts: bool = False
    ):
        """The image (mean + amplitude x `pixel_noise` for a texture decoder given noise, else
        the mean); `parts=True`: (mean, amplitude), the amplitude None without a texture head."""
        h = self.blocks(self.stem(z))
        if hasattr(self, "up0"):
            h = self.up0(h)
        h = self.mid_res(self.up1(h))
        mean = self.up2(h)
        if not self.texture or (pixel_noise is None and not parts):
            return (mean, None) if parts else mean  # the smooth stain skips the amplitude head
        # detached: the amplitude is read off the mean's features and never reshapes them
        amp = torch.exp((TEXTURE_GAIN * self.amplitude(h.detach())).clamp(max=0.0))
        if parts:
            return mean, amp
        return mean + amp * pixel_noise


def _with_own_part(module: nn.Module, state: dict, prefix: str) -> dict:
    """`state` completed with `module`'s own entries under `prefix` when it has none there (a
    part the network adds to the one `state` came from starts at its initial weights)."""
    if any(k.startswith(prefix) for k in state):
        return state
    own = {k: v for k, v in module.state_dict().items() if k.startswith(prefix)}
    return {**state, **own}


# ------------------------------------------------------------------------------ conditional U-Net


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of diffusion timesteps (0..999)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class LatentUNet(nn.Module):
    """Predicts v for the DAPI latent, conditioned on qOBM by pixel-unshuffle + concatenation.

    `cond_channels` (optional): a small convolutional encoder of the qOBM at full resolution,
    one 3x3 conv per entry, the first at full resolution and each later one with stride 2 (so
    log2(factor) + 1 entries), whose features join the unshuffled pixels at the latent grid.
    Why: the unshuffled pixels reach the network only through one linear 3x3 stem conv, which
    must squeeze factor² sub-pixel values per cell into a few channels before any nonlinearity;
    nuclear rims are a nonlinear feature of the phase at full resolution. Measured on a small
    budget it did not help (docs/experiments.md, "conditioning encoder"), so the release has none;
    empty (the default) is the network before it.

    `guidance_embed` (guided consistency distillation, issue #24): a guidance scale w enters as a
    sinusoidal embedding of 1000·w (diffusers' `get_guidance_scale_embedding`) added to the
    time embedding before `time_mlp` through a bias-free linear layer (diffusers'
    `TimestepEmbedding.cond_proj`) that starts at zero, so a student built from a teacher
    computes exactly the teacher's function for every w until it trains. `forward(..., w=None)`
    uses `guidance_default`. False (the default) is the network before it.
    """

    def __init__(
        self,
        latent_channels: int = 4,
        factor: int = 4,
        channels: tuple[int, ...] = (24, 48, 96, 160),
        emb_dim: int = 128,
        cond_channels: tuple[int, ...] = (),
        guidance_embed: bool = False,
        guidance_default: float = 1.0,
    ):
        super().__init__()
        cond_channels = tuple(int(c) for c in cond_channels)
        if cond_channels and len(cond_channels) != int(math.log2(factor)) + 1:
            raise ValueError(
                f"cond_channels needs log2(factor) + 1 = {int(math.log2(factor)) + 1} entries "
                f"(one full-resolution conv, then one stride-2 conv per halving), got "
                f"{len(cond_channels)}"
            )
        self.cond_channels = cond_channels
        self.latent_channels = latent_channels
        self.factor = factor
        self.channels = tuple(channels)
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(
            nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.guidance_embed = bool(guidance_embed)
        self.guidance_default = float(guidance_default)
        if self.guidance_embed:
            self.guidance_proj = nn.Linear(emb_dim, emb_dim, bias=False)
            nn.init.zeros_(self.guidance_proj.weight)
        self.unshuffle = nn.PixelUnshuffle(factor)
        self.cond_encoder = None
        if cond_channels:
            layers: list[nn.Module] = [nn.Conv2d(1, cond_channels[0], 3, padding=1), nn.SiLU()]
            for a, b in zip(cond_channels, cond_channels[1:]):
                layers += [nn.Conv2d(a, b, 3, stride=2, padding=1), nn.SiLU()]
            self.cond_encoder = nn.Sequential(*layers)
        n_cond = factor * factor + (cond_channels[-1] if cond_channels else 0)
        self.stem = nn.Conv2d(latent_channels + n_cond, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        for i, c in enumerate(channels):
            self.down_blocks.append(ResBlock(channels[max(i - 1, 0)] if i else c, c, emb_dim))
            if i < len(channels) - 1:
                self.downsamples.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid = ResBlock(channels[-1], channels[-1], emb_dim)
        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for i in range(len(channels) - 2, -1, -1):
            self.upsamples.append(nn.Conv2d(channels[i + 1], channels[i], 3, padding=1))
            self.up_blocks.append(ResBlock(2 * channels[i], channels[i], emb_dim))
        self.out = nn.Sequential(
            ChannelNorm(channels[0]),
            nn.SiLU(),
            nn.Conv2d(channels[0], latent_channels, 3, padding=1),
        )

    @property
    def multiple(self) -> int:
        """Pixel tile sides must be multiples of this."""
        return self.factor * 2 ** (len(self.channels) - 1)

    def with_guidance_defaults(self, state: dict) -> dict:
        """`state` of a network without a guidance input (a teacher, an unguided LCM) completed
        with this one's zero guidance projection; any other state is returned as is."""
        return _with_own_part(self, state, "guidance_proj.") if self.guidance_embed else state

    def forward(
        self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, w: torch.Tensor | None = None
    ) -> torch.Tensor:
        """v for latents `z` at timesteps `t` given the qOBM `cond`; `w`: the guidance scale per
        sample (or a scalar) for a network with `guidance_embed`, default `guidance_default`."""
        if t.ndim == 0:
            t = t.expand(z.shape[0])
        temb = timestep_embedding(t, self.emb_dim).to(z.dtype)
        if self.guidance_embed:
            w = torch.as_tensor(self.guidance_default if w is None else w, device=z.device)
            w = w.float().expand(z.shape[0]) if w.ndim == 0 else w.float()
            temb = temb + self.guidance_proj(
                timestep_embedding(1000.0 * w, self.emb_dim).to(z.dtype)
            )
        elif w is not None:
            raise ValueError("this network has no guidance input (guidance_embed=False)")
        emb = self.time_mlp(temb)
        parts = [z, self.unshuffle(cond)]
        if self.cond_encoder is not None:
            parts.append(self.cond_encoder(cond))
        h = self.stem(torch.cat(parts, dim=1))
        skips = []
        for i, block in enumerate(self.down_blocks):
            h = block(h, emb)
            if i < len(self.downsamples):
                skips.append(h)
                h = self.downsamples[i](h)
        h = self.mid(h, emb)
        for up, block in zip(self.upsamples, self.up_blocks):
            h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


# -------------------------------------------------------------------------------------- Pix2Pix


class Pix2PixGenerator(nn.Module):
    """Isola et al. U-Net generator (4x4 stride-2 convs, skip connections), width-scaled.

    BatchNorm is used in eval mode at inference, i.e. a fixed per-channel affine: tile-invariant.
    """

    def __init__(self, ngf: int = 16, depth: int = 6, max_mult: int = 8):
        super().__init__()
        self.depth = depth
        chans = [min(ngf * 2**i, ngf * max_mult) for i in range(depth)]
        self.chans = chans
        self.downs = nn.ModuleList()
        cin = 1
        for i, c in enumerate(chans):
            layers: list[nn.Module] = [] if i == 0 else [nn.LeakyReLU(0.2)]
            layers.append(
                nn.Conv2d(cin, c, 4, stride=2, padding=1, bias=(i == 0 or i == depth - 1))
            )
            if 0 < i < depth - 1:
                layers.append(nn.BatchNorm2d(c))
            self.downs.append(nn.Sequential(*layers))
            cin = c
        self.ups = nn.ModuleList()
        for i in range(depth - 1, 0, -1):
            cin_up = chans[i] if i == depth - 1 else 2 * chans[i]
            self.ups.append(
                nn.Sequential(
                    nn.ReLU(),
                    nn.ConvTranspose2d(cin_up, chans[i - 1], 4, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(chans[i - 1]),
                )
            )
        self.final = nn.Sequential(
            nn.ReLU(), nn.ConvTranspose2d(2 * chans[0], 1, 4, stride=2, padding=1)
        )

    @property
    def multiple(self) -> int:
        return 2**self.depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        h = x
        for down in self.downs:
            h = down(h)
            skips.append(h)
        skips.pop()
        for up in self.ups:
            h = torch.cat([up(h), skips.pop()], dim=1)
        # tanh output mapped to the 0-1 DAPI range
        return 0.5 * (torch.tanh(self.final(h)) + 1.0)


class PatchDiscriminator(nn.Module):
    """70x70 PatchGAN, width-scaled: on (qOBM, DAPI) pairs for Pix2Pix (`in_channels=2`), on
    DAPI alone for the decoder's realism term (`in_channels=1`). `features` also returns the
    hidden activations, which feature matching compares."""

    def __init__(self, ndf: int = 32, in_channels: int = 2):
        super().__init__()
        c = ndf
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, c, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(c, 2 * c, 4, 2, 1, bias=False),
            nn.BatchNorm2d(2 * c),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * c, 4 * c, 4, 2, 1, bias=False),
            nn.BatchNorm2d(4 * c),
            nn.LeakyReLU(0.2),
            nn.Conv2d(4 * c, 8 * c, 4, 1, 1, bias=False),
            nn.BatchNorm2d(8 * c),
            nn.LeakyReLU(0.2),
            nn.Conv2d(8 * c, 1, 4, 1, 1),
        )

    def forward(self, *images: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat(images, dim=1))

    def features(self, *images: torch.Tensor) -> list[torch.Tensor]:
        """The output of every LeakyReLU, then the patch logits."""
        x, out = torch.cat(images, dim=1), []
        for layer in self.net:
            x = layer(x)
            if isinstance(layer, nn.LeakyReLU):
                out.append(x)
        return out + [x]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


ARCHITECTURES = {"VAE": VAE, "LatentUNet": LatentUNet, "Pix2PixGenerator": Pix2PixGenerator}


def build(arch: dict) -> nn.Module:
    """Instantiate a network from the `{"class": ..., "kwargs": {...}}` stored in a checkpoint config."""
    cls_name = arch.get("class")
    if cls_name not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {cls_name!r} in checkpoint config; expected one of "
            f"{sorted(ARCHITECTURES)} (was the checkpoint made by a newer napari-lcm-stain?)"
        )
    kwargs = dict(arch.get("kwargs", {}))
    for key in ("channels", "cond_channels"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return ARCHITECTURES[cls_name](**kwargs)
