"""Pick the compute device once, the same way everywhere (CLI, widgets, training).

`auto` prefers CUDA, then Apple MPS, then CPU. On CUDA we run half precision and channels-last;
everything else in the code path is shared with the CPU.
"""

from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn a user's choice into a usable `torch.device`, with a clear error when it is not there."""
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").lower()
    if name not in DEVICE_CHOICES:
        raise ValueError(f"unknown device {device!r}: choose one of {', '.join(DEVICE_CHOICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' requested but this torch has no CUDA GPU available "
            f"(torch {torch.__version__}); use device='auto' or 'cpu', or install a CUDA build of torch"
        )
    if name == "mps" and not _mps_available():
        raise ValueError(
            "device 'mps' requested but Apple MPS is not available; use 'auto' or 'cpu'"
        )
    return torch.device(name)


#: Inference precisions: "auto" = float16 on CUDA (tensor cores), float32 elsewhere (CPU half is
#: slow, MPS half is flaky); the others force a dtype (bf16 keeps float32's range).
PRECISIONS = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def inference_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype the networks run in on `device` for a `precision` choice (see PRECISIONS)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise ValueError("precision 'fp16' needs a GPU; on the CPU use 'fp32' or 'bf16'")
        return PRECISIONS[precision]
    return torch.float16 if device.type == "cuda" else torch.float32


def auto_batch(device: torch.device, tile_pixels: int, bytes_per_pixel: int = 1024) -> int:
    """Tiles per forward pass: 2 off CUDA (the CPU gains nothing from more); on CUDA as many as
    half the free memory holds at `bytes_per_pixel` of activations (a generous bound for these
    compact networks in half precision), between 1 and 32."""
    device = torch.device(device)
    if device.type != "cuda":
        return 2
    free, _total = torch.cuda.mem_get_info(device)
    return int(max(1, min(32, (free // 2) // max(1, tile_pixels * bytes_per_pixel))))


def to_device(x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Host -> device copy; on CUDA through pinned memory, so the copy can overlap compute."""
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, dtype, non_blocking=True)
    return x.to(device, dtype)


def prepare_module(
    module: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype | None = None,
    compile: bool = False,
) -> torch.nn.Module:
    """Move a network to its device in eval mode, with the dtype (default: the device's inference
    dtype) and memory format of that device; `compile` wraps it in `torch.compile` (CUDA only:
    worth it only where `bench` shows it pays)."""
    module = module.to(device=device, dtype=dtype or inference_dtype(device)).eval()
    if device.type == "cuda":
        module = module.to(memory_format=torch.channels_last)
        if compile:
            module = torch.compile(module)
    return module


def describe(device: torch.device) -> str:
    """Human-readable name for the UI and logs, e.g. 'cuda (NVIDIA A100)' or 'cpu (2 threads)'."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return device.type


def mixed_precision(device: torch.device):
    """Autocast for training steps: bfloat16 on CUDA (no grad scaler needed, unlike float16),
    a no-op elsewhere so the CPU path stays bit-exact."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def synchronize(device) -> None:
    """Wait for queued GPU work (timings on CUDA are otherwise only launch times)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
