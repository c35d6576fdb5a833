"""Checkpoints: tensors in safetensors, everything else in a JSON config beside them.

Never unpickles. Writes are atomic (temp file + rename) so an interrupted save never replaces a good
checkpoint with a truncated one. Packaged weights and configs are verified against hashes recorded in
`weights/SHA256SUMS.json`; a saved checkpoint records the SHA-256 of its tensor file in its config
(`weights_sha256`), verified on load. Every load validates the config's structure (pydantic models
below) and the tensors (floating point, finite, not all zero), so a damaged file is named as such
instead of surfacing later as a traceback or a blank stain.
"""

from __future__ import annotations

import hashlib
import json
import os
import reprlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ._version import __version__

FORMAT_VERSION = 1
WEIGHTS_DIR = Path(__file__).parent / "weights"
PACKAGED = {"lcm": "lcm", "teacher": "teacher", "pix2pix": "pix2pix"}
HASH_FILE = "SHA256SUMS.json"
WEIGHTS_HASH_KEY = "weights_sha256"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


# ------------------------------------------------------------------------------ config schema
# Only what the loaders rely on is checked; every model allows extra keys (provenance, metrics,
# future normalisation fields). A key may be absent (its default applies) but never null.
# Every number has a range: a hostile or mistyped value is named here instead of becoming a
# traceback, an out-of-memory error, a hang or a silently wrong stain. The ranges are wide
# (the packaged models sit well inside them) and bound what one CPU or GPU can hold.


def _float(lo: float, hi: float, lo_open: bool = True):
    low = {"gt": lo} if lo_open else {"ge": lo}
    return Annotated[float, Field(**low, le=hi, allow_inf_nan=False)]


def _int(lo: int, hi: int):
    low = {"gt": 0} if lo == 1 else {"ge": lo}  # "greater than 0" reads best for counts
    return Annotated[int, Field(**low, le=hi)]


def _at_least(lo: float):
    """A floor above 0 for a value whose message should still say "greater than 0" at 0."""

    def check(v: float) -> float:
        if v < lo:
            raise ValueError(f"Input should be at least {lo:g}")
        return v

    return AfterValidator(check)


#: Channels of any one layer; the packaged networks use at most 160. At 512, the widest U-Net the
#: schema allows (8 levels) has ~75 M parameters (300 MB), so a config cannot make the loader
#: allocate gigabytes before its tensors are compared with the file's.
_Channels = _int(1, 512)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class _Closed(BaseModel):
    """Constructor arguments of a known network: an unknown one would be a TypeError later."""

    model_config = ConfigDict(extra="forbid", strict=True)


class _LatentUNetKwargs(_Closed):
    latent_channels: _int(1, 64) = 4
    factor: Literal[1, 2, 4, 8, 16] = 4
    channels: Annotated[list[_Channels], Field(min_length=1, max_length=8)] = [24, 48, 96, 160]
    emb_dim: _int(1, 4096) = 128
    cond_channels: Annotated[list[_Channels], Field(max_length=5)] = []
    # a guided LCM (training/presets.py `guidance_embed`, issue #24)
    guidance_embed: bool = False
    guidance_default: _float(0.0, 100.0, lo_open=False) = 1.0


class _VAEKwargs(_Closed):
    latent_channels: _int(1, 64) = 4
    enc_channels: _int(2, 1024) = 32  # the encoder's first layer has enc_channels // 2
    dec_channels: _Channels = 32
    factor: Literal[4, 8] = 4
    dec_quarter_channels: _Channels | None = None
    dec_half_channels: _Channels = 16
    dec_half_conv: bool = True
    dec_texture: bool = False


class _Pix2PixKwargs(_Closed):
    ngf: _int(1, 256) = 16
    depth: _int(1, 10) = 6
    max_mult: _int(1, 64) = 8

    @model_validator(mode="after")
    def _widest(self):
        if self.ngf * min(self.max_mult, 2 ** (self.depth - 1)) > 512:  # its widest layer
            raise ValueError("ngf × max_mult (the widest layer) must be at most 512 channels")
        return self


#: kwargs schema of each known network class; an unknown class is named by `models.build`.
_KWARGS = {"LatentUNet": _LatentUNetKwargs, "VAE": _VAEKwargs, "Pix2PixGenerator": _Pix2PixKwargs}


