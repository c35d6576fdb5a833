"""Paired training data: whole fields in memory and the random aligned crops every stage draws."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..normalization import fixed_config, normalize, robust_config
from .augment import augment_qobm
from .presets import TrainPreset


@dataclass
class PairedData:
    """Full training fields in memory: normalised qOBM, DAPI (0-1), and optional latents.

    Simulated fields are stacked arrays; a folder of the lab's pairs gives lists of 2-D planes
    that may differ in size (then `latents` is a list too). Indexing is the same for both."""

    qobm: np.ndarray | list[np.ndarray]  # (N, H, W) float32, normalised
    dapi: np.ndarray | list[np.ndarray]  # (N, H, W) float32
    pixel_size: float
    normalization: dict  # the `normalization` config the checkpoints record
    latents: np.ndarray | list[np.ndarray] | None = None  # (N, C, H/f, W/f), scaled
    augment: bool = False  # instrument augmentation of the qOBM crops (training/augment.py)

    def batch(
        self,
        rng: np.random.Generator,
        n: int,
        crop: int,
        factor: int = 4,
        latents: bool = True,
        device: torch.device | None = None,
    ):
        """Random aligned crops (+ flips / 90° rotations) of qOBM, DAPI and (if `latents` and
        present) latents; crops start on multiples of `factor`, the latent downsampling (the crop
        shrinks to the smallest plane if needed); the tensors go to `device` (default: stay on
        the CPU)."""
        N = len(self.qobm)
        H, W = (min(s) for s in zip(*(a.shape[-2:] for a in self.qobm)))
        crop = min(crop, H - H % factor, W - W % factor)
        q, d, z = [], [], []
        for _ in range(n):
            i = rng.integers(N)
            H, W = self.qobm[i].shape[-2:]
            y = rng.integers(0, (H - crop) // factor + 1) * factor
            x = rng.integers(0, (W - crop) // factor + 1) * factor
            k, flip = int(rng.integers(4)), bool(rng.integers(2))

            def aug(a, k=k, flip=flip):
                a = np.rot90(a, k, axes=(-2, -1))
                return np.ascontiguousarray(a[..., ::-1] if flip else a)

            q.append(aug(self.qobm[i][y : y + crop, x : x + crop]))
            d.append(aug(self.dapi[i][y : y + crop, x : x + crop]))
            if latents and self.latents is not None:
                f = factor
                z.append(
                    aug(self.latents[i][:, y // f : (y + crop) // f, x // f : (x + crop) // f])
                )
        q = np.stack(q)
        if self.augment:
            q = augment_qobm(q, rng)
        qt = torch.from_numpy(q)[:, None]
        dt = torch.from_numpy(np.stack(d))[:, None]
        zt = torch.from_numpy(np.stack(z)) if z else None
        if device is not None and device.type != "cpu":
            qt, dt = qt.to(device, non_blocking=True), dt.to(device, non_blocking=True)
            zt = None if zt is None else zt.to(device, non_blocking=True)
        return qt, dt, zt


def make_training_data(
    preset: TrainPreset, seed: int, normalization: dict | None = None
) -> PairedData:
    """Simulate the training fields (seeded; disjoint from the evaluation benchmark's seeds).
    `normalization`: the input normalisation to use (transfer: the init checkpoint's), instead
    of the one the preset's `input_norm` gives."""
    from ..simulate import simulate_pair

    qs, ds, px = [], [], []
    for i in range(preset.n_fields):
        name = preset.data_presets[i % len(preset.data_presets)]
        s = simulate_pair(name, size=preset.field_size, seed=seed * 100_000 + i)
        qs.append(s.qobm.astype(np.float32))
        ds.append(s.dapi.astype(np.float32))
        px.append(s.pixel_size)
    q = np.stack(qs)
    if normalization is not None:
        norm = dict(normalization)
    elif preset.input_norm == "fixed":  # the pre-robust recipe: one training-set mean and std
        norm = fixed_config(float(q.mean()), float(q.std() + 1e-6))
    else:
        norm = robust_config()
    return PairedData(
        qobm=normalize(norm, q),
        dapi=np.stack(ds),
        pixel_size=float(np.median(px)),
        normalization=norm,
        augment=preset.augment,
    )
