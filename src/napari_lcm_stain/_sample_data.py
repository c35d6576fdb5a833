"""napari sample data: a simulated qOBM field and Z stack with their DAPI and nucleus ground truth.

Returns plain LayerData tuples ``(data, kwargs, layer_type)`` (no napari import). Everything is
generated on demand from a fixed seed (``brain-20x``, the packaged model's training preset); nothing
is cached on disk.
"""

from __future__ import annotations

import numpy as np

from .simulate import SimSample, simulate_pair

#: qOBM phase display range is clamped to this (rad); the brain display range of Casteleiro Costa
#: et al. (2021) at 60x. 20x fields use the central part of it.
PHASE_DISPLAY_RANGE = (-0.4, 1.0)
FIELD_SEED = 2024
STACK_SEED = 2025


def _phase_limits(phase: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(phase, [0.5, 99.5])
    lo = float(max(PHASE_DISPLAY_RANGE[0], min(lo, -0.05)))
    hi = float(min(PHASE_DISPLAY_RANGE[1], max(hi, 0.05)))
    return lo, hi


def _layers(s: SimSample, scale: tuple[float, ...], title: str) -> list[tuple]:
    units = ("µm",) * len(scale)
    meta = {"preset": s.preset, "seed": s.seed, "pixel_size_um": s.pixel_size, "simulated": True}
    return [
        (
            s.qobm,
            {
                "name": "qOBM phase",
                "colormap": "gray",
                "contrast_limits": _phase_limits(s.qobm),
                "scale": scale,
                "units": units,
                "metadata": {**meta, "units": "rad", "title": title},
            },
            "image",
        ),
        (
            s.dapi,
            {
                "name": "DAPI (ground truth)",
                "colormap": "cyan",
                "blending": "additive",
                "contrast_limits": (0.0, 1.0),  # the simulator's fixed DAPI scale
                "scale": scale,
                "units": units,
                "metadata": meta,
            },
            "image",
        ),
        (
            s.nuclei,
            {
                "name": "nuclei (ground truth)",
                "opacity": 0.4,
                "scale": scale,
                "units": units,
                "metadata": {
                    **meta,
                    "nucleus_cnr": s.nucleus_cnr,
                    "nucleus_in_section": s.nucleus_in_section,
                },
            },
            "labels",
        ),
        (
            s.distractors,
            {
                "name": "distractors (ground truth)",
                "opacity": 0.5,
                "visible": False,
                "scale": scale,
                "units": units,
                "metadata": meta,
            },
            "labels",
        ),
    ]


def sample_field() -> list[tuple]:
    """A 512² brain-20x field (212 µm): qOBM phase, DAPI ground truth, nucleus labels."""
    s = simulate_pair("brain-20x", size=512, seed=FIELD_SEED)
    return _layers(s, (s.pixel_size, s.pixel_size), "simulated qOBM field, brain 20x")


def sample_stack(z_planes: int = 5, z_step_um: float = 1.0) -> list[tuple]:
    """A 5-plane, 256² brain-20x Z stack (1 µm steps through the focus)."""
    s = simulate_pair(
        "brain-20x", size=256, seed=STACK_SEED, z_planes=z_planes, z_step_um=z_step_um
    )
    return _layers(s, (float(z_step_um), s.pixel_size, s.pixel_size), "simulated qOBM Z stack")