class _Arch(_Open):
    class_: str = Field(alias="class")
    kwargs: dict = {}


class _Normalization(_Open):
    type: str = "fixed"
    clip: _float(1.0, 1e4, lo_open=False) = 10.0  # normalised values are ~N(0, 1)
    mad_scale: _float(0.0, 1e3) = 1.4826
    smooth_sigma_px: _float(0.0, 16.0, lo_open=False) = 1.5  # beyond ~16 px it blurs the nuclei
    max_stat_pixels: _int(1, 10**10) = 4_000_000
    qobm_mean: _float(-1e30, 1e30, lo_open=False) = 0.0
    qobm_std: _float(0.0, 1e30) = 1.0


class _Scheduler(_Open):
    num_train_timesteps: _int(1, 10_000) = 1000
    beta_start: _float(0.0, 1.0) = 0.00085
    beta_end: _float(0.0, 1.0) = 0.012
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "v_prediction"
    timestep_spacing: Literal["linspace", "leading", "trailing"] = "trailing"
    original_inference_steps: _int(1, 10_000) = 50
    steps_offset: _int(0, 10_000) = 0
    timestep_scaling: _float(0.0, 1e4) = 10.0
    clip_sample_range: _float(0.0, 1e6) = 1.0
    sample_max_value: _float(0.0, 1e6) = 1.0
    dynamic_thresholding_ratio: _float(0.0, 1.0) = 0.995

    @model_validator(mode="after")
    def _betas_rise(self):
        if self.beta_start >= self.beta_end:
            raise ValueError(
                f"beta_start ({self.beta_start:g}) must be below beta_end ({self.beta_end:g})"
            )
        return self


class _Config(_Open):
    format_version: int
    kind: str = ""
    normalization: _Normalization = _Normalization()
    pixel_size: _float(0.0, 100.0) = 0.414  # µm/px
    multiple: _int(1, 4096) = 1
    receptive_field: _int(0, 4096) = 64
    weights_sha256: Annotated[str, Field(pattern="^[0-9a-f]{64}$")] = ""


class _Guidance(_Closed):
    """The guidance a latent model accepts (`_params.check_guidance`): a guided LCM's trained
    range of w, or a teacher trained with condition dropout (classifier-free guidance)."""

    min: _float(0.0, 100.0, lo_open=False) = 1.0
    max: _float(0.0, 100.0, lo_open=False) = 1.0
    default: _float(0.0, 100.0, lo_open=False) = 1.0
    # how: "embedding" = w is the guided LCM's input (no extra cost); "cfg" = classifier-free,
    # two branches per step (the qOBM zeroed in one); None = by kind (LCM embedding, teacher cfg)
    method: Literal["embedding", "cfg"] | None = None

    @model_validator(mode="after")
    def _ordered(self):
        if not self.min <= self.default <= self.max:
            raise ValueError(
                f"needs min <= default <= max, got {self.min:g}, {self.default:g}, {self.max:g}"
            )
        return self


class _LatentArch(_Open):
    unet: _Arch
    vae: _Arch


class _LatentConfig(_Config):
    architecture: _LatentArch
    # training sets 1 / (std of the latents + 1e-6): at most 1e6
    latent_scale: Annotated[_float(0.0, 1e6), _at_least(1e-6)]
    scheduler: _Scheduler = _Scheduler()
    guidance: _Guidance | None = None


class _PixelArch(_Open):
    generator: _Arch


class _PixelConfig(_Config):
    architecture: _PixelArch


_SCHEMAS = {"lcm": _LatentConfig, "teacher": _LatentConfig, "pix2pix": _PixelConfig}
_JSON_TYPES = {list: "an array", type(None): "null", str: "a string", bool: "a boolean",
               int: "a number", float: "a number"}  # fmt: skip


