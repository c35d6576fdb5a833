"""`lcm-stain` command line: argument parsing only; every subcommand is one call into the core.

Heavy imports (torch, diffusers, napari) happen inside the handlers so `lcm-stain --help` is instant.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from ._version import __version__


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2, no traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, timeout, batch schedulers): cleaned up like Ctrl-C, exit code 143."""


def _on_sigterm(signum, frame):
    raise Terminated


#: What `simulate.write_dataset` writes for pair i: f"{i:03d}_{name}" (a test keeps them in step).
SIM_FILES = ("qobm.ome.tif", "dapi.ome.tif", "nuclei.ome.tif", "distractors.ome.tif", "meta.json")


def _refuse_existing(paths, flag: str) -> None:
    """`--overwrite` is needed to replace files a command would write (as `stain` does)."""
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing:
        shown = ", ".join(existing[:3]) + (
            f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        )
        raise FileExistsError(
            f"{shown} exist{'s' if len(existing) == 1 else ''}: pass --overwrite to replace, "
            f"or choose another {flag}"
        )


def _cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(a.out), device=a.device, overwrite=a.overwrite)
    return 0


def _cmd_simulate(a: argparse.Namespace) -> int:
    from .simulate import write_dataset

    if not a.overwrite and a.n >= 1:
        targets = [Path(a.out) / f"{i:03d}_{k}" for i in range(a.n) for k in SIM_FILES]
        _refuse_existing(targets, "--out")
    paths = write_dataset(
        Path(a.out), preset=a.preset, n=a.n, size=a.size, seed=a.seed, z_planes=a.z_planes
    )
    print(f"wrote {len(paths)} simulated pairs to {a.out}")
    return 0


def _cmd_stain(a: argparse.Namespace) -> int:
    from .io import stain_files

    stain_files(
        a.inputs,
        Path(a.output),
        model=a.model,
        steps=a.steps,
        tile=a.tile,
        overlap=a.overlap,
        device=a.device,
        pixel_size=a.pixel_size,
        samples=a.samples,
        seed=a.seed,
        overwrite=a.overwrite,
        out_format=a.format,
        scheduler=a.scheduler,
        pattern=a.pattern,
        texture=a.texture,
        guidance=a.guidance,
    )
    return 0


def _cmd_train(a: argparse.Namespace) -> int:
    from .training import run_recipe

    run_recipe(
        preset=a.preset,
        out=Path(a.out),
        seed=a.seed,
        stages=a.stages,
        resume=not a.no_resume,
        device=a.device,
        package=a.package,
        threads=a.threads,
        anchor_weight=a.anchor_weight,
        data_dir=Path(a.data) if a.data else None,
        init=a.init,
        register=a.register,
        max_shift=a.max_shift,
        overwrite=a.overwrite,
    )
    return 0


def _cmd_finetune(a: argparse.Namespace) -> int:
    from .finetune import finetune_files

    finetune_files(
        qobm=a.qobm,
        dapi=a.dapi,
        data=a.data,
        out=Path(a.out),
        model=a.model,
        steps=a.steps,
        lr=a.lr,
        patch=a.patch,
        val_fraction=a.val_fraction,
        seed=a.seed,
        device=a.device,
        overwrite=a.overwrite,
        max_minutes=a.max_minutes,
    )
    return 0


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from .evaluate import run_evaluate, run_instrument_suite

    run = run_instrument_suite if a.suite == "instruments" else run_evaluate
    run(
        json_path=a.json,
        n=a.n,
        size=a.size,
        device=a.device,
        quick=a.quick,
        weights_dir=Path(a.weights_dir) if a.weights_dir else None,
        guidance=a.guidance,
    )
    return 0


def _cmd_bench(a: argparse.Namespace) -> int:
    from .bench import run_bench

    if a.json and not a.overwrite:
        _refuse_existing([a.json], "--json")
    run_bench(
        json_path=a.json,
        size=a.size,
        repeats=a.repeats,
        big=a.big,
        device=a.device,
        precision=a.precision,
        compile=a.compile,
        models=a.models,
    )
    return 0


def _cmd_watch(a: argparse.Namespace) -> int:
    from .watch import run_from_args

    return run_from_args(a)


