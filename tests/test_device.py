"""Device choice: auto prefers cuda, then mps, then cpu; explicit choices fail clearly."""

import pytest
import torch

from napari_lcm_stain import device as dev


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"),
    [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"), (False, False, "cpu")],
)
def test_auto_order(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(dev, "_mps_available", lambda: mps)
    assert dev.resolve_device("auto").type == expected
    assert dev.resolve_device(None).type == expected


def test_explicit_unavailable_device_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "_mps_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA"):
        dev.resolve_device("cuda")
    with pytest.raises(ValueError, match="MPS"):
        dev.resolve_device("mps")
    with pytest.raises(ValueError, match="choose one of"):
        dev.resolve_device("tpu")
    assert dev.resolve_device("CPU").type == "cpu"


def test_dtype_and_memory_format_policy():
    assert dev.inference_dtype(torch.device("cuda")) == torch.float16
    assert dev.inference_dtype(torch.device("cpu")) == torch.float32
    assert dev.inference_dtype(torch.device("mps")) == torch.float32
    m = dev.prepare_module(torch.nn.Conv2d(1, 2, 3), torch.device("cpu"))
    assert not m.training and m.weight.dtype == torch.float32
    assert dev.describe(torch.device("cpu")).startswith("cpu")