def _invalid(e: ValidationError, where: Path, prefix: tuple = ()) -> CheckpointError:
    """The first problem of a pydantic error, as one line naming the field and the value."""
    err = e.errors()[0]
    field_name = ".".join(str(p) for p in prefix + tuple(err["loc"])) or "config"
    msg = err["msg"]
    if err["type"] in ("model_type", "dict_type"):  # not the name of our pydantic class
        msg = "Input should be a JSON object {...}"
    if err["type"] == "value_error":  # our own checks: the message names the values
        msg = msg.removeprefix("Value error, ")
    if err["type"] != "missing" and not isinstance(err["input"], dict):
        msg += f", got {reprlib.repr(err['input'])}"
    more = f" (+{e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return CheckpointError(
        f"config {where} is not a valid checkpoint config: {field_name}: {msg}{more}; "
        "restore the .json saved with the checkpoint or re-export it"
    )


def validate_config(config, where: Path) -> dict:
    """Check a checkpoint config's structure and ranges; a `CheckpointError` names the first bad
    field."""
    if not isinstance(config, dict):
        got = _JSON_TYPES.get(type(config), type(config).__name__)
        raise CheckpointError(
            f"config {where} must be a JSON object {{...}}, got {got}: restore the .json saved "
            "with the checkpoint"
        )
    schema = _SCHEMAS.get(config.get("kind"), _Config)
    try:
        schema.model_validate(config)
    except ValidationError as e:
        raise _invalid(e, where) from None
    if schema is _Config:
        return config
    for slot, arch in config["architecture"].items():
        kwargs_schema = _KWARGS.get(arch.get("class")) if isinstance(arch, dict) else None
        if kwargs_schema is None:
            continue
        try:
            kwargs_schema.model_validate(arch.get("kwargs", {}))
        except ValidationError as e:
            raise _invalid(e, where, ("architecture", slot, "kwargs")) from None
    return config


