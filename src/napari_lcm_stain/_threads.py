"""The CPU thread policy of the Virtual stain dock and `lcm-stain watch` (docs/engine.md, CPU
threads beside other work): OpenMP worker threads sleep while they wait instead of spinning.

On a 2-core machine a spinning worker holds its core while the other thread of a kernel waits for
the scheduler, so every short kernel pays a time slice when another process (or napari's own
threads) is busy. `OMP_WAIT_POLICY=PASSIVE` keeps the thread count (so an idle machine loses
nothing measurable on large images) and removes that cost. The OpenMP runtime reads the variable
once, when torch loads it, so this must run before torch is imported; a value the user set wins.
"""

from __future__ import annotations

import os
import sys

#: What the dock and `watch` set, unless the user chose a wait policy.
WAIT_POLICY = "PASSIVE"


def use_passive_wait() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` for this process (and its children) if torch is not loaded
    yet and the user has not chosen a policy; True when it was set here."""
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = WAIT_POLICY
    return True
