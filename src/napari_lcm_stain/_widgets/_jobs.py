"""The work the docks hand to napari's ``thread_worker``: plain generators with no Qt or viewer.

They get arrays and settings, yield progress, and *return* either a result or a `JobFailure`
(never raise): superqt's GeneratorWorker turns a ``RuntimeError`` raised inside a generator
(e.g. torch's out-of-memory error) into a silent warning, so catching everything here is the only
way every failure reaches the user as a message.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._threads import use_passive_wait

logger = logging.getLogger(__name__)
#: The docks load torch only in their jobs (after this import): its OpenMP threads then sleep while
#: they wait instead of spinning beside napari's own threads (docs/engine.md, thread policy).
use_passive_wait()

#: Keys of `metrics.image_metrics` shown in the Stain dock (pixel agreement, then nuclei).
METRIC_KEYS = ("pearson", "ssim", "recall", "precision", "f1")


@dataclass(frozen=True)
class Progress:
    """One progress tick: what runs now, and overall tiles done / expected."""

    label: str
    done: int
    total: int


@dataclass(frozen=True)
class JobFailure:
    message: str


@dataclass(frozen=True)
class StainJob:
    """One model to run: output role, model label, what `load_predictor` gets, steps, samples,
    and its guidance scale (None: the model's default)."""

    role: str
    label: str
    model: Any
    steps: int | None
    samples: int = 1
    guidance: float | None = None


@dataclass
class StainOutcome:
    outputs: list[tuple[str, str, np.ndarray]] = field(default_factory=list)  # (role, label, data)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> metric -> value
    devices: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # engine remarks (e.g. rescaled pixel size)
    ood: dict | None = None  # the engine's out-of-distribution result, when it flagged the input
    pixel_size_estimated: float | None = None  # µm/px the engine read from the image, if any
    seconds: float = 0.0
    #: (role, label) -> what the writer stores with that layer (see `provenance`)
    provenance: dict[tuple[str, str], dict] = field(default_factory=dict)


def failure_message(exc: BaseException) -> str:
    """A user-facing sentence: our ValueError/TypeError messages already name problem and fix."""
    if isinstance(exc, (ValueError, TypeError, FileNotFoundError)):
        return str(exc) or type(exc).__name__
    text = str(exc).strip() or "no details"
    if "out of memory" in text.lower():
        text += " — try a smaller tile size (Advanced) or the CPU device"
    return f"{type(exc).__name__}: {text}"


def _relay(gen: Iterator[Any], label: str, offset: int, remaining: int) -> Generator:
    """Forward an engine generator's (done, total) as overall `Progress`.

    Returns ``(return value, this stage's total, last overall total)``. The ``remaining`` stages
    are assumed to be as long as this one until they start and say otherwise.
    """
    total = overall = 0
    while True:
        try:
            done, total = next(gen)
        except StopIteration as stop:
            return stop.value, int(total), overall
        overall = offset + int(total) * (1 + remaining)
        yield Progress(label, offset + int(done), overall)


def get_predictor(
    cache: dict,
    model: Any,
    steps: int | None,
    device: str,
    texture: bool = False,
    guidance: float | None = None,
) -> Any:
    """Load (or reuse) a predictor; an already-loaded Predictor object is used as is, or as a
    copy that follows ``texture`` (`engine.with_texture`) and ``guidance``
    (`engine.with_guidance`; None: as it is).

    ``texture`` and ``guidance`` are part of the cache key: changing either gives another
    predictor object, and a cached one is never changed."""
    from napari_lcm_stain._params import guidance_number

    guidance = guidance_number(guidance)
    if not isinstance(model, str):
        from napari_lcm_stain.engine import with_guidance, with_texture

        model = with_texture(model, texture)
        return model if guidance is None else with_guidance(model, guidance)
    key = (model, steps, device, bool(texture), guidance)
    if key not in cache:
        from napari_lcm_stain.engine import get_predictor as load

        cache[key] = load(
            model, steps=steps, device=device, texture=bool(texture), guidance=guidance
        )
    return cache[key]


def checkpoint_identity(model: Any, cache: dict) -> tuple[str | None, str | None]:
    """(checkpoint file, its SHA-256) of a model; (None, None) for an in-memory model."""
    from napari_lcm_stain import checkpoints

    if isinstance(model, str) and model.lower() in checkpoints.PACKAGED:
        path = checkpoints.packaged_path(model.lower())
        return path.name, checkpoints.packaged_hashes().get(path.name)
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        key = ("sha256", str(path.resolve()))
        if key not in cache and path.is_file():
            cache[key] = checkpoints.sha256(path)
        return str(path), cache.get(key)
    return None, None  # e.g. a fine-tuned model not saved yet


def provenance(info: dict, model: Any, source: str, kind: str, cache: dict) -> dict:
    """Model, checkpoint and hash, steps, seed, pixel size, version: stored with the layer and
    written into OME metadata by the plugin's writer."""
    from napari_lcm_stain.io import _provenance

    prov = json.loads(_provenance(info, source, kind, int(info.get("samples") or 1)))
    prov["checkpoint"], prov["checkpoint_sha256"] = checkpoint_identity(model, cache)
    return prov


def _planes(a: np.ndarray) -> Iterator[tuple[int, ...]]:
    yield from np.ndindex(*a.shape[:-2]) if a.ndim > 2 else iter([()])


def stain_job(
    image: Any,
    jobs: list[StainJob],
    *,
    tile: int,
    overlap: int,
    device: str,
    seed: int,
    pixel_size: float | None,
    truth: Any,
    truth_labels: Any,
    cache: dict,
    source: str = "",
    pixel_size_source: str = "pixel_size",
    texture: bool = False,
) -> Generator[Progress, None, StainOutcome | JobFailure]:
    """Stain ``image`` with each job's model; with ``truth``, score each output against it.

    ``texture``: True draws a texture decoder's grain (default: the smooth mean)."""
    try:
        from napari_lcm_stain.engine import iter_stain

        t0 = time.perf_counter()
        out = StainOutcome()
        offset = overall = 0
        for i, job in enumerate(jobs):
            name = f"{job.label}" + (f" ×{job.samples}" if job.samples > 1 else "")
            yield Progress(f"loading {job.label}", offset, overall)
            predictor = get_predictor(cache, job.model, job.steps, device, texture, job.guidance)
            gen = iter_stain(
                image,
                model=predictor,
                steps=job.steps,
                tile=tile,
                overlap=overlap,
                device=device,
                seed=seed,
                pixel_size=pixel_size,
                samples=job.samples,
                pixel_size_source=pixel_size_source,
                texture=texture,
                guidance=job.guidance,
            )
            result, total, overall = yield from _relay(gen, name, offset, len(jobs) - 1 - i)
            offset += total
            mean = np.asarray(result.mean, dtype=np.float32)
            out.outputs.append((job.role, job.label, mean))
            info = getattr(result, "info", None)
            if isinstance(info, dict):
                out.provenance[(job.role, job.label)] = provenance(
                    info, job.model, source, "mean", cache
                )
            if job.samples > 1 and result.std is not None:
                out.outputs.append(("uncertainty", job.label, np.asarray(result.std, np.float32)))
                if isinstance(info, dict):
                    out.provenance[("uncertainty", job.label)] = provenance(
                        info, job.model, source, "std", cache
                    )
            for note in info.get("warnings", []) if isinstance(info, dict) else []:
                if note not in out.notes:
                    out.notes.append(str(note))
            ood = info.get("ood") if isinstance(info, dict) else None
            if out.ood is None and ood and ood.get("flag"):
                out.ood = ood
            if isinstance(info, dict) and info.get("pixel_size_estimated"):
                out.pixel_size_estimated = float(info["pixel_size_estimated"])
            dev = getattr(predictor, "device", None)
            if dev is not None and str(dev) not in out.devices:
                out.devices.append(str(dev))
            if truth is not None:
                ps = (info.get("pixel_size") if isinstance(info, dict) else None) or (
                    None if pixel_size == "auto" else pixel_size
                )
                ps = ps or getattr(predictor, "pixel_size", None)
                try:  # a bad ground truth must not cost the user their stained layers
                    out.metrics[job.label] = yield from _score(
                        mean, truth, truth_labels, ps, job.label, offset, overall
                    )
                except Exception as exc:  # noqa: BLE001
                    out.notes.append(f"metrics for {job.label} skipped: {failure_message(exc)}")
        out.seconds = time.perf_counter() - t0
        return out
    except Exception as exc:  # noqa: BLE001 - every failure must become a message, see module doc
        logger.exception("staining failed")
        return JobFailure(failure_message(exc))


def _score(
    pred: np.ndarray,
    truth: Any,
    labels: Any,
    pixel_size: float | None,
    label: str,
    offset: int,
    overall: int,
) -> Generator[Progress, None, dict[str, float]]:
    """Mean of per-plane `image_metrics` (nuclei matched against ``labels`` or segmented truth)."""
    from napari_lcm_stain.metrics import image_metrics, segment_nuclei

    planes = list(_planes(pred))
    sums: dict[str, float] = {}
    for idx in planes:
        yield Progress(f"scoring {label}", offset, overall)
        p, t = pred[idx], np.asarray(truth[idx], dtype=np.float32)
        if labels is not None:
            true_labels = np.asarray(labels[idx])
        elif pixel_size:
            true_labels = segment_nuclei(t, pixel_size)
        else:
            true_labels = None
        m = image_metrics(p, t, true_labels=true_labels, pixel_size=pixel_size)
        for key in METRIC_KEYS:
            if key in m:
                sums[key] = sums.get(key, 0.0) + float(m[key])
    return {key: v / len(planes) for key, v in sums.items()}


@dataclass(frozen=True)
class FinetuneTick:
    """One training step as the Fine-tune dock shows it (metrics: key -> finite value or None)."""

    step: int
    total: int
    train_loss: float | None
    val_loss: float | None
    val_metrics: dict[str, float | None] | None = None  # set on validation steps only
    best_step: int = 0  # the step whose weights are kept so far (0: the starting model)
    best_metrics: dict[str, float | None] | None = None
    metrics_before: dict[str, float | None] | None = None


def finetune_job(
    qobm: Any,
    dapi: Any,
    *,
    stop: Any,
    data: Any = None,
    **kwargs: Any,
) -> Generator[FinetuneTick, None, Any]:
    """Relay `finetune.iter_finetune` events; return its FinetuneResult (best weights on Stop).

    ``qobm``/``dapi``: one pair of arrays, or two lists paired in order (with ``names``); or
    ``data``, a folder read here with `finetune.read_folder` (then ``qobm``/``dapi`` are None)."""
    try:
        from napari_lcm_stain import finetune

        if data is not None:
            kwargs["names"], qobm, dapi = finetune.read_folder(data)
        elif isinstance(qobm, (list, tuple)):  # lazy layers are read here, not on the UI thread
            qobm, dapi = [np.asarray(a) for a in qobm], [np.asarray(a) for a in dapi]
        else:
            qobm, dapi = np.asarray(qobm), np.asarray(dapi)
        val = kwargs.get("val")
        if val is not None:
            kwargs["val"] = (np.asarray(val[0]), np.asarray(val[1]))
        gen = finetune.iter_finetune(qobm, dapi, stop=stop, **kwargs)
        while True:
            try:
                ev = next(gen)
            except StopIteration as done:
                return done.value
            yield FinetuneTick(
                int(ev.step),
                int(ev.total),
                _finite(ev.train_loss),
                _finite(ev.val_loss),
                _finite_metrics(getattr(ev, "val_metrics", None)),
                int(getattr(ev, "best_step", 0) or 0),
                _finite_metrics(getattr(ev, "best_metrics", None)),
                _finite_metrics(getattr(ev, "metrics_before", None)),
            )
    except Exception as exc:  # noqa: BLE001 - see module doc
        logger.exception("fine-tuning failed")
        return JobFailure(failure_message(exc))


def _finite_metrics(m: Any) -> dict[str, float | None] | None:
    return None if m is None else {str(k): _finite(v) for k, v in dict(m).items()}


def _finite(v: Any) -> float | None:
    if v is None:
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


# ----------------------------------------------------------------------------- live staining


@dataclass(frozen=True)
class LiveFrame:
    """A frame to stain: its key (frame index, revision), pixels, and when it arrived."""

    key: tuple[int, int]
    data: Any
    arrived: float


@dataclass(frozen=True)
class LiveResult:
    frame: LiveFrame
    dapi: np.ndarray
    seconds: float  # staining only
    provenance: dict


class LatestFrame:
    """A one-slot mailbox between the UI and the live worker: the newest frame wins.

    `put` replaces a frame the worker has not taken yet (that frame counts as skipped); `take`
    waits for a frame. So a worker that falls behind always jumps to the newest frame.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._frame: LiveFrame | None = None
        self.skipped = 0

    def put(self, frame: LiveFrame) -> None:
        with self._cond:
            if self._frame is not None:
                self.skipped += 1
            self._frame = frame
            self._cond.notify_all()

    def take(self, timeout: float) -> LiveFrame | None:
        with self._cond:
            if self._frame is None:
                self._cond.wait(timeout)
            frame, self._frame = self._frame, None
            return frame


def live_job(
    mailbox: LatestFrame,
    stop: threading.Event,
    *,
    model: Any,
    steps: int | None,
    tile: int,
    overlap: int,
    device: str,
    seed: int,
    pixel_size: float | None,
    cache: dict,
    source: str = "",
    pixel_size_source: str = "pixel_size",
    texture: bool = False,
    guidance: float | None = None,
) -> Generator[LiveResult, None, JobFailure | None]:
    """Stain each frame the mailbox hands over with the core engine, until ``stop`` is set."""
    try:
        from napari_lcm_stain._drain import drain
        from napari_lcm_stain.engine import iter_stain

        predictor = get_predictor(cache, model, steps, device, texture, guidance)
        while not stop.is_set():
            frame = mailbox.take(timeout=0.05)
            if frame is None:
                continue
            t0 = time.perf_counter()
            result = drain(
                iter_stain(
                    frame.data, predictor, steps, tile, overlap, device, seed, pixel_size,
                    pixel_size_source=pixel_size_source, texture=texture, guidance=guidance,
                )
            )  # fmt: skip
            prov = provenance(result.info, model, source, "mean", cache)
            prov["frame"] = list(frame.key)
            yield LiveResult(
                frame, np.asarray(result.mean, np.float32), time.perf_counter() - t0, prov
            )
        return None
    except Exception as exc:  # noqa: BLE001 - see module doc
        logger.exception("live staining failed")
        return JobFailure(failure_message(exc))


def watch_job(
    folder: Any, output: Any, stop: threading.Event, *, model: Any, cache: dict, **kwargs: Any
) -> Generator[str | tuple[Any, list], None, Any]:
    """`watch.watch_folder` in the background: yields its log lines and (input, outputs) pairs,
    returns its WatchReport (or a JobFailure) once ``stop`` is set."""
    import queue

    events: queue.Queue = queue.Queue()
    result: dict[str, Any] = {}

    def run() -> None:
        from napari_lcm_stain.watch import watch_folder

        started = time.time()  # files landing while the model loads are stained too
        try:
            steps, device = kwargs.get("steps"), kwargs.get("device")
            texture, guidance = kwargs.get("texture", False), kwargs.get("guidance")
            predictor = get_predictor(cache, model, steps, device, texture, guidance)
            result["report"] = watch_folder(
                folder, output, model=predictor, stop=stop, log=events.put,
                on_written=lambda src, outs: events.put((src, outs)),
                **{"since": started, **kwargs},
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - see module doc
            logger.exception("watching a folder failed")
            result["failure"] = JobFailure(failure_message(exc))

    thread = threading.Thread(target=run, name="lcm-stain watch", daemon=True)
    thread.start()
    while thread.is_alive() or not events.empty():
        try:
            yield events.get(timeout=0.1)
        except queue.Empty:
            continue
    return result.get("failure") or result.get("report")
