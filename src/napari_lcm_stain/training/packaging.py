"""From a finished run to shipped weights: measure each stain model's tiling context and copy the
checkpoints into the package with their hashes."""

from __future__ import annotations

import json
from pathlib import Path

from .. import checkpoints as ckpt


def calibrate_receptive_field(path: Path, tol: float = 0.002, size: int = 512) -> int:
    """Measure how much input context a checkpoint needs for tiled = whole-image (within `tol`)
    and store 2x (that margin + one tile multiple) as `receptive_field` in its JSON config (the
    engine adds half of it around every tile). Measured, not guessed: the U-Net's reach is far
    larger than its nominal window because of the 1/32-resolution level. The extra multiple is a
    safety margin: the measurement cuts one corner crop, while inner tiles are cut on four sides
    (at the bare measured margin a 1024² seam check gave 0.019 > 0.01)."""
    from ..sampling import load_predictor
    from ..simulate import simulate_pair
    from ..tiling import measure_context

    pred = load_predictor(path, device="cpu")
    field = simulate_pair("brain-20x", size=size, seed=31_337).qobm
    ctx = measure_context(pred, pred.normalize(field), tol=tol) + int(pred.multiple)
    cfg_path = ckpt.config_path(path)
    cfg = json.loads(cfg_path.read_text())
    cfg["receptive_field"] = int(2 * ctx)
    cfg["receptive_field_measured"] = {"tolerance": tol, "context_px": int(ctx), "field": size}
    ckpt.atomic_write_bytes(cfg_path, json.dumps(cfg, indent=2, sort_keys=True).encode())
    return int(2 * ctx)


def package_weights(run_dir: Path) -> None:
    """Copy a finished run's stain models into the package, calibrate their tiling context and
    record their hashes."""
    ckpt.WEIGHTS_DIR.mkdir(exist_ok=True)
    for name in ("lcm", "teacher", "pix2pix"):
        for ext in (".safetensors", ".json"):
            src = Path(run_dir) / f"{name}{ext}"
            if not src.exists():
                raise FileNotFoundError(f"{src} missing: run all training stages before --package")
            ckpt.atomic_write_bytes(ckpt.WEIGHTS_DIR / f"{name}{ext}", src.read_bytes())
        rf = calibrate_receptive_field(ckpt.WEIGHTS_DIR / f"{name}.safetensors")
        print(f"packaged {name}: receptive_field {rf} px")
    stamp_release()


def stamp_release(version: str | None = None) -> None:
    """Record the release the packaged checkpoints ship in (`release`, the package version;
    `version` keeps the version each stage was trained under) and re-hash them. Run by
    `package_weights`; on its own after copying a finished run's packaged files in."""
    from .._version import __version__

    for name in ("lcm", "teacher", "pix2pix"):
        path = ckpt.WEIGHTS_DIR / f"{name}.json"
        if path.exists():
            cfg = json.loads(path.read_text())
            cfg["release"] = version or __version__
            ckpt.atomic_write_bytes(path, json.dumps(cfg, indent=2, sort_keys=True).encode())
    ckpt.record_packaged_hashes()


def set_guidance(name: str, default: float | None = None, method: str | None = None) -> dict:
    """Set the default guidance (and how it is applied, "embedding" or "cfg") of a packaged
    latent model after measuring it (experiments/ablate_teacher.py `--pick`), within the range
    it was trained for; re-hashes the package. Returns the new `guidance` config."""
    from .._params import check_guidance, guidance_range

    path = ckpt.WEIGHTS_DIR / f"{name}.json"
    cfg = json.loads(path.read_text())
    if not cfg.get("guidance"):
        raise ValueError(f"the packaged {name} has no guidance to set")
    g = dict(cfg["guidance"])
    if method is not None:
        if method not in ("embedding", "cfg"):
            raise ValueError(f"method must be 'embedding' or 'cfg', got {method!r}")
        g["method"] = method
    if default is not None:
        g["default"] = check_guidance(default, guidance_range({**cfg, "guidance": g}))
    cfg["guidance"] = g
    ckpt.atomic_write_bytes(path, json.dumps(cfg, indent=2, sort_keys=True).encode())
    ckpt.record_packaged_hashes()
    return g


def load_init(spec) -> tuple[dict[str, ckpt.Checkpoint], object, list[str]]:
    """The weights `lcm-stain train --init` starts every stage from (transfer).

    `spec`: "packaged", a run folder (its lcm/teacher/pix2pix.safetensors) or an LCM checkpoint
    file (teacher/pix2pix beside it are used if present). Returns ({"lcm", "teacher"?,
    "pix2pix"?: Checkpoint}, the LCM as `engine.stain` takes it, notes). A missing teacher starts
    from the LCM's U-Net; a missing Pix2Pix from scratch."""
    notes: list[str] = []
    if str(spec) == "packaged":
        found = {n: ckpt.load_packaged(n) for n in ("lcm", "teacher", "pix2pix")}
        return found, "lcm", notes
    path = Path(spec)
    lcm_path = path / "lcm.safetensors" if path.is_dir() else path
    if not lcm_path.exists():
        raise FileNotFoundError(
            f"--init {spec}: {lcm_path} not found; give 'packaged', a run folder with "
            "lcm.safetensors, or an LCM checkpoint"
        )
    found = {"lcm": ckpt.load_checkpoint(lcm_path)}
    if found["lcm"].config.get("kind") != "lcm" or not found["lcm"].sub("encoder"):
        raise ValueError(
            f"--init {lcm_path}: not an LCM checkpoint with VAE encoder weights (kind "
            f"{found['lcm'].config.get('kind')!r}); give 'packaged' or a run's lcm.safetensors"
        )
    for name in ("teacher", "pix2pix"):
        p = lcm_path.parent / f"{name}.safetensors"
        if p.exists() and p != lcm_path:
            found[name] = ckpt.load_checkpoint(p)
    if "teacher" not in found:
        notes.append(
            f"--init: no teacher.safetensors beside {lcm_path}: the teacher starts from the LCM's U-Net"
        )
    if "pix2pix" not in found:
        notes.append(
            f"--init: no pix2pix.safetensors beside {lcm_path}: Pix2Pix starts from scratch"
        )
    return found, lcm_path, notes
