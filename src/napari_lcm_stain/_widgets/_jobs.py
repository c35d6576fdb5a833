"""The work the docks hand to napari's ``thread_worker``: plain generators with no Qt or viewer.

They get arrays and settings, yield progress, and *return* either a result or a `JobFailure`
(never raise): superqt's GeneratorWorker turns a ``RuntimeError`` raised inside a generator
(e.g. torch's out-of-memory error) into a silent warning, so catching everything here is the only
way every failure reaches the user as a message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

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
    """One model to run: output role, model label, what `load_predictor` gets, steps, samples."""

    role: str
    label: str
    model: Any
    steps: int | None
    samples: int = 1


@dataclass
class StainOutcome:
    outputs: list[tuple[str, str, np.ndarray]] = field(default_factory=list)  # (role, label, data)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> metric -> value
    devices: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # engine remarks (e.g. rescaled pixel size)
    ood: dict | None = None  # the engine's out-of-distribution result, when it flagged the input
    seconds: float = 0.0


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


def get_predictor(cache: dict, model: Any, steps: int | None, device: str) -> Any:
    """Load (or reuse) a predictor; an already-loaded Predictor object is used as is."""
    if not isinstance(model, str):
        return model
    key = (model, steps, device)
    if key not in cache:
        from napari_lcm_stain.engine import get_predictor as load

        cache[key] = load(model, steps=steps, device=device)
    return cache[key]


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
) -> Generator[Progress, None, StainOutcome | JobFailure]:
    """Stain ``image`` with each job's model; with ``truth``, score each output against it."""
    try:
        from napari_lcm_stain.engine import iter_stain

        t0 = time.perf_counter()
        out = StainOutcome()
        offset = overall = 0
        for i, job in enumerate(jobs):
            name = f"{job.label}" + (f" ×{job.samples}" if job.samples > 1 else "")
            yield Progress(f"loading {job.label}", offset, overall)
            predictor = get_predictor(cache, job.model, job.steps, device)
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
            )
            result, total, overall = yield from _relay(gen, name, offset, len(jobs) - 1 - i)
            offset += total
            mean = np.asarray(result.mean, dtype=np.float32)
            out.outputs.append((job.role, job.label, mean))
            if job.samples > 1 and result.std is not None:
                out.outputs.append(("uncertainty", job.label, np.asarray(result.std, np.float32)))
            info = getattr(result, "info", None)
            for note in info.get("warnings", []) if isinstance(info, dict) else []:
                if note not in out.notes:
                    out.notes.append(str(note))
            ood = info.get("ood") if isinstance(info, dict) else None
            if out.ood is None and ood and ood.get("flag"):
                out.ood = ood
            dev = getattr(predictor, "device", None)
            if dev is not None and str(dev) not in out.devices:
                out.devices.append(str(dev))
            if truth is not None:
                ps = pixel_size or getattr(predictor, "pixel_size", None)
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
    step: int
    total: int
    train_loss: float | None
    val_loss: float | None


def finetune_job(
    qobm: np.ndarray,
    dapi: np.ndarray,
    *,
    stop: Any,
    **kwargs: Any,
) -> Generator[FinetuneTick, None, Any]:
    """Relay `finetune.iter_finetune` events; return its FinetuneResult (best weights on Stop)."""
    try:
        from napari_lcm_stain.finetune import iter_finetune

        val = kwargs.get("val")
        if val is not None:
            kwargs["val"] = (np.asarray(val[0]), np.asarray(val[1]))
        gen = iter_finetune(np.asarray(qobm), np.asarray(dapi), stop=stop, **kwargs)
        while True:
            try:
                ev = next(gen)
            except StopIteration as done:
                return done.value
            yield FinetuneTick(
                int(ev.step), int(ev.total), _finite(ev.train_loss), _finite(ev.val_loss)
            )
    except Exception as exc:  # noqa: BLE001 - see module doc
        logger.exception("fine-tuning failed")
        return JobFailure(failure_message(exc))


def _finite(v: Any) -> float | None:
    if v is None:
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None
