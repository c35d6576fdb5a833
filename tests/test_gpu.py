"""Precision and device choices on the CPU, and the CUDA path (`pytest -m gpu`, skipped without
CUDA; run by scripts/gpu_check.sh on a GPU machine)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_lcm_stain import device as D
from napari_lcm_stain.engine import stain
from napari_lcm_stain.simulate import simulate_pair

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_precision_choices_on_the_cpu():
    cpu = torch.device("cpu")
    assert D.inference_dtype(cpu) == torch.float32
    assert D.inference_dtype(cpu, "bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="needs a GPU"):
        D.inference_dtype(cpu, "fp16")
    with pytest.raises(ValueError, match="unknown precision"):
        D.inference_dtype(cpu, "int8")
    assert D.auto_batch(cpu, 1024 * 1024) == 2 and D.auto_batch("cpu", 64) == 2


def test_bf16_on_the_cpu_stays_close_to_fp32():
    x = simulate_pair("brain-20x", size=128, seed=5).qobm
    a = stain(x, model="lcm", device="cpu", tile=128)
    b = stain(x, model="lcm", device="cpu", tile=128, precision="bf16")
    assert 0 < np.abs(a - b).max() < 0.1  # a different dtype, not a different model


def _sample_field():
    return simulate_pair("brain-20x", size=512, seed=20_260).qobm


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize(("precision", "tol"), [("fp32", 0.01), ("bf16", 0.03)])
def test_gpu_matches_cpu(precision, tol):
    x = _sample_field()
    ref = stain(x, model="lcm", device="cpu")
    got = stain(x, model="lcm", device="cuda", precision=precision)
    assert np.abs(got - ref).max() <= tol


@cuda
@pytest.mark.gpu
def test_gpu_tiny_training_and_finetune(tmp_path):
    from napari_lcm_stain.finetune import run_finetune
    from napari_lcm_stain.training import run_recipe

    paths = run_recipe("tiny", tmp_path / "run", device="cuda", quiet=True)
    assert all(p.exists() for p in paths.values())
    s = simulate_pair("brain-20x", size=128, seed=3)
    res = run_finetune(s.qobm, s.dapi, model="lcm", steps=4, device="cuda", val_every=2)
    assert all(t.device.type == "cpu" for t in res.tensors.values())


@cuda
@pytest.mark.gpu
def test_gpu_bench_reports_frames_and_memory():
    from napari_lcm_stain.bench import run_bench

    r = run_bench(size=512, repeats=1, big=0, device="cuda", quiet=True)
    lcm = r["models"]["lcm-1"]
    assert lcm["frames_per_s"] > 0 and lcm["peak_gpu_mb"] > 0
    assert r["cuda_bf16_matmul_tflops"] > 1
