"""Shared pytest fixtures (kept minimal; napari's own fixtures come from the napari pytest plugin)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _drain_qt_workers(request):
    """After any Qt/napari test, wait for background workers so none leaks into the next test."""
    yield
    if {"qtbot", "make_napari_viewer"} & set(request.fixturenames):
        from qtpy.QtCore import QThreadPool

        QThreadPool.globalInstance().waitForDone(60_000)
