"""Checkpoints: tensors in safetensors, everything else in a JSON config beside them.

Never unpickles. Writes are atomic (temp file + rename) so an interrupted save never replaces a good
checkpoint with a truncated one. Packaged weights are verified against hashes recorded in
`weights/SHA256SUMS.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._version import __version__

FORMAT_VERSION = 1
WEIGHTS_DIR = Path(__file__).parent / "weights"
PACKAGED = {"lcm": "lcm", "teacher": "teacher", "pix2pix": "pix2pix"}
HASH_FILE = "SHA256SUMS.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


@dataclass
class Checkpoint:
    """State dicts by prefix (e.g. 'unet.', 'vae.') plus the JSON-serialisable config."""

    tensors: dict[str, torch.Tensor]
    config: dict = field(default_factory=dict)

    def sub(self, prefix: str) -> dict[str, torch.Tensor]:
        p = prefix + "."
        return {k[len(p) :]: v for k, v in self.tensors.items() if k.startswith(p)}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; shared installs need readable weights
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def config_path(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def save_checkpoint(path: Path, modules: dict[str, torch.nn.Module | dict], config: dict) -> Path:
    """Save `{prefix: module or state_dict}` to `path` (.safetensors) and its config to `.json`."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint path must end in .safetensors, got {path.name!r}")
    tensors: dict[str, torch.Tensor] = {}
    for prefix, m in modules.items():
        sd = m.state_dict() if isinstance(m, torch.nn.Module) else m
        for k, v in sd.items():
            tensors[f"{prefix}.{k}"] = v.detach().to("cpu").contiguous().clone()
    config = {**config, "format_version": FORMAT_VERSION, "package_version": __version__}
    fd, tmp = tempfile.mkstemp(dir=path.parent if path.parent.exists() else None, suffix=".tmp")
    os.close(fd)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, tmp, metadata={"format_version": str(FORMAT_VERSION)})
        data = Path(tmp).read_bytes()
    finally:
        Path(tmp).unlink(missing_ok=True)
    atomic_write_bytes(path, data)
    atomic_write_bytes(config_path(path), json.dumps(config, indent=2, sort_keys=True).encode())
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_safetensors_header(path: Path) -> None:
    """Reject pickles and truncated files before handing bytes to the parser."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:2] == b"\x80\x02" or head[:1] == b"\x80" or head[:2] == b"PK":
        raise CheckpointError(
            f"{path} is a pickle/zip (torch.save) file, not safetensors; it was not loaded because "
            "unpickling can run arbitrary code. Convert it to safetensors."
        )
    if size < 8:
        raise CheckpointError(f"{path} is truncated ({size} bytes): not a safetensors file")
    n = int.from_bytes(head[:8], "little")
    if n <= 0 or 8 + n > size or head[8:9] != b"{":
        raise CheckpointError(
            f"{path} is not a valid safetensors file (bad or truncated header); re-save or re-download it"
        )


def load_checkpoint(path: Path, verify_hash: str | None = None) -> Checkpoint:
    """Load tensors + config; every failure is a `CheckpointError` naming the problem."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give the .safetensors file inside it")
    _check_safetensors_header(path)
    if verify_hash is not None and sha256(path) != verify_hash:
        raise CheckpointError(
            f"{path} does not match the hash recorded in the package: the file is corrupt or was "
            "replaced; reinstall napari-lcm-stain"
        )
    cfg_file = config_path(path)
    if not cfg_file.exists():
        raise CheckpointError(f"config {cfg_file.name} missing beside {path.name}")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"config {cfg_file} is not valid JSON: {e}") from None
    fv = config.get("format_version")
    if fv != FORMAT_VERSION:
        raise CheckpointError(
            f"{path.name} has checkpoint format {fv!r}; this napari-lcm-stain reads format "
            f"{FORMAT_VERSION}. Use a matching napari-lcm-stain version or re-export the checkpoint."
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} could not be read as safetensors ({e}); it may be corrupt"
        ) from None
    return Checkpoint(tensors=tensors, config=config)


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Strict state-dict load whose errors say which tensors are missing or mis-shaped."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{'…' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{'…' if len(unexpected) > 3 else ''}")
        if bad:
            k = bad[0]
            parts.append(f"wrong shape for {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}")
        raise CheckpointError(f"{what} weights do not fit its architecture: " + "; ".join(parts))
    module.load_state_dict(state)


def packaged_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{PACKAGED[name]}.safetensors"


def packaged_hashes() -> dict[str, str]:
    f = WEIGHTS_DIR / HASH_FILE
    return json.loads(f.read_text()) if f.exists() else {}


def load_packaged(name: str) -> Checkpoint:
    """Load a checkpoint shipped in the wheel, verifying its recorded SHA-256."""
    path = packaged_path(name)
    if not path.exists():
        raise CheckpointError(
            f"packaged {name!r} weights are missing from {WEIGHTS_DIR}; reinstall napari-lcm-stain"
        )
    expected = packaged_hashes().get(path.name)
    if expected is None:
        raise CheckpointError(f"no hash recorded for packaged {path.name} in {HASH_FILE}")
    return load_checkpoint(path, verify_hash=expected)


def record_packaged_hashes() -> dict[str, str]:
    """Write SHA256SUMS.json for every packaged .safetensors (run after `train --package`)."""
    hashes = {p.name: sha256(p) for p in sorted(WEIGHTS_DIR.glob("*.safetensors"))}
    atomic_write_bytes(WEIGHTS_DIR / HASH_FILE, json.dumps(hashes, indent=2).encode())
    return hashes
