"""The recipe: which stages run, in what order, what each one loads and saves, and resuming.

VAE -> decoder -> teacher -> LCM -> polish -> Pix2Pix into one run folder. A stage whose
checkpoint exists is skipped (resume); the timings go to `timings.json`.

Data: simulated fields (the preset's), or a folder of the lab's pairs (`data_dir`, see
`folder.py`; validation split by pair, scores in `validation.json`). `init`: transfer, every
stage starts from trained weights (`packaging.load_init`) with the preset's `TRANSFER` steps.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from .. import checkpoints as ckpt
from .._version import __version__
from ..device import resolve_device
from ..models import VAE, LatentUNet, build, count_parameters
from ..normalization import robust_config
from ..sampling import SCHEDULER_CONFIG
from . import folder as fo
from . import stages as st
from .data import PairedData, make_training_data
from .loop import barrier, dist_info, maybe_init_distributed, note
from .packaging import calibrate_receptive_field, load_init, package_weights
from .presets import STAGES, TrainPreset, get_train_preset, transfer_preset
from .resume import check_run_folder, run_record


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
    data_dir=None,
    init=None,
    register: bool = False,
    max_shift: float = fo.MAX_SHIFT,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Run VAE -> decoder -> teacher -> LCM -> polish -> Pix2Pix into `out`, skipping finished
    stages.

    `data_dir`: train on a folder of qOBM/DAPI pairs (`training.folder`) instead of simulated
    fields; every pair's shift to the model's prediction is reported, and with `register`
    corrected up to `max_shift` px. `init`: "packaged", a run folder or an LCM checkpoint that
    every stage starts from (transfer; the VAE stage is skipped).

    Stages already in `out` are resumed only when they were trained with the same preset, data
    (paths and content hashes), seed and settings; otherwise the run is refused with the
    differences, unless `overwrite` deletes them and starts again (`training.resume`)."""
    p = get_train_preset(preset) if isinstance(preset, str) else preset
    if register and data_dir is None:
        raise ValueError("--register needs --data DIR (it registers the folder's pairs)")
    init_ckpts, check_model, init_notes = (None, "lcm", [])
    if init is not None:
        init_ckpts, check_model, init_notes = load_init(init)
        p2p = init_ckpts.get("pix2pix")
        p = transfer_preset(p, init_ckpts["lcm"].config, p2p.config if p2p else None)
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
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        lab = None
        for n in init_notes:
            note(out, n, quiet)
        data_files = None if data_dir is None else fo.data_files(data_dir, register, max_shift)
        check_run_folder(
            out,
            run_record(asdict(p), seed, init, data_files),
            resume=resume,
            overwrite=overwrite,
            log=lambda msg: note(out, msg, quiet) if dist_info()[0] == 0 else None,
        )
        if data_dir is None:  # transfer keeps the init's input normalisation
            norm = None if init_ckpts is None else init_ckpts["lcm"].config["normalization"]
            data = make_training_data(p, seed, norm)
        else:
            data, lab = fo.prepare(
                data_dir,
                **_model_data_config(p, init_ckpts),
                seed=seed,
                check_model=check_model,
                device=device,
                register=register,
                max_shift=max_shift,
                log=lambda msg: note(out, msg, quiet) if dist_info()[0] == 0 else None,
            )
        recipe = Recipe(
            p, out, seed, data, resume, quiet, t0, dev, init_ckpts, lab, init, data_files
        )
        paths = recipe.run(stages, package)
        if lab is not None and recipe.is_main:
            recipe.write_validation(check_model, device)
        return paths
    finally:
        if owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _model_data_config(p: TrainPreset, init_ckpts: dict | None) -> dict:
    """Pixel size, input normalisation and tile multiple that folder data are prepared for: the
    init checkpoint's, else the simulator's model grid (0.414 µm/px) and the robust
    normalisation; plus the preset's qOBM augmentation."""
    if init_ckpts is not None:
        cfg = init_ckpts["lcm"].config
        px, norm = float(cfg["pixel_size"]), dict(cfg["normalization"])
    else:  # the grid every simulated training field is made on
        from ..simulate import MODEL_PIXEL_SIZE

        px, norm = MODEL_PIXEL_SIZE, robust_config()
    multiple = math.lcm(st.make_unet(p).multiple, build(st.pix2pix_arch(p)).multiple)
    return {"pixel_size": px, "normalization": norm, "multiple": multiple, "augment": p.augment}


