"""The packaged models: they load from the installed package, beat a trivial baseline, and fine-tuning
on a shifted instrument helps. These use the real packaged weights (slow, run in CI)."""

import json

import numpy as np
import pytest

from napari_lcm_stain import checkpoints as ck
from napari_lcm_stain import metrics, stain
from napari_lcm_stain.evaluate import benchmark_fields, threshold_phase
from napari_lcm_stain.simulate import simulate_pair

pytestmark = pytest.mark.slow


def test_packaged_weights_verified_and_provenanced():
    hashes = ck.packaged_hashes()
    assert set(hashes) == {"lcm.safetensors", "teacher.safetensors", "pix2pix.safetensors"}
    for name in ("lcm", "teacher", "pix2pix"):
        cfg = ck.load_packaged(name).config
        assert cfg["provenance"]["preset"]["name"] == "default"
        assert "command" in cfg["provenance"] and cfg["pixel_size"] == pytest.approx(0.414)


def test_packaged_lcm_beats_trivial_baseline():
    rows = {"lcm": [], "baseline": []}
    for _, _, s in benchmark_fields(n=4, size=256):
        pred = {
            "lcm": stain(s.qobm, model="lcm", pixel_size=s.pixel_size),
            "baseline": threshold_phase(s.qobm, s.pixel_size),
        }
        for k, p in pred.items():
            m = metrics.image_metrics(p, s.dapi, true_labels=s.nuclei, pixel_size=s.pixel_size)
            rows[k].append((m["pearson"], m["f1"]))
    lcm, base = np.mean(rows["lcm"], axis=0), np.mean(rows["baseline"], axis=0)
    assert lcm[0] > base[0] + 0.2, (lcm, base)
    assert lcm[1] > base[1] + 0.05, (lcm, base)  # measured: 0.28 vs 0.21 (model card)


@pytest.fixture(scope="module")
def shifted_finetune(tmp_path_factory):
    """Fine-tune on one shifted-preset pair; a different shifted field is held out."""
    from napari_lcm_stain.train import run_finetune

    train_pair = simulate_pair("shifted-20x", size=256, seed=777)
    held = simulate_pair("shifted-20x", size=256, seed=778)
    res = run_finetune(train_pair.qobm, train_pair.dapi, model="lcm", steps=150, patch=96, seed=0)
    path = res.save(tmp_path_factory.mktemp("ft") / "ft.safetensors")

    def score(model):
        pred = stain(held.qobm, model=model, pixel_size=held.pixel_size)
        m = metrics.image_metrics(
            pred, held.dapi, true_labels=held.nuclei, pixel_size=held.pixel_size
        )
        return pred, m["pearson"], m["f1"]

    return res, score("lcm"), score(str(path))


def test_finetune_changes_the_model_and_records_metrics(shifted_finetune):
    res, before, after = shifted_finetune
    # the base model (step 0) is kept unless a fine-tuned step beats it on validation
    assert (res.best_step == 0) == np.array_equal(before[0], after[0])
    assert {"pearson", "ssim", "f1"} <= set(res.metrics_before) and set(res.metrics_after)
    score = res.metrics_after["pearson"] + res.metrics_after["f1"]
    assert score >= res.metrics_before["pearson"] + res.metrics_before["f1"] - 1e-6
    assert 0 <= res.best_step <= 150


@pytest.mark.xfail(
    strict=True,
    reason="known shortfall (issue 6): fine-tuning on one small pair does not improve a held-out "
    "field (the base is kept, or the chosen step over-fits); see docs/model-card.md",
)
def test_finetune_on_shifted_instrument_helps(shifted_finetune):
    _, before, after = shifted_finetune
    (_, p0, f0), (_, p1, f1) = before, after
    json.dumps({"before": [p0, f0], "after": [p1, f1]})
    assert p1 > p0 + 0.01 and f1 > f0, (before[1:], after[1:])
