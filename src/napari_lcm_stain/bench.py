"""`lcm-stain bench`: latency, throughput, FLOPs and peak memory of the stain models, in one run.

All models stain the same image through the same tiled engine (`engine.stain`), so the ratios
compare models, not code paths. The FLOP count, set against the CPU's measured matmul rate, tells
roughly how well the engine uses the hardware (a reference, not a ceiling: see MATMUL_NOTE); the
streamed big-image run measures the CLI's peak RSS in a
child process (what a user's machine would see).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from ._drain import drain
from ._version import __version__

#: (packaged model, steps) per benchmark entry
MODELS = {
    "lcm-1": ("lcm", 1),
    "lcm-4": ("lcm", 4),
    "teacher-50": ("teacher", 50),
    "pix2pix": ("pix2pix", None),
}
#: The big-image memory run is repeated at this many times the model's pixel size: the image is
#: rescaled to (factor × size)² px and back, streamed tile by tile (docs/engine.md, Memory).
BIG_RESCALE = 2.0
#: Slow models get fewer timed repeats (the median of 1 is the value).
MAX_REPEATS = {"teacher-50": 1}
#: Printed under the matmul probe (and in docs/model-card.md): why "% of matmul" can pass 100 %.
MATMUL_NOTE = (
    "the matmul rate is a reference, not a limit: achieved GFLOP/s counts the FLOPs of a direct "
    "convolution, which the CPU kernels may compute with fewer operations, and the probe runs "
    "slower on a busy machine, so a model can exceed 100 % of it"
)


def bench_image(size: int, seed: int = 0) -> np.ndarray:
    """A deterministic phase-like test field (smooth blobs + noise), float32 rad."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    img = np.zeros((size, size), np.float32)
    n = max(1, size * size // 900)
    img[rng.integers(0, size, n), rng.integers(0, size, n)] = rng.uniform(0.5, 2.0, n)
    img = ndimage.gaussian_filter(img, 4.0) * 40 - 0.2
    img += rng.normal(0, 0.02, img.shape).astype(np.float32)
    return img.astype(np.float32)


def cpu_matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` float32 torch.mm rate on this machine (GFLOP/s, 2n³ per product)."""
    import torch

    a = torch.randn(n, n)
    b = torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def cuda_matmul_tflops(device, n: int = 8192, repeats: int = 10) -> float:
    """Best-of-`repeats` bfloat16 torch.mm rate on a CUDA device (TFLOP/s, 2n³ per product):
    the card's measured tensor-core limit that the models' achieved rate is compared with."""
    import torch

    from .device import synchronize

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    torch.mm(a, b)
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.mm(a, b)
        end.record()
        synchronize(device)
        best = min(best, start.elapsed_time(end) / 1000.0)
    return 2.0 * n**3 / best / 1e12


def tile_gflop(predictor, tile: int) -> tuple[float, int]:
    """GFLOP (conv, linear, matmul; 2 per MAC) of one predictor call on one tile, and its side."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .tiling import make_noise_canvas

    t = max(predictor.multiple, (tile // predictor.multiple) * predictor.multiple)
    x = torch.zeros(1, 1, t, t)
    noise = make_noise_canvas(predictor, (t, t), 0)
    noise = None if noise is None else noise[None]
    with FlopCounterMode(display=False) as fc:
        predictor(x, noise)
    return fc.get_total_flops() / 1e9, t


def _write_big_tiff(path: Path, size: int) -> None:
    """A size² float32 OME-TIFF written block by block (this process never holds it whole)."""
    import tifffile

    block = bench_image(min(size, 1024), seed=1)
    out = tifffile.memmap(path, shape=(size, size), dtype=np.float32, ome=True)
    b = block.shape[0]
    for y in range(0, size, b):
        for x in range(0, size, b):
            h, w = min(b, size - y), min(b, size - x)
            out[y : y + h, x : x + w] = block[:h, :w]
    out.flush()
    del out


def big_stain_rss(
    size: int,
    device: str = "auto",
    tile: int = 512,
    overlap: int = 32,
    model: str = "lcm",
    pixel_size: float | None = None,
) -> dict:
    """Run `lcm-stain stain` on a generated size² image in a child; its peak RSS (MB) and time.
    `pixel_size` (µm/px) other than the model's makes the child rescale it (streamed)."""
    with tempfile.TemporaryDirectory(prefix="lcm-bench-") as d:
        src, dst = Path(d) / "big.ome.tif", Path(d) / "big_dapi.ome.tif"
        _write_big_tiff(src, size)
        cmd = [sys.executable, "-m", "napari_lcm_stain.cli", "stain", str(src), "-o", str(dst)]
        cmd += ["--model", str(model), "--device", device]
        cmd += ["--tile", str(tile), "--overlap", str(overlap)]
        if pixel_size is not None:
            cmd += ["--pixel-size", f"{pixel_size:g}"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"big-image stain failed ({proc.returncode}): {proc.stderr[-2000:]}")
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if peak_kb <= before:  # an earlier child was bigger: the max is not this run's
            peak_kb = before
        return {
            "peak_rss_mb": peak_kb / 1024.0,
            "seconds": seconds,
            "mp_per_s": size * size / 1e6 / seconds,
            "command": " ".join(["lcm-stain"] + cmd[3:]),
        }


def _packaged_pixel_size(name: str) -> float:
    """µm/px a packaged model was trained at (its config; no weights loaded)."""
    from .checkpoints import config_path, packaged_path

    return float(json.loads(config_path(packaged_path(name)).read_text())["pixel_size"])


def _load(name: str, device: str, precision: str = "auto", compile: bool = False):
    from .sampling import load_predictor

    model, steps = MODELS[name]
    return load_predictor(model, steps, device, precision=precision, compile=compile)


def run_bench(
    json_path=None,
    size: int = 2048,
    repeats: int = 3,
    big: int = 8192,
    device: str = "auto",
    predictors: dict | None = None,
    tile: int = 1024,
    overlap: int = 32,
    quiet: bool = False,
    matmul_n: int = 2048,
    precision: str = "auto",
    compile: bool = False,
    big_rescale: float = BIG_RESCALE,
    models: list[str] | None = None,
) -> dict:
    """Benchmark the models on one size² image; optional streamed big² CLI run for peak RSS,
    and the same image given `big_rescale` times the LCM's pixel size (0 skips that run).

    `predictors` (name -> loaded Predictor) replaces the packaged models (tests use fakes);
    `models` picks some of `MODELS` (e.g. ["lcm-1"] for a quick thread-policy comparison).
    On CUDA every timing is bracketed by `torch.cuda.synchronize`, the reference is the card's
    measured bf16 matmul rate, and each model's peak GPU memory is recorded.
    """
    import torch

    from .device import resolve_device, synchronize
    from .engine import stain as engine_stain
    from .tiling import make_grid

    def stain(*args, **kwargs):
        """`engine.stain` without its out-of-distribution warning: the bench field is synthetic
        blobs (`bench_image`), not phase, and is scored as such on every call; the score is
        still computed, so its cost stays in the timings."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="input does not look like the qOBM phase")
            return engine_stain(*args, **kwargs)

    dev = resolve_device(device)
    cuda = dev.type == "cuda"

    if size < 1 or repeats < 1 or big < 0:
        raise ValueError("size and repeats must be >= 1 and big >= 0 (0 skips the memory run)")
    unknown = sorted(set(models or ()) - set(MODELS))
    if unknown:
        raise ValueError(
            f"unknown bench model(s) {', '.join(unknown)}: choose from {', '.join(MODELS)}"
        )
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    img = bench_image(size)
    mp = size * size / 1e6
    # the reference rate: on CUDA the card's bf16 tensor-core matmul; on the CPU a float32 matmul
    # probed before and after the models (load from other processes only ever slows a probe)
    if cuda:
        probes = [1000.0 * cuda_matmul_tflops(dev)]
    else:
        probes = [cpu_matmul_gflops(matmul_n)]
    names = list(predictors) if predictors is not None else list(models or MODELS)
    models: dict[str, dict] = {}
    dev_name = None
    loaded = {}
    for name in names:
        pred = (
            predictors[name]
            if predictors is not None
            else _load(name, str(dev), precision, compile)
        )
        dev_name = dev_name or str(getattr(pred, "device", device))
        stain(img, pred, tile=tile, overlap=overlap)  # warm-up: the timed shapes and canvas
        loaded[name] = pred
    # Timed in rounds, each model once per round: a slow spell of a shared machine then costs
    # every model alike instead of whichever was timed during it (the ratios are the result).
    times: dict[str, list[float]] = {name: [] for name in names}
    peak_gpu: dict[str, float | None] = {}
    for r in range(repeats):
        for name in names:
            if len(times[name]) >= min(repeats, MAX_REPEATS.get(name, repeats)):
                continue
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)
            synchronize(dev)
            t0 = time.perf_counter()
            stain(img, loaded[name], tile=tile, overlap=overlap, seed=r)
            synchronize(dev)
            times[name].append(time.perf_counter() - t0)
            if cuda:
                peak_gpu[name] = max(
                    peak_gpu.get(name) or 0.0, torch.cuda.max_memory_allocated(dev) / 2**20
                )
    for name in names:
        pred = loaded[name]
        grid = make_grid((size, size), pred.multiple, tile, overlap)
        th, tw = grid.tile
        processed_mp = grid.n_tiles * th * tw / 1e6
        n_rep = len(times[name])
        med = statistics.median(times[name])
        gflop, t_side = tile_gflop(pred, tile)
        gflop_per_mp = gflop / (t_side * t_side / 1e6)
        achieved = gflop_per_mp * processed_mp / med
        models[name] = {
            "ms_per_mp": 1000.0 * med / mp,
            "mp_per_s": mp / med,
            "gflop_per_mp": gflop_per_mp,
            "seconds": med,
            "times": times[name],
            "repeats": n_rep,
            "overlap_factor": processed_mp / mp,
            "achieved_gflops": achieved,
            "frames_per_s": 1.0 / med,
            "peak_gpu_mb": peak_gpu.get(name),
        }
        say(
            f"{name:>11}: {med * 1000 / mp:9.1f} ms/MP  {mp / med:7.3f} MP/s  "
            f"{gflop_per_mp:8.1f} GFLOP/MP  {achieved:6.1f} GFLOP/s  [{n_rep}x, median {med:.2f} s]"
        )
    if cuda:
        matmul = probes[0]
        say(f"{torch.cuda.get_device_name(dev)} bf16 matmul reference: {matmul / 1000:.1f} TFLOP/s")
    else:
        probes.append(cpu_matmul_gflops(matmul_n))
        matmul = max(probes)
        threads = torch.get_num_threads()
        say(f"CPU float32 matmul reference: {matmul:.1f} GFLOP/s ({threads} threads)")
        say(f"  ({MATMUL_NOTE})")
    for m in models.values():
        m["fraction_of_matmul"] = m["achieved_gflops"] / matmul
    shares = ", ".join(f"{n} {100 * m['fraction_of_matmul']:.1f} %" for n, m in models.items())
    say(f"achieved GFLOP/s as % of the matmul reference: {shares}")

    def ratio(a, b):
        if a in models and b in models:
            return models[a]["ms_per_mp"] / models[b]["ms_per_mp"]
        return None

    ratios = {
        "lcm-1/pix2pix": ratio("lcm-1", "pix2pix"),
        "teacher-50/lcm-1": ratio("teacher-50", "lcm-1"),
        "lcm-4/lcm-1": ratio("lcm-4", "lcm-1"),
    }
    for k, v in ratios.items():
        if v is not None:
            say(f"latency ratio {k}: {v:.2f}")
    big_res = None
    if big:
        say(f"streamed CLI stain of a {big}x{big} float32 image (child process) ...")
        big_res = big_stain_rss(big, device, tile, overlap)
        say(
            f"peak RSS {big_res['peak_rss_mb']:.0f} MB, {big_res['seconds']:.1f} s "
            f"({big_res['mp_per_s']:.2f} MP/s end to end incl. read/write)"
        )
    rescaled = None
    if big and big_rescale:
        px = big_rescale * _packaged_pixel_size("lcm")
        side = round(big * big_rescale)
        say(f"the same image at {px:g} µm/px (rescaled to {side}x{side} px and back) ...")
        rescaled = big_stain_rss(big, device, tile, overlap, pixel_size=px)
        rescaled.update(size=big, pixel_size=px, rescale=big_rescale)
        say(f"peak RSS {rescaled['peak_rss_mb']:.0f} MB, {rescaled['seconds']:.1f} s")
    result = {
        "models": models,
        "ratios": ratios,
        "cpu_matmul_gflops": None if cuda else matmul,
        "cpu_matmul_probes_gflops": None if cuda else probes,
        "cuda_bf16_matmul_tflops": matmul / 1000 if cuda else None,
        "matmul_note": MATMUL_NOTE,
        "precision": precision,
        "compile": compile,
        "peak_rss_mb": None if big_res is None else big_res["peak_rss_mb"],
        "big": {"size": big, **big_res} if big_res else None,
        "rescaled": rescaled,
        "size": size,
        "tile": tile,
        "overlap": overlap,
        "device": dev_name,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "version": __version__,
    }
    if json_path:
        _write_json(json_path, result)
        say(f"wrote {json_path}")
    return result


# ----------------------------------------------------------------------------- uncertainty


def uncertainty_by_region(
    model="lcm",
    samples: int = 8,
    n: int = 4,
    size: int = 512,
    preset: str = "brain-20x",
    seed: int = 20_000,
    device: str = "auto",
    json_path=None,
    quiet: bool = False,
) -> dict:
    """Where does the K-sample std of the 1-step model light up? Mean std per region type.

    On simulated fields (seeds `seed…seed+n−1`, away from the training seeds) with known labels:
    background, clear nuclei, low-contrast nuclei (|CNR| < 1), nuclei mostly outside the optical
    section, and distractors with a ring of `metrics.DISTRACTOR_RADIUS_UM`. Also the pixelwise
    Pearson r between std and the absolute error of the mean: does the std point at mistakes?
    """
    from scipy import ndimage

    from . import metrics
    from .engine import get_predictor, iter_stain
    from .simulate import simulate_pair

    pred = get_predictor(model, None, device)
    regions = ("background", "clear_nuclei", "low_contrast_nuclei", "out_of_section_nuclei",
               "near_distractors")  # fmt: skip
    sums = {r: [0.0, 0] for r in regions}
    err_sums = {r: [0.0, 0] for r in regions}
    std_all, err_all = [], []
    for i in range(n):
        sim = simulate_pair(preset, size=size, seed=seed + i)
        gen = iter_stain(sim.qobm, pred, samples=samples, seed=0, pixel_size=sim.pixel_size)
        res = drain(gen)
        err = np.abs(res.mean - sim.dapi)
        lab = sim.nuclei
        cnr = np.concatenate([[np.inf], np.abs(np.asarray(sim.nucleus_cnr, float))])
        ins = np.concatenate([[1.0], np.asarray(sim.nucleus_in_section, float)])
        ring = max(1, int(round(metrics.DISTRACTOR_RADIUS_UM / sim.pixel_size)))
        near_d = ndimage.binary_dilation(sim.distractors > 0, iterations=ring) & (lab == 0)
        masks = {
            "background": (lab == 0) & ~near_d,
            "clear_nuclei": (lab > 0) & (cnr[lab] >= metrics.HARD_CNR_THRESHOLD)
            & (ins[lab] >= metrics.HARD_IN_SECTION_THRESHOLD),
            "low_contrast_nuclei": (lab > 0) & (cnr[lab] < metrics.HARD_CNR_THRESHOLD),
            "out_of_section_nuclei": (lab > 0) & (ins[lab] < metrics.HARD_IN_SECTION_THRESHOLD),
            "near_distractors": near_d,
        }  # fmt: skip
        for r, m in masks.items():
            sums[r][0] += float(res.std[m].sum())
            sums[r][1] += int(m.sum())
            err_sums[r][0] += float(err[m].sum())
            err_sums[r][1] += int(m.sum())
        std_all.append(res.std.ravel())
        err_all.append(err.ravel())
    std_all, err_all = np.concatenate(std_all), np.concatenate(err_all)
    out = {
        "model": getattr(pred, "name", str(model)),
        "samples": samples,
        "fields": n,
        "size": size,
        "preset": preset,
        "seeds": [seed, seed + n - 1],
        "mean_std": {r: (s / c if c else None) for r, (s, c) in sums.items()},
        "mean_abs_error": {r: (s / c if c else None) for r, (s, c) in err_sums.items()},
        "pixels": {r: c for r, (_s, c) in sums.items()},
        "pearson_std_vs_abs_error": float(np.corrcoef(std_all, err_all)[0, 1])
        if std_all.std() > 0
        else None,
    }
    if not quiet:
        print(f"uncertainty of {out['model']} ({samples} samples, {n} {preset} fields {size}²)")
        for r in regions:
            s, e = out["mean_std"][r], out["mean_abs_error"][r]
            if s is not None:
                print(
                    f"  {r:>22}: mean std {s:.4f}   mean |error| {e:.4f}   ({out['pixels'][r]} px)"
                )
        print(f"  pixelwise Pearson(std, |error|) = {out['pearson_std_vs_abs_error']}")
    if json_path:
        _write_json(json_path, out)
    return out


def seams_report(
    model="lcm",
    size: int = 1024,
    tile: int = 256,
    overlap: int = 32,
    contexts=(0, 32, 64, 96, 128),
    preset: str = "brain-20x",
    seed: int = 20_100,
    device: str = "auto",
    json_path=None,
    quiet: bool = False,
) -> dict:
    """Tiled vs whole-image prediction of one simulated size² field, per context margin.

    Reports max/mean |tiled − whole| and the work overhead (processed px / image px) for each
    context, and `tiling.measure_context` at three tolerances: the numbers behind the model's
    `receptive_field` setting and the seam criterion (max diff <= 0.01 at tile 256, overlap 32).
    """
    from . import tiling
    from .engine import get_predictor
    from .simulate import simulate_pair

    pred = get_predictor(model, None, device)
    x = pred.normalize(simulate_pair(preset, size=size, seed=seed).qobm)
    full = tiling.make_grid(x.shape, pred.multiple, size, overlap)
    noise = tiling.make_noise_canvas(pred, full.padded, 0)
    whole = tiling.predict_tiled(x, pred, size, overlap, noise, clip=(0.0, 1.0))
    rows = []
    for c in contexts:
        g = tiling.make_grid(x.shape, pred.multiple, tile, overlap, int(c))
        y = tiling.predict_tiled(x, pred, tile, overlap, noise, clip=(0.0, 1.0), context=int(c))
        d = np.abs(y - whole)
        work = g.n_tiles * g.tile[0] * g.tile[1] / (size * size)
        rows.append({"context": int(c), "max_abs_diff": float(d.max()),
                     "mean_abs_diff": float(d.mean()), "tile_px": list(g.tile),
                     "tiles": g.n_tiles, "work_overhead": work})  # fmt: skip
    measured = {str(t): tiling.measure_context(pred, x, tol=t) for t in (0.01, 0.005, 0.002)}
    out = {
        "model": getattr(pred, "name", str(model)),
        "size": size, "tile": tile, "overlap": overlap, "preset": preset, "seed": seed,
        "model_context": tiling.model_context(pred),
        "rows": rows,
        "measured_context_px": measured,
    }  # fmt: skip
    if not quiet:
        print(f"seams of {out['model']}: {size}² {preset} field, tile {tile}, overlap {overlap}; "
              f"engine context (receptive_field/2) = {out['model_context']} px")  # fmt: skip
        for r in rows:
            print(f"  context {r['context']:4d}: max |tiled-whole| {r['max_abs_diff']:.4f}  mean "
                  f"{r['mean_abs_diff']:.5f}  tiles {r['tiles']} of {r['tile_px'][0]} px  "
                  f"work x{r['work_overhead']:.2f}")  # fmt: skip
        print(f"  measure_context: {measured} (tolerance: px)")
    if json_path:
        _write_json(json_path, out)
    return out


def _write_json(path, data) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, p)


def main(argv=None) -> int:
    """`python -m napari_lcm_stain.bench uncertainty [--json PATH]` (speed: `lcm-stain bench`)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m napari_lcm_stain.bench")
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("uncertainty", help="mean K-sample std per region on simulated fields")
    u.add_argument("--model", default="lcm")
    u.add_argument("--samples", type=int, default=8)
    u.add_argument("--n", type=int, default=4)
    u.add_argument("--size", type=int, default=512)
    u.add_argument("--preset", default="brain-20x")
    u.add_argument("--seed", type=int, default=20_000)
    u.add_argument("--device", default="auto")
    u.add_argument("--json", default=None)
    sm = sub.add_parser("seams", help="tiled vs whole-image difference per context margin")
    sm.add_argument("--model", default="lcm")
    sm.add_argument("--size", type=int, default=1024)
    sm.add_argument("--tile", type=int, default=256)
    sm.add_argument("--overlap", type=int, default=32)
    sm.add_argument("--device", default="auto")
    sm.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.cmd == "uncertainty":
        uncertainty_by_region(a.model, a.samples, a.n, a.size, a.preset, a.seed, a.device, a.json)
    else:
        seams_report(a.model, a.size, a.tile, a.overlap, device=a.device, json_path=a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