class Recipe:
    """One run folder: the stages' order, what each loads and saves, and resuming."""

    def __init__(
        self, p, out, seed, data: PairedData, resume, quiet, t_data: float, dev=None,
        init=None, lab: fo.LabData | None = None, init_spec=None, data_files: dict | None = None,
    ):  # fmt: skip
        self.p, self.out, self.seed, self.data = p, out, seed, data
        self.data_files = data_files  # recorded for resuming (`training.resume`)
        self.resume, self.quiet = resume, quiet
        self.dev = dev or torch.device("cpu")
        self.init, self.lab, self.init_spec = init, lab, init_spec
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
        self.latent_standardisation: dict | None = None  # p.unit_latents: folded into the encoder

    # -- bookkeeping

    def done(self, name: str) -> bool:
        return self.resume and (self.out / f"{name}.safetensors").exists()

    def save_timing(self, name: str, t0: float) -> None:
        self.timings[name] = round(time.time() - t0, 1)
        if self.is_main:
            ckpt.atomic_write_bytes(self.timings_file, json.dumps(self.timings, indent=2).encode())

    def base_config(self, kind: str) -> dict:
        p, data, seed = self.p, self.data, self.seed
        command = f"lcm-stain train --preset {p.name} --seed {seed}"
        prov = {
            "commit": git_commit(),
            "preset": asdict(p),
            "seed": seed,
            "data_presets": list(p.data_presets) if self.lab is None else [],
            "command": command,
        }
        if self.lab is not None:
            prov["data"] = self.lab.provenance()
            prov["data_files"] = self.data_files
            prov["command"] += f" --data {self.lab.folder}"
        if self.init is not None:
            prov["init"] = str(self.init_spec)
            prov["command"] += f" --init {self.init_spec}"
        return {
            "kind": kind,
            "normalization": dict(data.normalization),
            "pixel_size": data.pixel_size,
            "version": __version__,
            "provenance": prov,
        }

    def save(self, name: str, modules: dict, config: dict) -> None:
        """Under torchrun only rank 0 writes; every rank waits until the file is there.

        Stain models get their measured `receptive_field` right away, so a run's own checkpoints
        tile seam-free without waiting for `--package`; with `--init` they keep the init's."""
        path = self.out / f"{name}.safetensors"
        kind = config.get("kind")
        start = (self.init or {}).get(kind)
        if start is not None and "receptive_field" in start.config:
            # transfer: same networks, weights near the init's -> keep its measured context
            # (measuring the teacher's 50-step reach costs minutes on a CPU)
            config["receptive_field"] = start.config["receptive_field"]
            measured = dict(start.config.get("receptive_field_measured", {}))
            config["receptive_field_measured"] = {**measured, "inherited_from_init": True}
        if self.is_main:
            ckpt.save_checkpoint(path, modules, config)
            if kind in ("lcm", "teacher", "pix2pix") and "receptive_field_measured" not in config:
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
        if not path.exists() and self.init is not None:
            return self.vae  # transfer: until the decoder stage runs, the init's decoder serves
        if not path.exists():
            raise FileNotFoundError(
                f"{path} missing: run the decoder stage (it follows the VAE) before teacher/lcm"
            )
        thin = st.make_inference_vae(self.p)
        ckpt.load_into(thin, ckpt.load_checkpoint(path).sub("vae"), "inference VAE")
        return thin.eval()

    def load_unet(self, name: str) -> LatentUNet:
        unet = st.make_unet(self.p, name)
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
            architecture={"unet": st.unet_arch(self.p, name), "vae": st.vae_arch(self.p, True)},
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
        if self.latent_standardisation is not None:
            cfg["latent_standardisation"] = self.latent_standardisation
        guidance = st.guidance_config(self.p, name)
        if guidance is not None:
            cfg["guidance"] = guidance
        cfg["provenance"]["stage_seconds"] = self.timings
        self.save(name, {"unet": unet, "decoder": v.decoder, "encoder": v.encoder}, cfg)

    def rewrite_decoders(self) -> None:
        """Teacher and LCM never see the decoder (they live in latent space), so checkpoints saved
        before a decoder stage only need the new decoder written into them."""
        v = self.inference_vae()
        for name in ("teacher", "lcm"):
            if (self.out / f"{name}.safetensors").exists():
                unet = self.load_unet(name)
                barrier()  # under torchrun every rank has read it before rank 0 rewrites it
                self.save_latent_model(name, unet, v)

    # -- the stages in order

    def timed(self, name: str, fn, *args, **kwargs):
        t0 = time.time()
        result = fn(*args, **kwargs)
        self.save_timing(name, t0)
        return result

    def run(self, stages: list[str], package: bool) -> dict[str, Path]:
        p, data, seed, out, quiet = self.p, self.data, self.seed, self.out, self.quiet
        common = (p, seed, out, quiet, self.dev)

        init = self.init
        if init is not None:  # transfer: keep the init's encoder and latent scale, no VAE stage
            self.vae = st.make_inference_vae(p)
            ckpt.load_into(self.vae.encoder, init["lcm"].sub("encoder"), "init VAE encoder")
            dec = self.vae.decoder
            state = dec.with_texture_defaults(init["lcm"].sub("decoder"))
            ckpt.load_into(dec, state, "init VAE decoder")
            self.vae.eval()
            self.latent_scale = float(init["lcm"].config["latent_scale"])
            raw = st.encode_latents(self.vae, data.dapi)
        else:
            if "vae" in stages and not self.done("vae"):
                vae = self.timed("vae", st.train_vae, data, *common)
                self.save_vae("vae", vae, inference=False)
            self.vae = self.load_vae()
            raw = st.encode_latents(self.vae, data.dapi)
            if p.unit_latents:  # per-channel zero mean, unit variance, folded into the encoder
                if p.decoder_steps <= 0:
                    raise ValueError(
                        "unit_latents needs decoder_steps > 0 (the thin decoder is fitted on "
                        "the standardised latents; the training VAE's own decoder is not)"
                    )
                self.latent_standardisation = st.standardise_latents(self.vae, raw)
                raw = st.encode_latents(self.vae, data.dapi)
            self.latent_scale = float(1.0 / (_std(raw) + 1e-6))
        if isinstance(raw, list):
            data.latents = [(r * self.latent_scale).astype(np.float32) for r in raw]
        else:
            data.latents = (raw * self.latent_scale).astype(np.float32)

        def start(name: str, module: str):
            """The init weights of one stage (transfer), or None (from scratch)."""
            return None if init is None or name not in init else init[name].sub(module)

        if p.decoder_steps > 0 and "decoder" in stages and not self.done("decoder"):
            thin = self.timed(
                "decoder", st.train_decoder, data, self.vae, *common, init=start("lcm", "decoder")
            )
            self.save_vae("decoder", thin, inference=True)
            self.rewrite_decoders()

        if "teacher" in stages and not self.done("teacher"):
            t_init = (
                start("teacher", "unet") if init and "teacher" in init else start("lcm", "unet")
            )
            self.save_latent_model(
                "teacher", self.timed("teacher", st.train_teacher, data, *common, init=t_init)
            )

        if "lcm" in stages and not self.done("lcm"):
            teacher = self.load_unet("teacher")
            critic_needs = (
                dict(decoder=self.inference_vae().decoder, latent_scale=self.latent_scale)
                if p.lcm_adv_weight > 0 or p.lcm_pixel_weight > 0
                else {}
            )
            student = self.timed(
                "lcm", st.distill_lcm, data, teacher, *common, init=start("lcm", "unet"),
                **critic_needs,
            )  # fmt: skip
            self.save_latent_model("lcm", student)

        if p.polish_steps > 0 and "polish" in stages and not self.done("polish"):
            args = (data, self.inference_vae(), self.load_unet("lcm"), self.latent_scale)
            self.save_vae("polish", self.timed("polish", st.polish_decoder, *args, *common), True)
            self.rewrite_decoders()

        if "pix2pix" in stages and not self.done("pix2pix"):
            gen = self.timed(
                "pix2pix", st.train_pix2pix, data, *common, init=start("pix2pix", "generator")
            )
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

    def write_validation(self, baseline, device="auto") -> Path:
        """Score LCM-1 of this run, and `baseline` (the init or packaged LCM), on the held-out
        pairs; write them with every pair's registration report to `validation.json`."""
        lab, px = self.lab, self.data.pixel_size
        report = {
            "data": lab.provenance(),
            "pixel_size": px,
            "metrics": "LCM-1 on the held-out pairs (finetune's validation metrics)",
        }
        lcm = self.out / "lcm.safetensors"
        if lab.val and lcm.exists():
            report["lcm"] = fo.validate(lab.val, lcm, px, device)
            report["baseline_model"] = str(baseline)
            report["baseline"] = fo.validate(lab.val, baseline, px, device)
            for who in ("baseline", "lcm"):
                scores = ", ".join(f"{k} {v:.3f}" for k, v in report[who]["mean"].items())
                note(
                    self.out,
                    f"[validation] {who} on {len(lab.val)} held-out pair(s): {scores}",
                    self.quiet,
                )
        else:
            report["note"] = "no held-out pair (one pair only) or no lcm.safetensors: no scores"
        path = self.out / "validation.json"
        ckpt.atomic_write_bytes(path, json.dumps(report, indent=2).encode())
        return path


def _std(raw) -> float:
    """Standard deviation of all latents (one array, or a list of differently sized planes)."""
    if isinstance(raw, list):
        return float(np.concatenate([r.ravel() for r in raw]).std())
    return raw.std()


__all__ = ["run_recipe", "Recipe", "git_commit", "TrainPreset"]
