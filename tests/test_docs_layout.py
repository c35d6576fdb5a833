"""The repository reads as a product: every experiment script and result file is indexed, the
napari hub metadata is complete, and releases are named by version, not by internal work rounds."""

import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]


def _tracked(*paths: str) -> list[Path]:
    """Files git tracks under `paths` (a clean clone has exactly these)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--", *paths],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / p for p in out.decode().split("\0") if p]


def test_every_experiment_script_is_indexed():
    index = (ROOT / "docs" / "experiments.md").read_text(encoding="utf-8")
    missing = [p.name for p in _tracked("experiments") if p.name not in index]
    assert not missing, f"add an entry for these to docs/experiments.md: {missing}"


def test_every_result_file_is_cited():
    """docs/results keeps only what the model card, the experiment index or a test cites."""
    citing = [ROOT / "docs" / "model-card.md", ROOT / "docs" / "experiments.md"]
    citing += _tracked("tests")
    text = "\n".join(p.read_text(encoding="utf-8") for p in citing if p.suffix in (".md", ".py"))
    uncited = [p.name for p in _tracked("docs/results") if p.name not in text]
    assert not uncited, (
        f"cite these in the model card or docs/experiments.md, or delete them: {uncited}"
    )


def test_no_internal_round_names():
    pattern = re.compile("sess" + r"ion[- _]?\d", re.I)  # split so this file does not match
    paths = _tracked("src", "docs", "scripts", "tests", "experiments", "README.md", "CHANGELOG.md")
    hits = []
    for p in paths:
        if p.suffix in (".png", ".safetensors", ".tif", ".tiff"):
            continue
        text = p.read_text(encoding="utf-8", errors="replace")
        hits += [f"{p.relative_to(ROOT)}:{text[: m.start()].count(chr(10)) + 1}"
                 for m in pattern.finditer(text)]  # fmt: skip
        if pattern.search(p.name):
            hits.append(str(p.relative_to(ROOT)))
    assert not hits, f"name releases by version and experiments by what they tested: {hits}"


def test_napari_hub_metadata():
    config = yaml.safe_load((ROOT / ".napari-hub" / "config.yml").read_text(encoding="utf-8"))
    assert config["summary"].strip() and config["labels"]["terms"]
    assert {"Source Code", "Bug Tracker", "Documentation"} <= set(config["project_urls"])
    description = (ROOT / ".napari-hub" / "DESCRIPTION.md").read_text(encoding="utf-8")
    for heading in ("## Install", "## Honest scope", "## How to cite"):
        assert heading in description, heading
    images = re.findall(r"raw\.githubusercontent\.com/[^/]+/[^/]+/main/([^)\s]+)", description)
    assert images, "the hub description shows a screenshot"
    for rel in images:
        assert (ROOT / rel).is_file(), rel
    assert (ROOT / "CITATION.cff").is_file()
