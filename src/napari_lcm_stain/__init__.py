"""napari-lcm-stain: virtual DAPI from qOBM phase with a 1-step latent consistency model.

The public API is `stain()`; it is imported lazily so that napari can read the manifest
without importing torch.
"""

from ._version import __version__

__all__ = ["__version__", "stain"]


def __getattr__(name: str):
    if name == "stain":
        from .engine import stain

        return stain
    raise AttributeError(name)
