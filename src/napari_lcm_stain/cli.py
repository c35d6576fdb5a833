"""`lcm-stain` command line: argument parsing only; every subcommand is one call into the core.

Heavy imports (torch, diffusers, napari) happen inside the handlers so `lcm-stain --help` is instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._version import __version__


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2, no traceback."""


def _cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(a.out), device=a.device, overwrite=a.overwrite)
    return 0


def _cmd_simulate(a: argparse.Namespace) -> int:
    from .simulate import write_dataset

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
    from .evaluate import run_evaluate

    run_evaluate(
        json_path=a.json,
        n=a.n,
        size=a.size,
        device=a.device,
        quick=a.quick,
        weights_dir=Path(a.weights_dir) if a.weights_dir else None,
    )
    return 0


def _cmd_bench(a: argparse.Namespace) -> int:
    from .bench import run_bench

    run_bench(json_path=a.json, size=a.size, repeats=a.repeats, big=a.big, device=a.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lcm-stain",
        description="Virtual DAPI staining of qOBM phase images (1-step latent consistency model).",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    dev = {"choices": ["auto", "cpu", "cuda", "mps"], "default": "auto"}

    s = sub.add_parser(
        "demo", help="stain the packaged sample with LCM and Pix2Pix, write TIFF/PNG/JSON"
    )
    s.add_argument("--out", default="lcm-stain-demo", help="output folder (default: %(default)s)")
    s.add_argument("--device", **dev)
    s.add_argument("--overwrite", action="store_true", help="replace existing demo outputs")
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("simulate", help="write simulated paired qOBM/DAPI OME-TIFFs")
    s.add_argument("--preset", default="brain-20x")
    s.add_argument("--n", type=int, default=4)
    s.add_argument("--size", type=int, default=512)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--z-planes", type=int, default=None, help="write Z stacks with this many planes"
    )
    s.add_argument("--out", required=True)
    s.set_defaults(func=_cmd_simulate)

    s = sub.add_parser("stain", help="stain TIFF / OME-TIFF / zarr inputs")
    s.add_argument("inputs", nargs="+", help="files, folders or glob patterns")
    s.add_argument("-o", "--output", required=True, help="output file (one input) or folder")
    s.add_argument("--model", default="lcm", help="lcm | pix2pix | teacher | path to a checkpoint")
    s.add_argument(
        "--steps", type=int, default=None, help="sampling steps (LCM 1-4, teacher DDIM N)"
    )
    s.add_argument(
        "--tile", type=int, default=1024, help="tile side in px (a context margin is added)"
    )
    s.add_argument("--overlap", type=int, default=32)
    s.add_argument("--device", **dev)
    s.add_argument(
        "--pixel-size", type=float, default=None, help="input µm/px (else from metadata)"
    )
    s.add_argument("--samples", type=int, default=1, help="K samples: writes mean and std")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--format", choices=["auto", "tiff", "zarr"], default="auto")
    s.add_argument("--scheduler", default=None, help="dask.distributed scheduler address")
    s.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    s.set_defaults(func=_cmd_stain)

    s = sub.add_parser(
        "train",
        help="train VAE -> decoder -> teacher -> LCM distillation -> decoder polish -> Pix2Pix",
    )
    s.add_argument("--preset", default="default", help="default | tiny")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--stages",
        nargs="*",
        default=None,
        help="subset of: vae decoder teacher lcm polish pix2pix",
    )
    s.add_argument("--no-resume", action="store_true")
    s.add_argument("--device", **dev)
    s.add_argument("--package", action="store_true", help="copy results into the package weights/")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: preset)")
    s.add_argument(
        "--anchor-weight",
        type=float,
        default=None,
        help="weight of the L1 anchor to the true latent in distillation (0: plain LCD; ablation)",
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
        "--data", default=None, help="folder of NAME_qobm.ext + NAME_dapi.ext pairs (tif/zarr)"
    )
    s.add_argument("--qobm", action="append", default=None, help="qOBM image (repeatable)")
    s.add_argument("--dapi", action="append", default=None, help="its DAPI image (repeatable)")
    s.add_argument("--out", required=True, help="output checkpoint (.safetensors)")
    s.add_argument("--model", default="lcm")
    s.add_argument("--steps", type=int, default=300)
    s.add_argument("--lr", type=float, default=2e-4)
    s.add_argument("--patch", type=int, default=128)
    s.add_argument("--val-fraction", type=float, default=0.2)
    s.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop after this many minutes and keep the best weights so far",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", **dev)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=_cmd_finetune)

    s = sub.add_parser("evaluate", help="score all models on the held-out simulated benchmark")
    s.add_argument("--json", default=None)
    s.add_argument("--n", type=int, default=None, help="number of benchmark fields")
    s.add_argument("--size", type=int, default=None)
    s.add_argument("--device", **dev)
    s.add_argument("--quick", action="store_true", help="small subset, for smoke tests")
    s.add_argument(
        "--weights-dir", default=None, help="folder with lcm/teacher/pix2pix checkpoints"
    )
    s.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser(
        "bench", help="latency/throughput/memory of LCM-1, LCM-4, teacher-50, Pix2Pix"
    )
    s.add_argument("--json", default=None)
    s.add_argument("--size", type=int, default=2048)
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument(
        "--big", type=int, default=8192, help="side of the streamed memory test (0: skip)"
    )
    s.add_argument("--device", **dev)
    s.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
    except KeyboardInterrupt:
        print(f"lcm-stain {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
