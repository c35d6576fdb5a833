"""The one training loop every stage runs, and what it needs: seeding, data-parallel helpers
(`torchrun`), the cosine schedule, EMA and the loss logger.

A stage supplies its networks, its optimiser and a `step_fn(step) -> loss`; `optimise` does the
rest in a fixed order (schedule, backward, clip, step, after-step hook such as EMA, log), so every
stage is reproducible from its seed in the same way.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..device import mixed_precision
from .presets import TrainPreset

#: Seed offsets per stage: stage S seeds torch with `seed + offset` and draws its batches from a
#: numpy generator seeded `seed + offset + 1` (rank-shifted under torchrun).
SEED_OFFSETS = {
    "vae": 0,
    "teacher": 2,
    "lcm": 4,
    "pix2pix": 6,
    "decoder": 8,
    "polish": 10,
    "guidance": 12,
}


class Logger:
    """Logs the mean loss over each logging window (single-batch losses are too noisy to read)."""

    def __init__(self, out: Path, stage: str, quiet: bool = False, every: int = 50):
        self.out, self.stage, self.quiet, self.every = out, stage, quiet, every
        self.active = dist_info()[0] == 0  # under torchrun only rank 0 logs
        self.csv = out / f"{stage}_loss.csv"
        if self.active:
            self.csv.write_text("step,loss,seconds\n")
        self.t0 = time.time()
        self.window: list[float] = []

    def step(self, step: int, total: int, loss: float) -> None:
        self.window.append(loss)
        if (step + 1) % self.every == 0 or step == total - 1:
            self.log(step, total, float(np.mean(self.window)))
            self.window = []

    def log(self, step: int, total: int, loss: float) -> None:
        if not self.active:
            return
        dt = time.time() - self.t0
        with open(self.csv, "a") as f:
            f.write(f"{step},{loss:.6g},{dt:.1f}\n")
        note(
            self.out,
            f"[{self.stage}] step {step + 1}/{total} loss {loss:.5f} ({dt:.0f}s)",
            self.quiet,
        )


def note(out: Path, msg: str, quiet: bool = False) -> None:
    """One line to `<out>/train.log` and (unless `quiet`) to the terminal."""
    with open(out / "train.log", "a") as f:
        f.write(msg + "\n")
    if not quiet:
        print(msg, flush=True)


# ------------------------------------------------------------------------ data-parallel (torchrun)


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) unless running under `torchrun` with an initialised group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def ddp(module: torch.nn.Module) -> torch.nn.Module:
    """Wrap for DistributedDataParallel (gradients averaged across ranks) when distributed."""
    if dist_info()[1] > 1:
        dev = next(module.parameters()).device
        ids = [dev.index] if dev.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
    return module


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)


def barrier() -> None:
    if dist_info()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def maybe_init_distributed(device: torch.device) -> bool:
    """Join the process group `torchrun` describes (NCCL on CUDA, one GPU per rank by LOCAL_RANK;
    gloo on the CPU); returns True if this call made it."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return True
    return False


def rank_rng(seed: int) -> np.random.Generator:
    """Each rank draws different batches; rank 0 draws exactly what a single process would."""
    return np.random.default_rng(seed + 1000 * dist_info()[0])


def seed_stage(stage: str, seed: int) -> np.random.Generator:
    """Seed torch for `stage` and return its batch generator (see SEED_OFFSETS)."""
    offset = SEED_OFFSETS[stage]
    torch.manual_seed(seed + offset)
    return rank_rng(seed + offset + 1)


# ------------------------------------------------------------------------------- the loop


def ema_update(target: torch.nn.Module, source: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pt, ps in zip(target.parameters(), source.parameters()):
            pt.mul_(decay).add_(ps.detach(), alpha=1 - decay)


def cosine_lr(opt: torch.optim.Optimizer, base: float, step: int, total: int, warmup: int = 50):
    f = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step / max(total, 1), 1)))
    for g in opt.param_groups:  # a group may run at a multiple of the base rate ("lr_mult")
        g["lr"] = base * g.get("lr_mult", 1.0) * max(f, 0.02)


def optimise(
    stage: str,
    steps: int,
    opt: torch.optim.Optimizer,
    step_fn: Callable[[int], torch.Tensor],
    p: TrainPreset,
    out: Path,
    quiet: bool = False,
    *,
    lr: float | None = None,
    warmup: int = 50,
    clip: torch.nn.Module | None = None,
    after_step: Callable[[int], None] | None = None,
    device: torch.device | None = None,
) -> None:
    """Run `steps` optimiser steps of `step_fn(step) -> loss`.

    `lr`: cosine schedule with `warmup` (None = leave the optimiser's rate alone); `clip`: clip this
    module's gradient norm to 1; `after_step(step)`: e.g. an EMA update; `device`: the forward
    pass runs under `device.mixed_precision` (bf16 autocast on CUDA). Losses are logged to
    `<out>/<stage>_loss.csv` and `<out>/train.log`.
    """
    log = Logger(out, stage, quiet, p.log_every)
    for step in range(steps):
        if lr is not None:
            cosine_lr(opt, lr, step, steps, warmup)
        with mixed_precision(device or torch.device("cpu")):
            loss = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        opt.step()
        if after_step is not None:
            after_step(step)
        log.step(step, steps, loss.item())
