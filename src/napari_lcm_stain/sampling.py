"""Turning trained networks into predictors: teacher DDIM, LCM 1-4 steps, Pix2Pix.

All scheduler math (noise schedule, DDIM updates, LCM boundary scalings, timestep grids) comes from
diffusers, built from ONE scheduler config stored in the checkpoint. We only choose the noise: the
engine draws it once per image canvas so overlapping tiles agree.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler

from . import checkpoints as ckpt
from . import normalization
from ._params import check_guidance, guidance_method, guidance_range
from .device import inference_dtype, prepare_module, resolve_device, to_device
from .models import build

# v-prediction with zero-terminal-SNR betas and trailing spacing: epsilon-prediction with SD's
# betas failed in a CPU-budget feasibility run (see docs/model-card.md).
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
    "clip_sample": False,
    "set_alpha_to_one": False,
}

DEFAULT_STEPS = {"lcm": 1, "teacher": 50, "pix2pix": 1}
_MASK32 = 0xFFFFFFFF


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """An integer hash finaliser on 32-bit values held in int64 (multipliers < 2^31, so no
    product leaves int64's range on any device)."""
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _MASK32
    h = h ^ (h >> 15)
    h = (h * 0x346CA68B) & _MASK32
    return h ^ (h >> 16)


def pixel_noise(latent_noise: torch.Tensor, factor: int) -> torch.Tensor:
    """Per-pixel N(0, 1) noise for a texture decoder, derived from the latent noise canvas:
    (B, C, h, w) -> (B, 1, h·factor, w·factor), float32.

    Why derived, not drawn: the engine crops one latent noise canvas per image so overlapping
    tiles agree (tiling.make_noise_canvas); hashing each latent cell's noise bits with the pixel's
    offset inside the cell gives every output pixel a value that depends only on its position in
    the canvas, so tiled = whole holds for the texture too, with no second full-size canvas. The
    hash makes the values independent of the latent noise they come from (no latent-locked
    pattern), standard normal through the inverse CDF of 24 hashed bits."""
    x = latent_noise.float().contiguous()
    bits = x.view(torch.int32).to(torch.int64) & _MASK32
    key = torch.zeros_like(bits[:, :1])
    for c in range(min(4, bits.shape[1])):
        key = _mix32(key ^ bits[:, c : c + 1])
    k = torch.arange(factor * factor, device=x.device, dtype=torch.int64).view(1, -1, 1, 1)
    h = _mix32(key ^ ((k * 0x61C88647 + 0x2545F491) & _MASK32))
    u = ((h >> 8).to(torch.float64) + 0.5) / float(1 << 24)
    eps = torch.special.ndtri(u).to(torch.float32)
    return torch.nn.functional.pixel_shuffle(eps, factor)


MAX_LCM_STEPS = 8


@contextlib.contextmanager
def _hub_offline():
    """Hugging Face Hub offline mode for the duration (the env var, and the flag huggingface_hub
    read from it at import), so nothing in diffusers can reach the network."""
    from huggingface_hub import constants

    old_env, old_flag = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old_flag
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _scheduler(cls, config: dict | None):
    """A diffusers scheduler built from a config dict only: given a string, diffusers'
    `from_config` would treat it as a Hub repo id and try to download it."""
    config = SCHEDULER_CONFIG if config is None or config == {} else config
    if not isinstance(config, dict):
        raise ckpt.CheckpointError(
            f"scheduler config must be a JSON object of scheduler settings, got "
            f"{type(config).__name__} {config!r}; restore the checkpoint's original .json"
        )
    with _hub_offline():
        return cls.from_config(dict(config))


def train_scheduler(config: dict | None = None) -> DDPMScheduler:
    return _scheduler(DDPMScheduler, config)


def lcm_scheduler(config: dict | None = None) -> LCMScheduler:
    return _scheduler(LCMScheduler, config)


def ddim_scheduler(config: dict | None = None) -> DDIMScheduler:
    return _scheduler(DDIMScheduler, config)


class Predictor:
    """What the tiling engine calls: normalised qOBM tile(s) in, DAPI in 0-1 out.

    See docs/architecture.md for the contract (multiple, pixel_size, noise_shape, normalize, call).
    """

    name = "model"
    multiple = 1
    latent_factor = 1
    noise_channels = 0
    n_noise = 0
    has_texture = False  # a texture decoder (LatentPredictor sets it from its decoder)
    texture = False  # its grain is drawn
    guidance: float | None = None  # the guidance scale it samples with (None: no guidance)

    def __init__(self, config: dict, device: torch.device, dtype: torch.dtype | None = None):
        self.config = config
        self.device = device
        self.dtype = dtype or inference_dtype(device)
        self.normalization = config.get("normalization") or {}
        self.pixel_size = float(config.get("pixel_size", 0.414))
        self.receptive_field = int(config.get("receptive_field", 64))

    def norm_stats(self, plane) -> dict:
        """Centre and scale of one whole plane under the checkpoint's normalisation: computed
        once before tiling, so every tile of the plane is normalised alike."""
        return normalization.plane_stats(self.normalization, plane)

    def normalize(self, x: np.ndarray, stats: dict | None = None) -> np.ndarray:
        """The training normalisation (stored in the checkpoint). With `stats` (from
        `norm_stats` of the whole plane) `x` may be a tile; without, `x` is whole planes."""
        if stats is None:
            return normalization.normalize(self.normalization, x)
        return normalization.apply(x, stats, float(self.normalization.get("clip", 10.0)))

    def noise_shape(self, h: int, w: int) -> tuple[int, ...] | None:
        if not self.n_noise:
            return None
        f = self.latent_factor
        return (self.n_noise, self.noise_channels, h // f, w // f)

    def __call__(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        with torch.inference_mode():
            x = to_device(x, self.device, self.dtype)
            eps = None
            if noise is not None:
                noise = to_device(noise, self.device, torch.float32)
                eps = self._pixel_noise(noise)  # from the float32 canvas: same grain in any dtype
                noise = noise.to(self.dtype)
            y = self._forward(x, noise, eps)
            return y.float().clamp_(0.0, 1.0).cpu()

    def _pixel_noise(self, noise: torch.Tensor) -> torch.Tensor | None:
        """The texture decoder's per-pixel noise for this call, or None (no grain drawn)."""
        if not self.texture:
            return None
        src = noise[:, 0]
        if src.device.type == "mps":  # int64 hashing and ndtri: on the CPU where MPS lacks them
            src = src.cpu()
        return pixel_noise(src, self.latent_factor).to(noise.device, self.dtype)

    def _forward(self, x, noise, eps):  # pragma: no cover - abstract
        raise NotImplementedError

    def with_texture(self, texture: bool) -> Predictor:
        """This predictor drawing (or not) a texture decoder's grain: itself when nothing
        changes (no texture decoder, or already so), else a shallow copy sharing the networks,
        so a predictor someone else holds is never changed."""
        want = bool(texture) and self.has_texture
        if want == self.texture:
            return self
        clone = copy.copy(self)
        clone.texture = want
        return clone

    def with_guidance(self, guidance) -> Predictor:
        """This predictor sampling at guidance `guidance` (None: the model's default), checked
        by `_params.check_guidance`: itself when nothing changes, else a shallow copy sharing the
        networks. A model without guidance (Pix2Pix) accepts only None or 1."""
        check_guidance(guidance, None)
        return self


class LatentPredictor(Predictor):
    """Latent U-Net + thin VAE decoder; `mode` 'lcm' (1-8 steps) or 'ddim' (teacher, N steps).

    `texture`: with a texture decoder (`models.Decoder(texture=True)`), draw its per-pixel noise
    (`pixel_noise`, from the first latent noise, at float32 whatever the precision, so the grain
    does not change with the dtype) and return a grainy stain; False (the default) returns the
    decoder's mean, the smooth stain (docs/model-card.md: the grain costs SSIM and nuclei F1)."""

    def __init__(
        self, unet, decoder, config: dict, device, mode: str, steps: int, dtype=None, compile=False,
        texture: bool = False, guidance: float | None = None,
    ):  # fmt: skip
        super().__init__(config, device, dtype)
        self.guidance = check_guidance(guidance, guidance_range(config))
        self.has_texture = bool(getattr(decoder, "texture", False))
        self.texture = bool(texture) and self.has_texture
        self.unet = prepare_module(unet, device, self.dtype, compile)
        self.decoder = prepare_module(decoder, device, self.dtype, compile)
        self.mode = mode
        self.steps = int(steps)
        self.latent_scale = float(config["latent_scale"])
        self.latent_factor = unet.factor
        self.noise_channels = unet.latent_channels
        self.multiple = unet.multiple
        sched_cfg = config.get("scheduler", SCHEDULER_CONFIG)
        if mode == "lcm":
            self.scheduler = lcm_scheduler(sched_cfg)
            self.n_noise = self.steps
        else:
            self.scheduler = ddim_scheduler(sched_cfg)
            self.n_noise = 1
        self.scheduler.set_timesteps(self.steps)
        self.timesteps = [int(t) for t in self.scheduler.timesteps]
        self.name = f"LCM-{self.steps}" if mode == "lcm" else f"teacher DDIM-{self.steps}"

    def with_guidance(self, guidance) -> Predictor:
        w = check_guidance(guidance, guidance_range(self.config))
        if w == self.guidance:
            return self
        clone = copy.copy(self)
        clone.guidance = w
        return clone

    @property
    def guidance_method(self) -> str:
        """How guidance is applied: `_params.guidance_method` of the config, by this mode."""
        return guidance_method({**self.config, "kind": self.mode})

    def _velocity(self, z, t, x):
        """The U-Net's v: a guided LCM gets w as an input; classifier-free guidance gives
        uncond + w·(cond − uncond), both branches in one batch (the unconditional one sees a
        zero qOBM, as in training; a network with a guidance input runs them at w = 1)."""
        w = self.guidance
        one = (1.0,) if getattr(self.unet, "guidance_embed", False) else ()
        if w is None:
            return self.unet(z, t, x)
        if self.guidance_method == "embedding":
            return self.unet(z, t, x, w)
        if w == 1.0:
            return self.unet(z, t, x, *one)
        zz, tt = torch.cat([z, z]), torch.cat([t, t])
        cond, uncond = self.unet(zz, tt, torch.cat([x, torch.zeros_like(x)]), *one).chunk(2)
        return uncond + w * (cond - uncond)

    def _forward(self, x, noise, eps):
        if noise is None:
            raise ValueError("latent models need a noise tensor (the engine draws it per canvas)")
        sched = self.scheduler
        sched.set_timesteps(self.steps)
        z = noise[:, 0]
        for i, t in enumerate(self.timesteps):
            tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            v = self._velocity(z, tt, x)
            if self.mode == "lcm":
                denoised = sched.step(v, t, z).denoised
                if i + 1 < len(self.timesteps):
                    nxt = torch.tensor([self.timesteps[i + 1]])
                    z = sched.add_noise(denoised, noise[:, i + 1], nxt)
                else:
                    z = denoised
            else:
                out = sched.step(v, t, z, eta=0.0)
                last = i + 1 == len(self.timesteps)
                z = out.pred_original_sample if last else out.prev_sample
        if eps is not None:
            return self.decoder(z / self.latent_scale, eps)
        return self.decoder(z / self.latent_scale)


class PixelPredictor(Predictor):
    """Pix2Pix generator: one pass at full resolution, no noise."""

    name = "Pix2Pix"

    def __init__(self, generator, config: dict, device, dtype=None, compile=False):
        super().__init__(config, device, dtype)
        self.generator = prepare_module(generator, device, self.dtype, compile)
        self.multiple = generator.multiple

    def _forward(self, x, noise, eps):
        return self.generator(x)


def predictor_from_checkpoint(
    checkpoint: ckpt.Checkpoint,
    steps: int | None = None,
    device="auto",
    mode: str | None = None,
    precision: str = "auto",
    compile: bool = False,
    texture: bool = False,
    guidance: float | None = None,
) -> Predictor:
    """Build the right predictor for a checkpoint's `kind` ('lcm', 'teacher' or 'pix2pix').

    `precision`: 'auto' (fp16 on CUDA, fp32 elsewhere), 'fp32', 'bf16' or 'fp16' (GPU only);
    `compile`: `torch.compile` the networks on CUDA; `texture`: True = draw a texture decoder's
    grain (`LatentPredictor`; no effect on other models); `guidance`: the guidance scale
    (`_params.check_guidance`; None = the model's default)."""
    dev = resolve_device(device)
    dtype = inference_dtype(dev, precision)
    cfg = checkpoint.config
    kind = mode or cfg.get("kind")
    if kind == "pix2pix":
        gen = build(cfg["architecture"]["generator"])
        ckpt.load_into(gen, checkpoint.sub("generator"), "Pix2Pix generator")
        return PixelPredictor(gen, cfg, dev, dtype, compile).with_guidance(guidance)
    if kind in ("lcm", "teacher"):
        unet = build(cfg["architecture"]["unet"])
        vae = build(cfg["architecture"]["vae"])
        ckpt.load_into(unet, checkpoint.sub("unet"), "latent U-Net")
        ckpt.load_into(vae.decoder, checkpoint.sub("decoder"), "VAE decoder")
        n = steps or DEFAULT_STEPS[kind]
        if kind == "lcm" and not 1 <= n <= MAX_LCM_STEPS:
            raise ValueError(f"LCM steps must be 1-{MAX_LCM_STEPS} (1 is the default), got {n}")
        if kind == "teacher" and not 1 <= n <= 1000:
            raise ValueError(f"teacher DDIM steps must be 1-1000, got {n}")
        mode = "lcm" if kind == "lcm" else "ddim"
        return LatentPredictor(
            unet, vae.decoder, cfg, dev, mode, n, dtype, compile, texture, guidance
        )
    raise ckpt.CheckpointError(
        f"checkpoint kind {kind!r} is not a stain model (expected 'lcm', 'teacher' or 'pix2pix')"
    )


def load_predictor(
    model="lcm",
    steps: int | None = None,
    device="auto",
    precision="auto",
    compile=False,
    texture: bool = False,
    guidance: float | None = None,
) -> Predictor:
    """'lcm' | 'pix2pix' | 'teacher' (packaged, hash-verified) or a path to a .safetensors checkpoint."""
    if isinstance(model, Predictor):
        return model
    opts = {"precision": precision, "compile": compile, "texture": texture, "guidance": guidance}
    if isinstance(model, str) and model.lower() in ckpt.PACKAGED:
        return predictor_from_checkpoint(ckpt.load_packaged(model.lower()), steps, device, **opts)
    if isinstance(model, (str, Path)):
        path = Path(model)
        if path.suffix != ".safetensors" and not path.exists():
            raise ValueError(
                f"unknown model {str(model)!r}: use 'lcm', 'pix2pix', 'teacher' or a path to a "
                ".safetensors checkpoint"
            )
        return predictor_from_checkpoint(ckpt.load_checkpoint(path), steps, device, **opts)
    raise TypeError(
        f"model must be a name, a checkpoint path or a Predictor, not {type(model).__name__}"
    )
