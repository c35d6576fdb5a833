"""Packaging: the npe2 manifest resolves from the installed distribution and every command imports."""

import ast
import importlib
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from npe2 import PluginManifest

ROOT = Path(__file__).resolve().parents[1]


def test_entry_point_resolves_to_the_manifest():
    eps = [e for e in entry_points(group="napari.manifest") if e.name == "napari-lcm-stain"]
    assert len(eps) == 1
    pm = PluginManifest.from_distribution("napari-lcm-stain")
    assert pm.name == "napari-lcm-stain"
    assert {w.display_name for w in pm.contributions.widgets} == {"Virtual stain", "Fine-tune"}
    assert {s.key for s in pm.contributions.sample_data} == {"qobm_field", "qobm_stack"}


def test_top_level_manifest_is_the_packaged_one():
    top = ROOT / "napari.yaml"
    inner = ROOT / "src" / "napari_lcm_stain" / "napari.yaml"
    assert top.read_text() == inner.read_text()


@pytest.mark.parametrize(
    "cmd",
    PluginManifest.from_distribution("napari-lcm-stain").contributions.commands,
    ids=lambda c: c.id,
)
def test_every_command_imports(cmd):
    mod, _, attr = cmd.python_name.partition(":")
    assert callable(getattr(importlib.import_module(mod), attr))


def test_core_does_not_import_qt_or_napari():
    # every module except the napari glue (docks, sample data, reader/writer) is core
    pkg = ROOT / "src" / "napari_lcm_stain"
    glue = {"_sample_data.py", "_reader_writer.py"}
    core = [
        f
        for f in pkg.rglob("*.py")
        if "_widgets" not in f.relative_to(pkg).parts and f.name not in glue
    ]
    assert {"engine.py", "finetune.py", "recipe.py", "cli.py", "watch.py"} <= {f.name for f in core}
    banned = {"napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "vispy"}
    for path in core:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                tops = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                tops = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not tops & banned, f"{path.name} imports {tops & banned}"


def test_cli_help_lists_all_subcommands(capsys):
    from napari_lcm_stain.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for sub in ("demo", "stain", "simulate", "train", "finetune", "evaluate", "bench"):
        assert sub in out
