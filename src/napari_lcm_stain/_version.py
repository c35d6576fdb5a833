"""Single source of truth for the package version (read by setuptools and the checkpoints)."""

__version__ = "0.3.0"
