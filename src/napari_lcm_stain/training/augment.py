"""Input augmentation where physics is not needed: what an instrument does to a phase image after
the simulator's forward model (extra blur from defocus or a softer reconstruction, noise, a mild
non-linear response). Flips and 90° rotations are in `PairedData.batch`; the DAPI target is never
augmented. Each transform is applied to half the crops, independently, with its strength drawn
from the range below (in the units of the normalised input, whose spread is ~1).
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

#: Gaussian blur sigma (px at the model's pixel size): up to a ~1 µm softer PSF at 0.414 µm/px.
BLUR_SIGMA = (0.3, 1.2)
#: Additive white noise, std in normalised units (the robust spread of a field is 1).
NOISE_STD = (0.02, 0.3)
#: Signed power sign(x)|x|^g: a mildly non-linear phase response.
GAMMA = (0.8, 1.25)
#: Probability of each transform.
P = 0.5


def augment_qobm(q: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Augment a stack of normalised qOBM crops (N, H, W) float32; returns a new array."""
    out = np.array(q, dtype=np.float32, copy=True)
    for i in range(len(out)):
        if rng.random() < P:
            out[i] = gaussian_filter(out[i], float(rng.uniform(*BLUR_SIGMA)), mode="reflect")
        if rng.random() < P:
            g = float(rng.uniform(*GAMMA))
            out[i] = np.sign(out[i]) * np.abs(out[i]) ** g
        if rng.random() < P:
            noise = rng.standard_normal(out[i].shape).astype(np.float32)
            out[i] += float(rng.uniform(*NOISE_STD)) * noise
    return out