def check_tensors(tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Refuse weights that cannot be a trained network: non-float, NaN/Inf, or a part all zero."""
    nonzero: dict[str, bool] = {}
    for k, v in tensors.items():
        if k.endswith("num_batches_tracked"):  # BatchNorm's step counter is an integer
            continue
        if not v.is_floating_point():
            raise CheckpointError(
                f"{where}: tensor {k} has dtype {v.dtype}, not floating point: the weights were "
                "converted or damaged; re-save or re-download the checkpoint"
            )
        if not torch.isfinite(v).all():
            raise CheckpointError(
                f"{where}: tensor {k} has NaN or Inf values: the weights are damaged (a diverged "
                "run or a corrupt file); use another checkpoint"
            )
        part = k.split(".", 1)[0]
        nonzero[part] = nonzero.get(part, False) or bool(v.any())
    zero = sorted(p for p, nz in nonzero.items() if not nz)
    if zero:
        raise CheckpointError(
            f"{where}: every {zero[0]!r} weight is zero: the weights are damaged or were never "
            "trained; use another checkpoint"
        )


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
    fd, tmp = tempfile.mkstemp(dir=path.parent if path.parent.exists() else None, suffix=".tmp")
    os.close(fd)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, tmp, metadata={"format_version": str(FORMAT_VERSION)})
        data = Path(tmp).read_bytes()
    finally:
        Path(tmp).unlink(missing_ok=True)
    config = {
        **config,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        WEIGHTS_HASH_KEY: hashlib.sha256(data).hexdigest(),
    }
    atomic_write_bytes(path, data)
    atomic_write_bytes(config_path(path), json.dumps(config, indent=2, sort_keys=True).encode())
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: safetensors refuses headers above 100 MB; a longer "length" is the first bytes of another format.
MAX_HEADER_BYTES = 100_000_000


def _check_safetensors_header(path: Path) -> None:
    """Reject pickles and truncated files before handing bytes to the parser.

    A safetensors file is recognised first: its first 8 bytes are a header length (which may well
    start with 0x80 or "PK": a header of 12,928 bytes does) followed by a JSON header. Truncation
    is checked on that layout (header and tensor data), so a cut file is called truncated, and
    pickle/zip magic is only the diagnosis of a file that is not safetensors."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
        n = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
        # a header length safetensors accepts, then its JSON (or the end of a file cut there):
        # pickle and zip magic read as a length are far beyond the limit
        ours = 0 < n <= MAX_HEADER_BYTES and head[8:9] in (b"{", b"")
        header = f.read(n - 1) if ours and 8 + n <= size else b""
    if ours:
        need = 8 + n if 8 + n > size else 8 + n + _data_length(head[8:] + header)
        if need > size:
            raise CheckpointError(
                f"{path} is truncated ({size} of {need} bytes): an incomplete download or copy; "
                "copy or download it again"
            )
        return
    if head[:1] == b"\x80" or head[:2] == b"PK":
        raise CheckpointError(
            f"{path} is a pickle/zip (torch.save) file, not safetensors; it was not loaded because "
            "unpickling can run arbitrary code. Convert it to safetensors."
        )
    if size < 8:
        raise CheckpointError(f"{path} is truncated ({size} bytes): not a safetensors file")
    raise CheckpointError(
        f"{path} is not a valid safetensors file (bad or truncated header); re-save or re-download it"
    )


def _data_length(header: bytes) -> int:
    """Bytes of tensor data a safetensors JSON header describes (its largest end offset); 0 if
    the header cannot be read (the parser then names the damage)."""
    try:
        entries = json.loads(header)
        return max(
            (int(v["data_offsets"][1]) for k, v in entries.items() if k != "__metadata__"),
            default=0,
        )
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
        return 0


def _verify_hash(path: Path, expected: str, recorded_in: str, fix: str) -> None:
    if sha256(path) != expected:
        raise CheckpointError(
            f"{path} does not match the hash recorded in {recorded_in}: the file is corrupt or "
            f"was changed after saving; {fix}"
        )


def load_checkpoint(
    path: Path, verify_hash: str | None = None, verify_config_hash: str | None = None
) -> Checkpoint:
    """Load tensors + config; every failure is a `CheckpointError` naming the problem.

    `verify_hash` / `verify_config_hash`: expected SHA-256 of the tensor file / its JSON config
    (the packaged weights); a user checkpoint's own `weights_sha256` is verified in any case."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give the .safetensors file inside it")
    _check_safetensors_header(path)
    reinstall = "reinstall napari-lcm-stain"
    if verify_hash is not None:
        _verify_hash(path, verify_hash, "the package", reinstall)
    cfg_file = config_path(path)
    if not cfg_file.exists():
        raise CheckpointError(f"config {cfg_file.name} missing beside {path.name}")
    if verify_config_hash is not None:
        _verify_hash(cfg_file, verify_config_hash, "the package", reinstall)
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"config {cfg_file} is not valid JSON: {e}") from None
    except RecursionError:
        raise CheckpointError(
            f"config {cfg_file} is nested too deeply to be a checkpoint config; restore the .json "
            "saved with the checkpoint"
        ) from None
    fv = config.get("format_version") if isinstance(config, dict) else None
    if isinstance(config, dict) and fv != FORMAT_VERSION:
        raise CheckpointError(
            f"{path.name} has checkpoint format {fv!r}; this napari-lcm-stain reads format "
            f"{FORMAT_VERSION}. Use a matching napari-lcm-stain version or re-export the checkpoint."
        )
    validate_config(config, cfg_file)
    if config.get(WEIGHTS_HASH_KEY):
        _verify_hash(
            path, config[WEIGHTS_HASH_KEY], cfg_file.name, "re-save or re-download the checkpoint"
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} could not be read as safetensors ({e}); it may be corrupt"
        ) from None
    check_tensors(tensors, path)
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
    hashes = packaged_hashes()
    expected = [hashes.get(p.name) for p in (path, config_path(path))]
    for p, h in zip((path, config_path(path)), expected):
        if h is None:
            raise CheckpointError(f"no hash recorded for packaged {p.name} in {HASH_FILE}")
    return load_checkpoint(path, verify_hash=expected[0], verify_config_hash=expected[1])


def record_packaged_hashes() -> dict[str, str]:
    """Write SHA256SUMS.json for every packaged .safetensors and its .json config (run after
    `train --package`)."""
    files = sorted(WEIGHTS_DIR.glob("*.safetensors"))
    files += [config_path(p) for p in files if config_path(p).exists()]
    hashes = {p.name: sha256(p) for p in sorted(files)}
    atomic_write_bytes(WEIGHTS_DIR / HASH_FILE, json.dumps(hashes, indent=2).encode())
    return hashes
