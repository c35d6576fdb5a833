"""Training the packaged models: presets -> paired data -> one loop -> stages -> recipe -> packaging.

`run_recipe` is the entry point (`lcm-stain train`); fine-tuning lives in `napari_lcm_stain.finetune`.
"""

from .data import PairedData, make_training_data
from .diffusion import consistency, eps_from_v, lcm_solver_grid, sample_timesteps, x0_from_v
from .packaging import calibrate_receptive_field, package_weights
from .presets import PRESETS, STAGES, TrainPreset, get_train_preset
from .recipe import run_recipe
from .stages import encode_latents

__all__ = [
    "PRESETS",
    "STAGES",
    "PairedData",
    "TrainPreset",
    "calibrate_receptive_field",
    "consistency",
    "encode_latents",
    "eps_from_v",
    "get_train_preset",
    "lcm_solver_grid",
    "make_training_data",
    "package_weights",
    "run_recipe",
    "sample_timesteps",
    "x0_from_v",
]
