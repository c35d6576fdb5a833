"""Resuming a run folder: only a run trained with the same preset, data, seed and settings.

Every stage checkpoint records what it was trained with in its config's ``provenance``: the
preset (all its fields), the seed, ``init`` and, with ``--data``, ``data_files`` (every pair's
files with their content SHA-256, the pixel size pairs.csv gives, the registration settings).
Before any work, `check_run_folder` compares the stage checkpoints already in the folder with
the run about to start: they match -> "resuming: stages X, Y already done"; they differ -> the
run is refused with the differences, unless ``overwrite`` (``--overwrite``) deletes them and
starts again. So a folder never mixes stages of two runs, and ``validation.json`` never scores
the old model as if it had been trained on new data.

Checkpoints written before ``data_files`` was recorded are compared by data folder only.
"""

from __future__ import annotations

import json
from pathlib import Path

from .presets import STAGES

#: What a run writes besides the stage checkpoints, deleted with them by ``--overwrite``.
RUN_FILES = ("timings.json", "validation.json")


def _plain(value):
    """JSON round trip, so tuples (a preset's) compare equal to the lists a config holds."""
    return json.loads(json.dumps(value))


def _init_text(init) -> str:
    return "none" if init is None else repr(str(init))


def _data_text(files: dict | None) -> str:
    return "simulated fields" if files is None else f"the pairs in {files['folder']}"


def run_record(preset: dict, seed: int, init, data_files: dict | None) -> dict:
    """What a run is compared by (the provenance keys a stage checkpoint records)."""
    return {
        "preset": _plain(preset),
        "seed": seed,
        "init": None if init is None else str(init),
        "data_files": data_files,
    }


def differences(recorded: dict, now: dict) -> list[str]:
    """How the run `now` (`run_record`) differs from a stage checkpoint's `recorded` provenance,
    one phrase per difference ("seed 0 there, 1 now")."""
    out = []
    old_p, new_p = recorded.get("preset") or {}, now["preset"]
    if old_p.get("name") != new_p.get("name"):
        out.append(f"preset {old_p.get('name')!r} there, {new_p.get('name')!r} now")
    else:  # fields a checkpoint predates are not compared
        for k in sorted(set(old_p) & set(new_p)):
            if old_p[k] != new_p[k]:
                out.append(f"preset setting {k} {old_p[k]!r} there, {new_p[k]!r} now")
    if recorded.get("seed") != now["seed"]:
        out.append(f"seed {recorded.get('seed')} there, {now['seed']} now")
    if recorded.get("init") != now["init"]:
        out.append(
            f"--init {_init_text(recorded.get('init'))} there, {_init_text(now['init'])} now"
        )
    old_d, new_d = recorded.get("data_files"), now["data_files"]
    legacy = old_d is None and "data" in recorded  # recorded before data_files: the folder only
    if legacy:
        old_d = {"folder": str(recorded["data"].get("folder")), "pairs": None}
    if (old_d is None) != (new_d is None) or (old_d and old_d["folder"] != new_d["folder"]):
        out.append(f"data {_data_text(old_d)} there, {_data_text(new_d)} now")
    elif old_d is not None and not legacy:
        out += _data_differences(old_d, new_d)
    return out


def _data_differences(old: dict, new: dict) -> list[str]:
    out = []
    before = {(p["qobm"], p["dapi"]): p for p in old["pairs"]}
    after = {(p["qobm"], p["dapi"]): p for p in new["pairs"]}
    for files in before.keys() - after.keys():
        out.append(f"pair {files[0]} + {files[1]} no longer in the data")
    for files in after.keys() - before.keys():
        out.append(f"pair {files[0]} + {files[1]} added to the data")
    for files in sorted(before.keys() & after.keys()):
        a, b = before[files], after[files]
        for role, path in zip(("qobm", "dapi"), files):
            if a[f"{role}_sha256"] != b[f"{role}_sha256"]:
                out.append(f"{path} changed since (another content hash)")
        if a["pixel_size"] != b["pixel_size"]:
            out.append(
                f"pairs.csv pixel_size of {files[0]} {a['pixel_size']} there, {b['pixel_size']} now"
            )
    for key, flag in (("register", "--register"), ("max_shift", "--max-shift")):
        if old.get(key) != new.get(key):
            out.append(f"{flag} {old.get(key)} there, {new.get(key)} now")
    return out


def check_run_folder(out: Path, now: dict, *, resume: bool, overwrite: bool, log) -> None:
    """Compare the stage checkpoints already in `out` with the run `now` (`run_record`).

    Same run: log "resuming: stages X, Y already done" (with `resume`). Another run: raise
    ValueError naming the differences, or with `overwrite` delete its stage checkpoints,
    timings.json and validation.json and log that the run starts again."""
    out = Path(out)
    done = [s for s in STAGES if (out / f"{s}.safetensors").exists()]
    stale = [out / f"{s}{ext}" for s in STAGES for ext in (".safetensors", ".json")]
    stale = [f for f in stale + [out / f for f in RUN_FILES] if f.exists()]
    if overwrite:
        for f in stale:
            f.unlink(missing_ok=True)  # under torchrun every rank deletes
        if stale:
            log(f"--overwrite: removed {', '.join(f.name for f in stale)}; starting again")
        return
    diffs: dict[str, None] = {}  # every difference once, in the stages' order
    for stage in done:
        cfg_file = out / f"{stage}.json"
        try:
            found = differences(json.loads(cfg_file.read_text()).get("provenance") or {}, now)
        except (OSError, ValueError, AttributeError):
            found = [f"{cfg_file.name} is missing or unreadable"]
        diffs.update(dict.fromkeys(found))
    if diffs:
        raise ValueError(
            f"{out} holds stages of another run ({', '.join(done)}): "
            + "; ".join(diffs)
            + ": pass --overwrite to restart (it deletes those stages), or choose another --out"
        )
    if done and resume:
        log(f"resuming: stages {', '.join(done)} already done")
