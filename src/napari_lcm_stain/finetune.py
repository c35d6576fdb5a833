"""Fine-tuning the packaged 1-step model on a lab's own paired qOBM/DAPI images.

Method: supervised consistency fine-tuning of the 1-step student on the user's pairs, no teacher.
The user's DAPI is encoded by the (frozen) VAE encoder to a target latent z0; for a noise level t
from the LCM inference grid the student's consistency output f(z_t, t) is pulled to z0 (latent
L1), and its decoded image to the DAPI (pixel L1, which also adapts the thin decoder). This keeps
the 1-step sampling path identical to inference and costs one student pass per step. Validation
predicts through `sampling.LatentPredictor`, the same forward pass the engine runs.

Several pairs (lists of images, sizes may differ) are trained together; with two or more, whole
pairs are held out for validation (every fourth, at least one), otherwise the bottom strip of the
one pair. A saved checkpoint replaces its tensors and config as a pair (`FinetuneResult.save`).
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
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
from .training.diffusion import consistency


@dataclass
class FinetuneEvent:
    """One training step. On validation steps `val_loss` and `val_metrics` (Pearson, SSIM,
    nuclei recall / precision / F1 on the validation planes) are set; every event carries the
    step whose weights are kept so far (`best_step`, 0: the starting model), their metrics, and
    those of the starting model."""

    step: int
    total: int
    train_loss: float
    val_loss: float | None = None
    val_metrics: dict | None = None
    best_step: int = 0
    best_metrics: dict | None = None
    metrics_before: dict | None = None


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
        """Write safetensors + JSON as one pair; reload with `load_predictor(path)`.

        Both files are first written completely under temporary names beside `path`; then the
        tensors and then the config are renamed into place (the config's rename is the commit).
        An interruption between the two renames puts the previous tensors back, so the old pair
        stays whole; the config records the tensors' SHA-256 (`checkpoints.WEIGHTS_HASH_KEY`), so
        a pair torn by a hard kill is refused on load."""
        path = Path(path)
        whole = ckpt.Checkpoint(self.tensors)
        modules = {prefix: whole.sub(prefix) for prefix in ("unet", "decoder", "encoder")}
        cfg = {
            **self.config,
            "finetune": {
                **self.config.get("finetune", {}),
                "metrics_before": self.metrics_before,
                "metrics_after": self.metrics_after,
            },
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp_dir:
            _replace_pair(ckpt.save_checkpoint(Path(tmp_dir) / path.name, modules, cfg), path)
        return path

    def predictor(self, device="auto"):
        from .sampling import predictor_from_checkpoint

        return predictor_from_checkpoint(ckpt.Checkpoint(self.tensors, self.config), 1, device)


def _replace_pair(new: Path, path: Path) -> None:
    """Rename the complete pair `new` (+ its .json) onto `path` (+ .json): tensors first, then the
    config. If anything (Ctrl-C included) stops it before the config is in place, the previous
    tensors are put back (or the new ones removed when there were none), so `path` never holds new
    tensors beside an old config."""
    new_cfg, cfg = ckpt.config_path(new), ckpt.config_path(path)
    backup = new.with_name(f"{new.name}.previous")
    had_old = path.is_file()
    if had_old:
        try:
            os.link(path, backup)  # a second name for the old bytes: no copy
        except OSError:  # file systems without hard links
            backup.write_bytes(path.read_bytes())
    try:
        os.replace(new, path)
        os.replace(new_cfg, cfg)  # the commit point
    except BaseException:
        if new_cfg.exists():  # the config never moved: undo the tensors
            if had_old:
                os.replace(backup, path)
            elif not new.exists():
                path.unlink(missing_ok=True)
        raise


def dapi_to_model_units(dapi: np.ndarray, name: str = "DAPI image") -> tuple[np.ndarray, dict]:
    """Map a user's DAPI (any units) to the model's 0-1 scale: percentiles 0.5 / 99.8 -> 0 / 0.9.

    An image without contrast (all zero, constant, or almost empty) is refused: it has no nuclei
    to learn from and would be scaled by ~1e6."""
    d = np.asarray(dapi, dtype=np.float32)
    lo, hi = np.percentile(d, [0.5, 99.8])
    if not hi - lo > 1e-6 * max(1.0, abs(float(hi))):
        raise ValueError(
            f"{name} has no contrast (its 0.5th and 99.8th percentiles are both {float(lo):g}): "
            "it is empty, constant or almost empty; give the DAPI channel of the same field"
        )
    scale = 0.9 / max(float(hi - lo), 1e-6)
    return np.clip((d - lo) * scale, 0, 1).astype(np.float32), {"lo": float(lo), "scale": scale}


def _as_planes(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a numeric image, got dtype {a.dtype}")
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        raise ValueError(
            f"{name} of shape {a.shape} looks like RGB/RGBA (last axis {a.shape[-1]}): fine-tuning "
            "needs one channel; save that channel alone (e.g. img[..., 2] for blue DAPI)"
        )
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


def _predict_planes(predictor: LatentPredictor, q, seed: int = 0) -> list[np.ndarray]:
    """1-step prediction of whole (small, normalised) planes through the engine's forward pass,
    for validation during fine-tuning; one seeded noise draw per plane. Planes may differ in size."""
    out = []
    for plane in q:
        x, h, w = _pad_to(torch.from_numpy(plane)[None, None], predictor.multiple)
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(predictor.noise_shape(*x.shape[-2:]), generator=g)
        out.append(predictor(x, noise[None])[0, 0, :h, :w].numpy())
    return out


def _l1(pred: list[np.ndarray], target: list[np.ndarray]) -> float:
    """Mean absolute error over every pixel of every plane (planes may differ in size)."""
    return float(np.mean(np.concatenate([np.abs(p - t).ravel() for p, t in zip(pred, target)])))


def _val_metrics(pred, target, pixel_size: float) -> dict:
    from . import metrics

    rows = []
    for p, t in zip(pred, target):
        labels = metrics.segment_nuclei(t, pixel_size)
        m = metrics.image_metrics(p, t, true_labels=labels, pixel_size=pixel_size)
        rows.append(
            {k: float(m[k]) for k in ("pearson", "ssim", "recall", "precision", "f1") if k in m}
        )
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


class _Planes:
    """Training planes of any sizes (normalised qOBM, DAPI 0-1, scaled latents) and the random
    aligned crops (+ flips / 90° rotations) each step draws. With planes of one size it draws the
    same random stream and crops as `training.data.PairedData.batch`."""

    def __init__(self, qobm: list, dapi: list, latents: list):
        self.qobm, self.dapi, self.latents = qobm, dapi, latents
        self.shapes = [p.shape for p in qobm]

    def batch(self, rng: np.random.Generator, n: int, crop: int, factor: int):
        crop = min([crop] + [min(h - h % factor, w - w % factor) for h, w in self.shapes])
        f, q, d, z = factor, [], [], []
        for _ in range(n):
            i = rng.integers(len(self.qobm))
            H, W = self.qobm[i].shape
            y = rng.integers(0, (H - crop) // f + 1) * f
            x = rng.integers(0, (W - crop) // f + 1) * f
            k, flip = int(rng.integers(4)), bool(rng.integers(2))
            for out, a, s in ((q, self.qobm[i], 1), (d, self.dapi[i], 1), (z, self.latents[i], f)):
                a = np.rot90(
                    a[..., y // s : (y + crop) // s, x // s : (x + crop) // s], k, (-2, -1)
                )
                out.append(np.ascontiguousarray(a[..., ::-1] if flip else a))
        return (
            torch.from_numpy(np.stack(q))[:, None],
            torch.from_numpy(np.stack(d))[:, None],
            torch.from_numpy(np.stack(z)),
        )


def held_out_pairs(n: int) -> list[int]:
    """Which of `n` pairs validate: every fourth counted from the last, at least one (none if
    n < 2: then the bottom strip of the one pair validates)."""
    return sorted(range(n - 1, -1, -4))[-max(1, n // 4) :] if n >= 2 else []


def check_distinct_pairs(pairs, *, kind: str, key=None, name=str, label=None) -> None:
    """Refuse an item (a file, a layer) used as both qOBM and DAPI of one pair, or in two pairs:
    such a pair would be trained on and held out at once, inflating the scores. `key(item)`: its
    identity (default: the item itself); `name(item)`: how messages name it; `label(i)`: how
    they name pair i, counted from 0 (default: 'pair i+1'). `lcm-stain train --data`, `finetune`
    and the Fine-tune dock all use this one check."""
    key = key or (lambda x: x)
    label = label or (lambda i: f"pair {i + 1}")
    seen: dict = {}
    for i, (q, d) in enumerate(pairs):
        if key(q) == key(d):
            where = label(i)
            raise ValueError(
                f"{where[:1].upper()}{where[1:]} uses {kind} '{name(q)}' as both qOBM and DAPI; "
                "pick the measured DAPI."
            )
        for item in (q, d):
            k = key(item)
            if k in seen:
                raise ValueError(
                    f"{kind.capitalize()} '{name(item)}' is in {label(seen[k])} and {label(i)}: "
                    f"each {kind} may be in one pair only."
                )
            seen[k] = i


def _check_settings(steps, lr, patch, val_fraction, max_minutes=None) -> None:
    """The fine-tuning settings (named by their `lcm-stain finetune` flags), checked before any
    image is read: NaN, infinity and out-of-range values are refused."""

    def number(v) -> float:
        try:
            return float(v)
        except (TypeError, ValueError):
            return math.nan

    def whole(v) -> bool:
        return not isinstance(v, bool) and math.isfinite(number(v)) and number(v).is_integer()

    if not (whole(steps) and 1 <= number(steps) <= 100_000):
        raise ValueError(f"--steps must be between 1 and 100000, got {steps}")
    if not 0 < number(lr) < 1:
        raise ValueError(f"--lr (learning rate) must be in (0, 1), got {lr}")
    if not (whole(patch) and number(patch) >= 1):
        raise ValueError(f"--patch must be a positive number of px, got {patch}")
    if not 0 < number(val_fraction) < 1:
        raise ValueError(f"--val-fraction must be a number between 0 and 1, got {val_fraction}")
    if max_minutes is not None and not 0 < number(max_minutes) < math.inf:
        raise ValueError(
            f"--max-minutes must be a positive number of minutes, got {max_minutes} "
            "(leave it out for no limit)"
        )


def _pairs(qobm, dapi, names) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[str]]:
    """One pair (two arrays) or several (two lists paired in order) as checked (N, Y, X) stacks,
    with a label per pair for messages ('' for a single pair)."""
    several = isinstance(qobm, (list, tuple))
    if several != isinstance(dapi, (list, tuple)):
        raise TypeError("give one qOBM and one DAPI image, or two lists of images paired in order")
    qs, ds = (list(qobm), list(dapi)) if several else ([qobm], [dapi])
    if len(qs) != len(ds):
        raise ValueError(
            f"{len(qs)} qOBM images but {len(ds)} DAPI images: give one DAPI image per qOBM image"
        )
    if not qs:
        raise ValueError("no training pairs: give at least one qOBM/DAPI pair")
    if names is None:
        names = [f"pair {i + 1}" for i in range(len(qs))] if several else [""]
    if len(names) != len(qs):
        raise ValueError(f"{len(names)} names for {len(qs)} pairs")
    pairs = []
    for qi, di, label in zip(qs, ds, names):
        of = f" of {label}" if label else ""
        q, d = _as_planes(qi, "qOBM image" + of), _as_planes(di, "DAPI image" + of)
        if q.shape != d.shape:
            raise ValueError(
                f"qOBM {q.shape[1:] if q.shape[0] == 1 else q.shape} and DAPI "
                f"{d.shape[1:] if d.shape[0] == 1 else d.shape}{of} must have the same shape "
                "(paired images)"
            )
        pairs.append((q, d))
    return pairs, list(names)


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
    names: list[str] | None = None,
) -> Iterator[FinetuneEvent]:
    """Fine-tune the 1-step model on paired images; yields events, returns a `FinetuneResult`.

    `qobm`/`dapi`: one pair (2-D images or (N, Y, X) stacks of the same shape) or two lists of
    them paired in order; pairs may differ in size, and `names` labels them in messages.
    Validation: `val`, an optional (qobm, dapi) pair; else with two or more pairs the pairs of
    `held_out_pairs` (every fourth, at least one) are kept out of training; else the bottom
    `val_fraction` of each plane. Setting `stop` ends training early and keeps the best weights
    so far. `device` 'auto' | 'cpu' | 'cuda' | 'mps'; CUDA trains in bfloat16 autocast.
    """
    _check_settings(steps, lr, patch, val_fraction)
    pairs, names = _pairs(qobm, dapi, names)
    dapis = [
        dapi_to_model_units(d, "DAPI image" + (f" of {n}" if n else ""))
        for (_, d), n in zip(pairs, names)
    ]
    if val is not None:
        vq = _as_planes(val[0], "validation qOBM")
        vd = _as_planes(val[1], "validation DAPI")
        if vq.shape != vd.shape:
            raise ValueError("validation qOBM and DAPI must have the same shape")
        vd = dapi_to_model_units(vd, "validation DAPI")[0]
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
    if cfg.get("guidance") and unet.guidance_embed:
        # a guided LCM is fine-tuned, validated and shipped at one operating point: its
        # guidance input at the default w (classifier-free guidance would extrapolate from an
        # unconditional branch that fine-tuning does not train)
        cfg["guidance"] = {**cfg["guidance"], "method": "embedding"}
    # validation runs the engine's forward pass on the very modules being trained (fp32)
    predictor = LatentPredictor(unet, vae.decoder, cfg, dev, "lcm", 1, dtype=torch.float32)
    w = predictor.guidance if unet.guidance_embed else None  # the w trained at
    px = predictor.pixel_size
    qn = [predictor.normalize(q) for q, _ in pairs]
    dn = [d for d, _ in dapis]
    m, fac = unet.multiple, unet.factor
    held = [] if val is not None else held_out_pairs(len(pairs))
    if val is not None:
        vq, vd = list(predictor.normalize(vq)), list(vd)
        tq, td = [p for s in qn for p in s], [p for s in dn for p in s]
        validation = "separate validation pair"
    elif held:
        train = [i for i in range(len(pairs)) if i not in held]
        tq, td = [p for i in train for p in qn[i]], [p for i in train for p in dn[i]]
        vq, vd = [p for i in held for p in qn[i]], [p for i in held for p in dn[i]]
        validation = "held-out pairs: " + ", ".join(names[i] for i in held)
    else:
        q1 = qn[0]
        H = q1.shape[1]
        cut = int(round(H * (1 - val_fraction) / fac)) * fac
        if cut < m or H - cut < 16:
            raise ValueError(
                f"image too small ({q1.shape[1]}x{q1.shape[2]}) to hold out {val_fraction:.0%} for "
                "validation; give a larger image, more pairs or a separate validation pair"
            )
        tq, td, vq, vd = (
            list(q1[:, :cut]),
            list(dn[0][:, :cut]),
            list(q1[:, cut:]),
            list(dn[0][:, cut:]),
        )
        validation = f"bottom {val_fraction:.0%} of each plane"
    if patch < m:
        raise ValueError(
            f"--patch {patch} is smaller than the model's tile multiple ({m} px): use --patch {m} "
            "or more"
        )
    patch = int(min([patch] + [min(h - h % m, w - w % m) for h, w in (p.shape for p in tq)]))
    if patch < m:
        raise ValueError(
            f"training region is smaller than the model's tile multiple ({m} px); "
            "drop the smallest pair or use larger fields"
        )
    with torch.no_grad():
        latents = [
            vae.encode(_pad_to(torch.from_numpy(p)[None, None], fac)[0].to(dev))[0][0].cpu().numpy()
            * latent_scale
            for p in td
        ]
    data = _Planes(
        tq, td, [z[:, : p.shape[0] // fac, : p.shape[1] // fac] for z, p in zip(latents, td)]
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
    best_metrics = before
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
            f = consistency(lcm, sched, unet, z_t, t, qb, w)
            loss = F.l1_loss(f, zb) + F.l1_loss(vae.decoder(f / latent_scale), db)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(
            list(unet.parameters()) + list(vae.decoder.parameters()), 1.0
        )
        opt.step()
        val_loss = val_metrics = None
        if step % val_every == 0 or step == steps:
            unet.eval()
            vae.decoder.eval()
            pred = _predict_planes(predictor, vq)
            val_loss = _l1(pred, vd)
            val_metrics = _val_metrics(pred, vd, px)
            score = selection_score(val_metrics)
            if score < best[0]:
                best, best_metrics = (score, step, snapshot()), val_metrics
        history.append((step, float(loss.item()), val_loss))
        yield FinetuneEvent(
            step, steps, float(loss.item()), val_loss, val_metrics, best[1], best_metrics, before
        )
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
        "dapi_normalization": dapis[0][1] if len(dapis) == 1 else [n for _, n in dapis],
        "stopped": stopped,
        "pairs": len(pairs),
        "validation": validation,
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


#: Image files `find_pairs` pairs by name (OME-TIFF, TIFF, zarr / OME-Zarr).
PAIR_SUFFIXES = (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".ome.zarr", ".zarr")


def find_pairs(folder) -> list[tuple[str, Path, Path]]:
    """`(NAME, NAME_qobm.ext, NAME_dapi.ext)` for every pair in `folder`, sorted by NAME; ext is
    one of `PAIR_SUFFIXES` (the two may differ). Other files (e.g. `NAME_nuclei.ome.tif`,
    `NAME_meta.json` from `lcm-stain simulate`) are ignored. A file without its partner, two files
    for one role, or no pair at all is an error naming the file or folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--data {folder} is not a folder: give the folder of image pairs")
    found: dict[str, dict[str, Path]] = {"qobm": {}, "dapi": {}}
    for f in sorted(folder.iterdir()):
        suffix = next((x for x in PAIR_SUFFIXES if f.name.lower().endswith(x)), None)
        stem = f.name[: -len(suffix)] if suffix else ""
        role = stem.rsplit("_", 1)[-1].lower() if "_" in stem else ""
        if role not in found:
            continue
        name = stem.rsplit("_", 1)[0]
        if name in found[role]:
            raise ValueError(
                f"two {role} images for pair {name!r} in {folder}: {found[role][name].name} and "
                f"{f.name}; keep one"
            )
        found[role][name] = f
    for role, other in (("qobm", "dapi"), ("dapi", "qobm")):
        alone = sorted(set(found[role]) - set(found[other]))
        if alone:
            raise ValueError(
                f"{found[role][alone[0]]} has no {other} partner: expected "
                f"{alone[0]}_{other}.ome.tif (or .tif, .tiff, .zarr) beside it"
            )
    if not found["qobm"]:
        raise ValueError(
            f"no qOBM/DAPI pairs in {folder}: name each pair NAME_qobm.tif and NAME_dapi.tif "
            "(.tif, .tiff, .ome.tif or .zarr)"
        )
    return [(n, found["qobm"][n], found["dapi"][n]) for n in sorted(found["qobm"])]


def _check_output(out: Path, overwrite: bool) -> None:
    """Everything that would stop the checkpoint from being saved, checked before training: the
    name, existing files (the tensors or a JSON of that name), a missing or unwritable folder."""
    if out.suffix != ".safetensors":
        raise ValueError(f"output must end in .safetensors, got {out.name!r}")
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder: give a file name, NAME.safetensors")
    for f in (out, ckpt.config_path(out)):
        if f.exists() and not overwrite:
            raise FileExistsError(f"{f} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise FileNotFoundError(
            f"output folder {out.parent} does not exist: create it or choose another --out"
        )
    try:  # the one sure test of writability (permissions, read-only mounts, ACLs)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as e:
        raise PermissionError(
            f"cannot write to the output folder {out.parent} ({e.strerror or e}): "
            "choose a writable --out"
        ) from None


def _read_plane_stack(path: Path) -> np.ndarray:
    from .io import read_image

    arr, meta = read_image(path)
    handle = meta.pop("_handle", None)
    try:
        return np.asarray(arr)
    finally:
        if handle is not None:
            handle.close()


def read_folder(folder) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """The pairs `find_pairs` finds in `folder`, read: (names, qOBM images, DAPI images), paired
    in order, as `iter_finetune(qobm, dapi, names=names)` takes them (`lcm-stain finetune --data`
    and the Fine-tune dock's *Folder…*)."""
    found = find_pairs(folder)
    names = [n for n, _, _ in found]
    return (
        names,
        [_read_plane_stack(q) for _, q, _ in found],
        [_read_plane_stack(d) for _, _, d in found],
    )


def finetune_files(
    qobm=None,
    dapi=None,
    out: Path | None = None,
    model="lcm",
    steps=300,
    lr=2e-4,
    patch=128,
    val_fraction=0.2,
    seed=0,
    device="auto",
    overwrite=False,
    data=None,
    max_minutes: float | None = None,
) -> Path:
    """`lcm-stain finetune`: read the pairs, fine-tune, save the checkpoint pair.

    Pairs: `data`, a folder (`find_pairs`, as the Fine-tune dock finds them), or `qobm`/`dapi`,
    one path each or two lists paired in order; a file in two pairs or used as both qOBM and DAPI
    is refused (`training.folder.check_distinct`). The settings, the device, the output (name, existing files, folder)
    and the inputs are all checked before any image is read or any training starts. Every pair
    is read and resampled to the model's pixel size exactly as `train --data` does
    (`training.folder.read_pair`: the files' metadata, else assumed, with a note; an implausible
    pixel size is refused as `stain` refuses it); the pairs' own pixel sizes are
    recorded in the checkpoint's ``finetune.pair_pixel_sizes``. `max_minutes` stops training
    after that much wall time (counted from the start of training) and keeps the best weights so
    far.
    """
    from .training import folder as fo

    if out is None:
        raise ValueError("give the output checkpoint (--out NAME.safetensors)")
    _check_settings(steps, lr, patch, val_fraction, max_minutes)
    out = Path(out)
    resolve_device(device)  # a missing GPU fails now, not after reading the images
    _check_output(out, overwrite)
    if data is not None:
        if qobm or dapi:
            raise ValueError("give either --data or --qobm/--dapi, not both")
        rows = [fo.PairRow(n, q, d, None, f"pair {n!r}") for n, q, d in find_pairs(data)]
    else:
        qs = [qobm] if isinstance(qobm, (str, Path)) else list(qobm or [])
        ds = [dapi] if isinstance(dapi, (str, Path)) else list(dapi or [])
        if not qs or len(qs) != len(ds):
            raise ValueError(
                f"{len(qs)} --qobm but {len(ds)} --dapi images: give one --dapi per --qobm "
                "(paired in order), or a folder with --data"
            )
        for p in (*qs, *ds):
            if not Path(p).exists():
                raise FileNotFoundError(f"input not found: {p}")
        rows = [
            fo.PairRow(
                f"{Path(q).name} + {Path(d).name}",
                Path(q),
                Path(d),
                None,
                f"pair {i} (--qobm/--dapi)",
            )
            for i, (q, d) in enumerate(zip(qs, ds), start=1)
        ]
    fo.check_distinct(rows)
    base = _load_finetune_base(model)
    notes: list[str] = []  # pixel sizes: resampled to the model's exactly as `train --data` does
    pairs = [fo.read_pair(r, float(base.config.get("pixel_size", 0.414)), notes) for r in rows]
    for n in notes:
        print(f"[data] {n}")
    names = [p.name for p in pairs]
    q_imgs, d_imgs = [p.qobm for p in pairs], [p.dapi for p in pairs]
    single = len(q_imgs) == 1 and data is None
    stop = threading.Event()
    timer = None
    if max_minutes is not None:
        timer = threading.Timer(float(max_minutes) * 60.0, stop.set)
        timer.daemon = True
        timer.start()
    try:
        res = run_finetune(
            q_imgs[0] if single else q_imgs,
            d_imgs[0] if single else d_imgs,
            model=base,
            steps=steps,
            lr=lr,
            patch=patch,
            val_fraction=val_fraction,
            seed=seed,
            device=device,
            names=None if single else names,
            stop=stop,
        )
    finally:
        if timer is not None:
            timer.cancel()
    res.config["finetune"].update(
        base=str(model),
        pair_pixel_sizes=[
            {"name": p.name, "pixel_size": p.pixel_size, "pixel_size_source": p.pixel_size_source}
            for p in pairs
        ],
    )
    res.save(out)
    print(f"fine-tuned checkpoint: {out} (best step {res.best_step})")
    print(f"  {len(q_imgs)} pair(s); validation: {res.config['finetune']['validation']}")
    if res.stopped:
        print(f"  stopped by --max-minutes after {len(res.history)} of {steps} steps")
    for k in res.metrics_before:
        print(
            f"  {k:10s} before {res.metrics_before[k]:.3f}  after {res.metrics_after.get(k, float('nan')):.3f}"
        )
    return out
