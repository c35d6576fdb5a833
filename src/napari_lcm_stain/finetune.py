"""Fine-tuning the packaged 1-step model on a lab's own paired qOBM/DAPI images.

Method: supervised consistency fine-tuning of the 1-step student on the user's pairs, no teacher.
The user's DAPI is encoded by the (frozen) VAE encoder to a target latent z0; for a noise level t
from the LCM inference grid the student's consistency output f(z_t, t) is pulled to z0 (latent
L1), and its decoded image to the DAPI (pixel L1, which also adapts the thin decoder). This keeps
the 1-step sampling path identical to inference and costs one student pass per step. Validation
predicts through `sampling.LatentPredictor`, the same forward pass the engine runs.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoints as ckpt
from ._drain import drain
from .device import mixed_precision, resolve_device
from .models import build
from .sampling import LatentPredictor, lcm_scheduler, train_scheduler
from .training.data import PairedData
from .training.diffusion import consistency


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


def _predict_planes(predictor: LatentPredictor, q: np.ndarray, seed: int = 0) -> np.ndarray:
    """1-step prediction of whole (small, normalised) planes through the engine's forward pass,
    for validation during fine-tuning; one seeded noise draw per plane."""
    out = []
    for plane in q:
        x, h, w = _pad_to(torch.from_numpy(plane)[None, None], predictor.multiple)
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(predictor.noise_shape(*x.shape[-2:]), generator=g)
        out.append(predictor(x, noise[None])[0, 0, :h, :w].numpy())
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
    dev = resolve_device(device)  # a device that is not there fails here, before any work
    base = _load_finetune_base(model)
    cfg = copy.deepcopy(base.config)
    unet = build_from(cfg["architecture"]["unet"], base.sub("unet"), "latent U-Net")
    vae_arch = cfg["architecture"]["vae"]
    vae = build_from(vae_arch, None, "VAE")
    ckpt.load_into(vae.decoder, base.sub("decoder"), "VAE decoder")
    ckpt.load_into(vae.encoder, base.sub("encoder"), "VAE encoder")
    unet.to(dev)
    vae.to(dev)
    latent_scale = float(cfg["latent_scale"])
    # validation runs the engine's forward pass on the very modules being trained (fp32)
    predictor = LatentPredictor(unet, vae.decoder, cfg, dev, "lcm", 1, dtype=torch.float32)
    px = predictor.pixel_size
    qn = predictor.normalize(q)
    dn, dapi_norm = dapi_to_model_units(d)
    m, fac = unet.multiple, unet.factor
    if val is not None:
        vq = _as_planes(val[0], "validation qOBM")
        vd = _as_planes(val[1], "validation DAPI")
        if vq.shape != vd.shape:
            raise ValueError("validation qOBM and DAPI must have the same shape")
        vq = predictor.normalize(vq)
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
            vae.encode(_pad_to(torch.from_numpy(p)[None, None], fac)[0].to(dev))[0][0].cpu().numpy()
            * latent_scale
            for p in td
        ]
    data = PairedData(
        qobm=tq,
        dapi=td,
        pixel_size=px,
        normalization=predictor.normalization,
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
    before = _val_metrics(_predict_planes(predictor, vq), vd, px)

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
        qb, db, zb = (a.to(dev) for a in data.batch(rng, batch, patch, fac))
        t = torch.from_numpy(np.where(rng.random(batch) < 0.5, 999, rng.choice(grid, batch))).long()
        t = t.to(dev)
        z_t = sched.add_noise(zb, torch.randn_like(zb), t)
        with mixed_precision(dev):
            f = consistency(lcm, sched, unet, z_t, t, qb)
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
            pred = _predict_planes(predictor, vq)
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
    after = _val_metrics(_predict_planes(predictor, vq), vd, px)
    tensors = {
        **{f"unet.{k}": v.detach().cpu().clone() for k, v in unet.state_dict().items()},
        **{f"decoder.{k}": v.detach().cpu().clone() for k, v in vae.decoder.state_dict().items()},
        **{f"encoder.{k}": v.detach().cpu().clone() for k, v in vae.encoder.state_dict().items()},
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
