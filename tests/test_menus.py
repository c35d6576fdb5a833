"""The menu paths the docs quote exist, with those names, in a real napari viewer (Xvfb).

napari names a plugin's submenus after the manifest's `display_name` ("LCM Virtual Stain"), not
the package name, and appends " (LCM Virtual Stain)" to widget entries; the docs must say what
users will see.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.gui

ROOT = Path(__file__).parents[1]
DISPLAY_NAME = "LCM Virtual Stain"
#: "File > Open Sample > …" in any doc or message; a path ends at "**", "`", ")." or ".".
PATH = re.compile(r"\b(?:File|Plugins|Layers)(?: > [\w+(),\- ]+?)+(?=\*\*|`|\)\.|\.)")


def quoted_paths() -> dict[str, str]:
    """{menu path: file} for every menu path written in the README, the docs and the docks."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    files += sorted((ROOT / "src" / "napari_lcm_stain" / "_widgets").glob("*.py"))
    found = {}
    for f in files:
        text = f.read_text()
        if f.suffix == ".py":  # messages split over string literals: join the pieces
            text = re.sub(r'"\s*\n\s*(?:f?")', "", text)
        for m in PATH.finditer(" ".join(text.split())):
            found.setdefault(m.group(0), f.name)
    return found


def _labels(menu) -> dict[str, object]:
    menu.aboutToShow.emit()  # napari fills some submenus only when they open
    return {a.text().replace("&", ""): a for a in menu.actions() if not a.isSeparator()}


def resolve(menubar, path: str) -> bool:
    """Whether `A > B > C` can be clicked through; a widget entry may carry napari's
    " (LCM Virtual Stain)" suffix."""
    items = {a.text().replace("&", ""): a for a in menubar.actions()}
    parts = path.split(" > ")
    for i, part in enumerate(parts):
        action = items.get(part) or items.get(f"{part} ({DISPLAY_NAME})")
        if action is None:
            return False
        if i + 1 < len(parts):
            if action.menu() is None:
                return False
            items = _labels(action.menu())
    return True


def test_docs_quote_the_menu_paths_napari_shows(make_napari_viewer):
    viewer = make_napari_viewer()
    menubar = viewer.window._qt_window.menuBar()
    paths = quoted_paths()
    # the scan is not vacuous: the README's sample and Fine-tune paths are among them
    readme = {p for p, f in paths.items() if f == "README.md"}
    assert any(p.startswith(f"File > Open Sample > {DISPLAY_NAME} > Simulated") for p in readme)
    assert f"Plugins > {DISPLAY_NAME} > Fine-tune" in readme
    wrong = {p: f for p, f in paths.items() if not resolve(menubar, p)}
    assert not wrong, f"menu paths napari does not show: {wrong}"


def test_menu_names_in_a_real_viewer(make_napari_viewer):
    viewer = make_napari_viewer()
    menubar = viewer.window._qt_window.menuBar()
    for path in (
        f"File > Open Sample > {DISPLAY_NAME} > Simulated qOBM + DAPI field (2D, brain 20x)",
        f"File > Open Sample > {DISPLAY_NAME} > Simulated qOBM + DAPI Z stack (brain 20x)",
        f"Plugins > {DISPLAY_NAME} > Virtual stain ({DISPLAY_NAME})",
        f"Plugins > {DISPLAY_NAME} > Fine-tune ({DISPLAY_NAME})",
        f"Layers > Filter > Virtual stain ({DISPLAY_NAME})",
    ):
        assert resolve(menubar, path), path
    assert not resolve(menubar, "File > Open Sample > napari-lcm-stain")  # the package name
    assert not resolve(menubar, "Plugins > Fine-tune")
