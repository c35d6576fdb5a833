"""Run a progress-yielding generator to its end and hand back its return value.

The core reports long work as generators (`iter_stain`, `iter_finetune`, ...) that yield progress
and *return* their result, so the napari worker can forward each yield. Scripts, the CLI and the
blocking APIs use this one helper to drain them instead of repeating the StopIteration dance.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, TypeVar

R = TypeVar("R")


def drain(gen: Generator[Any, Any, R], each: Callable[[Any], object] | None = None) -> R:
    """Exhaust `gen`, calling `each(item)` on every yielded item; return the generator's value."""
    while True:
        try:
            item = next(gen)
        except StopIteration as stop:
            return stop.value
        if each is not None:
            each(item)
