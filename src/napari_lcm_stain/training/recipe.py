"""The recipe: which stages run, in what order, what each one loads and saves, and resuming.

VAE -> decoder -> teacher -> LCM -> polish -> Pix2Pix into one run folder. A stage whose
checkpoint exists is skipped (resume); the timings go to `timings.json`.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from .. import checkpoints as ckpt
from .._version import __version__
from ..device import resolve_device
from ..models import VAE, LatentUNet, count_parameters
from ..sampling import SCHEDULER_CONFIG
from . import stages as st
from .data import PairedData, make_training_data
from .loop import barrier, dist_info, maybe_init_distributed
from .packaging import calibrate_receptive_field, package_weights
from .presets import STAGES, TrainPreset, get_train_preset


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
    dev = resolve_device(device)  # a device that is not there fails here, before any work
    torch.set_num_threads(threads or p.threads)
    owns_group = maybe_init_distributed(dev)
    if dev.type == "cuda" and owns_group:
        dev = torch.device("cuda", torch.cuda.current_device())
    try:
        t0 = time.time()
        data = make_training_data(p, seed)
        return Recipe(p, Path(out), seed, data, resume, quiet, t0, dev).run(stages, package)
    finally:
        if owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


class Recipe:
    """One run folder: the stages' order, what each loads and saves, and resuming."""

    def __init__(self, p, out, seed, data: PairedData, resume, quiet, t_data: float, dev=None):
        self.p, self.out, self.seed, self.data = p, out, seed, data
        self.resume, self.quiet = resume, quiet
        self.dev = dev or torch.device("cpu")
        self.is_main = dist_info()[0] == 0
        out.mkdir(parents=True, exist_ok=True)
        self.timings_file = out / "timings.json"
        self.timings = (
            json.loads(self.timings_file.read_text())
            if (resume and self.timings_file.exists())
            else {}
        )
        self.save_timing("data", t_data)
        self.latent_scale = 1.0

    # -- bookkeeping

    def done(self, name: str) -> bool:
        return self.resume and (self.out / f"{name}.safetensors").exists()

    def save_timing(self, name: str, t0: float) -> None:
        self.timings[name] = round(time.time() - t0, 1)
        if self.is_main:
            ckpt.atomic_write_bytes(self.timings_file, json.dumps(self.timings, indent=2).encode())

    def base_config(self, kind: str) -> dict:
        p, data, seed = self.p, self.data, self.seed
        return {
            "kind": kind,
            "normalization": dict(data.normalization),
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

    def save(self, name: str, modules: dict, config: dict) -> None:
        """Under torchrun only rank 0 writes; every rank waits until the file is there.

        Stain models get their measured `receptive_field` right away, so a run's own checkpoints
        tile seam-free without waiting for `--package`."""
        path = self.out / f"{name}.safetensors"
        if self.is_main:
            ckpt.save_checkpoint(path, modules, config)
            if config.get("kind") in ("lcm", "teacher", "pix2pix"):
                calibrate_receptive_field(path)
        barrier()

    # -- loading what earlier stages made

    def load_vae(self) -> VAE:
        vae = st.make_vae(self.p)
        ckpt.load_into(vae, ckpt.load_checkpoint(self.out / "vae.safetensors").sub("vae"), "VAE")
        return vae.eval()

    def inference_vae(self) -> VAE:
        if self.p.decoder_steps <= 0:
            return self.vae
        path = self.out / "decoder.safetensors"
        if self.p.polish_steps > 0 and (self.out / "polish.safetensors").exists():
            path = self.out / "polish.safetensors"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} missing: run the decoder stage (it follows the VAE) before teacher/lcm"
            )
        thin = st.make_inference_vae(self.p)
        ckpt.load_into(thin, ckpt.load_checkpoint(path).sub("vae"), "inference VAE")
        return thin.eval()

    def load_unet(self, name: str) -> LatentUNet:
        unet = st.make_unet(self.p)
        ckpt.load_into(
            unet, ckpt.load_checkpoint(self.out / f"{name}.safetensors").sub("unet"), name
        )
        return unet

    # -- saving

    def save_vae(self, stage: str, vae: VAE, inference: bool) -> None:
        arch = st.vae_arch(self.p, inference=inference)
        self.save(stage, {"vae": vae}, {**self.base_config(stage), "architecture": {"vae": arch}})

    def save_latent_model(self, name: str, unet: LatentUNet, v: VAE | None = None) -> None:
        v = self.inference_vae() if v is None else v
        cfg = self.base_config(name)
        cfg.update(
            architecture={"unet": st.unet_arch(self.p), "vae": st.vae_arch(self.p, True)},
            scheduler=dict(SCHEDULER_CONFIG),
            latent_scale=self.latent_scale,
            multiple=unet.multiple,
            receptive_field=64,
            parameters={
                "unet": count_parameters(unet),
                "decoder": count_parameters(v.decoder),
                "encoder": count_parameters(v.encoder),
            },
        )
        cfg["provenance"]["stage_seconds"] = self.timings
        self.save(name, {"unet": unet, "decoder": v.decoder, "encoder": v.encoder}, cfg)

    def rewrite_decoders(self) -> None:
        """Teacher and LCM never see the decoder (they live in latent space), so checkpoints saved
        before a decoder stage only need the new decoder written into them."""
        v = self.inference_vae()
        for name in ("teacher", "lcm"):
            if (self.out / f"{name}.safetensors").exists():
                self.save_latent_model(name, self.load_unet(name), v)

    # -- the stages in order

    def timed(self, name: str, fn, *args):
        t0 = time.time()
        result = fn(*args)
        self.save_timing(name, t0)
        return result

    def run(self, stages: list[str], package: bool) -> dict[str, Path]:
        p, data, seed, out, quiet = self.p, self.data, self.seed, self.out, self.quiet
        common = (p, seed, out, quiet, self.dev)

        if "vae" in stages and not self.done("vae"):
            self.save_vae("vae", self.timed("vae", st.train_vae, data, *common), inference=False)
        self.vae = self.load_vae()
        raw = st.encode_latents(self.vae, data.dapi)
        self.latent_scale = float(1.0 / (raw.std() + 1e-6))
        data.latents = (raw * self.latent_scale).astype(np.float32)

        if p.decoder_steps > 0 and "decoder" in stages and not self.done("decoder"):
            thin = self.timed("decoder", st.train_decoder, data, self.vae, *common)
            self.save_vae("decoder", thin, inference=True)
            self.rewrite_decoders()

        if "teacher" in stages and not self.done("teacher"):
            self.save_latent_model(
                "teacher", self.timed("teacher", st.train_teacher, data, *common)
            )

        if "lcm" in stages and not self.done("lcm"):
            teacher = self.load_unet("teacher")
            self.save_latent_model("lcm", self.timed("lcm", st.distill_lcm, data, teacher, *common))

        if p.polish_steps > 0 and "polish" in stages and not self.done("polish"):
            args = (data, self.inference_vae(), self.load_unet("lcm"), self.latent_scale)
            self.save_vae("polish", self.timed("polish", st.polish_decoder, *args, *common), True)
            self.rewrite_decoders()

        if "pix2pix" in stages and not self.done("pix2pix"):
            gen = self.timed("pix2pix", st.train_pix2pix, data, *common)
            cfg = self.base_config("pix2pix")
            cfg.update(
                architecture={"generator": st.pix2pix_arch(p)},
                multiple=gen.multiple,
                receptive_field=64,
                parameters={"generator": count_parameters(gen)},
            )
            cfg["provenance"]["stage_seconds"] = self.timings
            self.save("pix2pix", {"generator": gen}, cfg)

        if package and self.is_main:
            package_weights(out)
        return {name: out / f"{name}.safetensors" for name in ("teacher", "lcm", "pix2pix")}


__all__ = ["run_recipe", "Recipe", "git_commit", "TrainPreset"]