#: Simulator and training presets, listed in `--help` (tests check them against simulate.PRESETS
#: and training.presets.PRESETS, which are not imported here so that `--help` stays instant).
SIM_PRESETS = (
    "brain-20x",
    "brain-60x",
    "shifted-20x",
    "tumour-dense-20x",
    "domain-random",
    "tissue-random",
)
TRAIN_PRESETS = ("default", "release", "small", "tiny", "v4")
_DEFAULT = " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    from .watch import GUIDANCE_HELP, TEXTURE_HELP
    from .watch import add_arguments as watch_arguments

    p = argparse.ArgumentParser(
        prog="lcm-stain",
        description="Virtual DAPI staining of qOBM phase images (1-step latent consistency model).",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    dev = {
        "choices": ["auto", "cpu", "cuda", "mps"],
        "default": "auto",
        "help": "where to run: auto (a GPU if there is one, else the CPU), cpu, cuda or mps"
        + _DEFAULT,
    }
    seed = {
        "type": int,
        "default": 0,
        "help": "random seed; the same seed gives the same output" + _DEFAULT,
    }

    s = sub.add_parser(
        "demo", help="stain the packaged sample with LCM and Pix2Pix, write TIFF/PNG/JSON"
    )
    s.add_argument("--out", default="lcm-stain-demo", help="output folder" + _DEFAULT)
    s.add_argument("--device", **dev)
    s.add_argument("--overwrite", action="store_true", help="replace existing demo outputs")
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("simulate", help="write simulated paired qOBM/DAPI OME-TIFFs")
    s.add_argument(
        "--preset",
        default="brain-20x",
        help=f"simulator preset: {', '.join(SIM_PRESETS)}" + _DEFAULT,
    )
    s.add_argument("--n", type=int, default=4, help="number of simulated pairs" + _DEFAULT)
    s.add_argument("--size", type=int, default=512, help="image side in pixels (>= 8)" + _DEFAULT)
    s.add_argument("--seed", **{**seed, "help": "seed of pair 0; pair i uses seed + i" + _DEFAULT})
    s.add_argument(
        "--z-planes",
        type=int,
        default=None,
        help="write Z stacks with this many planes (default: none, 2-D images)",
    )
    s.add_argument(
        "--out",
        required=True,
        help="output folder: NNN_qobm, NNN_dapi, NNN_nuclei, NNN_distractors .ome.tif and "
        "NNN_meta.json per pair (required)",
    )
    s.add_argument("--overwrite", action="store_true", help="replace pairs already in --out")
    s.set_defaults(func=_cmd_simulate)

    s = sub.add_parser("stain", help="stain TIFF / OME-TIFF / zarr inputs")
    s.add_argument(
        "inputs",
        nargs="+",
        help="files, folders or glob patterns (a folder skips DAPI, label and output images)",
    )
    s.add_argument(
        "-o",
        "--output",
        required=True,
        help="output .ome.tif / .ome.zarr file (one input) or folder, which gets "
        "NAME_dapi.ome.tif per input (required)",
    )
    s.add_argument(
        "--model",
        default="lcm",
        help="lcm | pix2pix | teacher | path to a .safetensors checkpoint" + _DEFAULT,
    )
    s.add_argument(
        "--steps",
        type=int,
        default=None,
        help="sampling steps: LCM 1-8, teacher DDIM 1-1000 (default: the model's, LCM 1, teacher 50)",
    )
    s.add_argument(
        "--tile",
        type=int,
        default=1024,
        help="tile side in px (a context margin is added)" + _DEFAULT,
    )
    s.add_argument(
        "--overlap", type=int, default=32, help="overlap of neighbouring tiles in px" + _DEFAULT
    )
    s.add_argument("--device", **dev)
    s.add_argument(
        "--pixel-size",
        type=float,
        default=None,
        help="input µm/px (default: from the file's metadata, else estimated from the image)",
    )
    s.add_argument(
        "--samples",
        type=int,
        default=1,
        help="K > 1 draws K samples and writes their mean (NAME_dapi.ome.tif) and per-pixel std "
        "(NAME_dapi_std.ome.tif)" + _DEFAULT,
    )
    s.add_argument("--seed", **seed)
    s.add_argument("--texture", action="store_true", help=TEXTURE_HELP)
    s.add_argument("--guidance", type=float, default=None, metavar="G", help=GUIDANCE_HELP)
    s.add_argument(
        "--format",
        choices=["auto", "tiff", "zarr"],
        default="auto",
        help="output format; auto: from the -o name, else zarr for zarr inputs, OME-TIFF for the "
        "rest" + _DEFAULT,
    )
    s.add_argument(
        "--pattern",
        default=None,
        help="glob on the file names of folder inputs, e.g. '*_qobm*' (default: every image "
        "except DAPI, label and output images)",
    )
    s.add_argument(
        "--scheduler",
        default=None,
        help="dask.distributed scheduler address (default: none, stain in this process)",
    )
    s.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    s.set_defaults(func=_cmd_stain)

    s = sub.add_parser(
        "train",
        help="train VAE -> decoder -> teacher -> LCM distillation -> decoder polish -> Pix2Pix",
    )
    s.add_argument(
        "--preset",
        default="default",
        help=f"training preset: {' | '.join(TRAIN_PRESETS)}" + _DEFAULT,
    )
    s.add_argument(
        "--out",
        required=True,
        help="run folder; its finished stages are resumed when they were trained with the same "
        "preset, data, seed and settings (required)",
    )
    s.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help="train on a folder of qOBM/DAPI pairs (NAME_qobm.tif + NAME_dapi.tif, .tiff/"
        ".ome.tif/.zarr, or a pairs.csv with columns qobm,dapi[,pixel_size]) instead of "
        "simulated fields (default: simulated)",
    )
    s.add_argument(
        "--init",
        default=None,
        metavar="packaged|PATH",
        help="start every stage from trained weights: 'packaged', a run folder or an LCM "
        "checkpoint (transfer: no VAE stage, fewer steps; default: from scratch)",
    )
    s.add_argument(
        "--register",
        action="store_true",
        help="with --data: correct each pair's DAPI shift against the model's prediction "
        "(default: only report it)",
    )
    s.add_argument(
        "--max-shift",
        type=float,
        default=8.0,
        help="largest shift in px (at the model's pixel size) --register corrects; a pair "
        "shifted more is refused (default: %(default)s)",
    )
    s.add_argument("--seed", **seed)
    s.add_argument(
        "--stages",
        nargs="*",
        default=None,
        help="subset of: vae decoder teacher lcm polish pix2pix (default: all)",
    )
    s.add_argument(
        "--no-resume", action="store_true", help="start again instead of resuming finished stages"
    )
    s.add_argument(
        "--overwrite",
        action="store_true",
        help="restart a --out that holds another run (other preset, data, seed or settings): "
        "delete its stages first",
    )
    s.add_argument("--device", **dev)
    s.add_argument("--package", action="store_true", help="copy results into the package weights/")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: preset)")
    s.add_argument(
        "--anchor-weight",
        type=float,
        default=None,
        help="weight of the L1 anchor to the true latent in distillation (0: plain LCD; ablation) "
        "(default: the preset's)",
    )
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser(
        "finetune",
        help="fine-tune the 1-step model on paired qOBM/DAPI images",
        description="Fine-tune the 1-step model on one or more registered qOBM/DAPI pairs: a "
        "folder (--data) or --qobm/--dapi, repeatable and paired in order. With two or more "
        "pairs every fourth pair (at least one) is held out for validation; with one, the bottom "
        "--val-fraction of each plane.",
    )
    s.add_argument(
        "--data",
        default=None,
        help="folder of pairs NAME_qobm.EXT + NAME_dapi.EXT (.tif, .tiff, .ome.tif, .zarr) "
        "(default: none; or give --qobm/--dapi)",
    )
    s.add_argument(
        "--qobm",
        action="append",
        default=None,
        help="qOBM phase image (TIFF / zarr); repeat for several pairs (default: none; or --data)",
    )
    s.add_argument(
        "--dapi",
        action="append",
        default=None,
        help="measured DAPI of the same field, pixel-aligned; one per --qobm, in the same order "
        "(default: none)",
    )
    s.add_argument("--out", required=True, help="output checkpoint (.safetensors) (required)")
    s.add_argument(
        "--model", default="lcm", help="LCM to start from: lcm or a checkpoint" + _DEFAULT
    )
    s.add_argument("--steps", type=int, default=300, help="optimisation steps" + _DEFAULT)
    s.add_argument("--lr", type=float, default=2e-4, help="learning rate" + _DEFAULT)
    s.add_argument("--patch", type=int, default=128, help="training patch side in px" + _DEFAULT)
    s.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="with one pair: fraction of the image held out for validation" + _DEFAULT,
    )
    s.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop after this many minutes and keep the best weights so far (default: no limit)",
    )
    s.add_argument("--seed", **seed)
    s.add_argument("--device", **dev)
    s.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out and its NAME.json"
    )
    s.set_defaults(func=_cmd_finetune)

    s = sub.add_parser(
        "evaluate",
        help="score all models on the held-out simulated benchmark or the instrument suite",
        description="Score all models on the held-out simulated benchmark (docs/metrics.md). The "
        "default run (8 fields of 256², 9 rows) takes about half a minute on a CPU "
        "(26 s for docs/results/evaluate.json, model loading included); --quick takes a few "
        "seconds; --suite instruments (7 variants x 8 fields) about 3 minutes of CPU time.",
    )
    s.add_argument(
        "--suite",
        choices=["benchmark", "instruments"],
        default="benchmark",
        help="benchmark: the v1 benchmark; instruments: held-out instrument variants + in-domain"
        + _DEFAULT,
    )
    s.add_argument("--json", default=None, help="also write the results here (default: none)")
    s.add_argument(
        "--n",
        type=int,
        default=None,
        help="number of fields, per variant with --suite instruments (default: 8; --quick: 2)",
    )
    s.add_argument(
        "--size", type=int, default=None, help="field side in px (default: 256; --quick: 128)"
    )
    s.add_argument("--device", **dev)
    s.add_argument("--quick", action="store_true", help="small subset, for smoke tests")
    s.add_argument(
        "--weights-dir",
        default=None,
        help="folder with lcm/teacher/pix2pix checkpoints (default: the packaged weights)",
    )
    s.add_argument(
        "--guidance",
        type=float,
        default=None,
        metavar="G",
        help="guidance scale of the LCM and teacher rows, for models trained for it (the range "
        "is the model's: a value outside it is refused with that range; models without "
        "guidance accept only 1) (default: each model's own)",
    )
    s.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser(
        "bench", help="latency/throughput/memory of LCM-1, LCM-4, teacher-50, Pix2Pix"
    )
    s.add_argument("--json", default=None, help="also write the results here (default: none)")
    s.add_argument(
        "--size", type=int, default=2048, help="side of the timed image in px" + _DEFAULT
    )
    s.add_argument(
        "--repeats", type=int, default=3, help="timed runs per model (median)" + _DEFAULT
    )
    s.add_argument(
        "--big",
        type=int,
        default=8192,
        help="side of the streamed memory test (0: skip)" + _DEFAULT,
    )
    s.add_argument("--device", **dev)
    s.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="network dtype: auto = fp16 on CUDA, fp32 elsewhere" + _DEFAULT,
    )
    s.add_argument("--compile", action="store_true", help="torch.compile the networks (CUDA only)")
    s.add_argument(
        "--models",
        nargs="+",
        default=None,
        metavar="NAME",
        help="time only these: lcm-1 lcm-4 teacher-50 pix2pix (default: all)",
    )
    s.add_argument("--overwrite", action="store_true", help="replace an existing --json")
    s.set_defaults(func=_cmd_bench)

    s = sub.add_parser("watch", help="stain each new TIFF in a folder once it is fully written")
    watch_arguments(s)
    s.set_defaults(func=_cmd_watch)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    in_main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    try:
        return _run(args)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old)


def _run(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except (CLIError, ValueError, TypeError, OSError) as e:  # OSError: disk full, permissions
        print(f"lcm-stain {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:  # torch reports OOM as RuntimeError subclasses
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not isinstance(e, MemoryError) and "memory" not in text.lower():
            raise
        print(
            f"lcm-stain {args.command}: error: out of memory ({text}): use a smaller --tile, "
            "fewer --samples, or --device cpu",
            file=sys.stderr,
        )
        return 2
    except Terminated:
        print(f"lcm-stain {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"lcm-stain {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
