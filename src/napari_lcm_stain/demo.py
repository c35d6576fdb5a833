"""`lcm-stain demo`: the packaged sample through the packaged LCM and the Pix2Pix baseline.

Writes OME-TIFFs (input, LCM, Pix2Pix, ground truth), a side-by-side PNG and a metrics JSON.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from . import metrics
from .checkpoints import atomic_write_bytes

DEMO_PRESET = "brain-20x"
DEMO_SIZE = 512
DEMO_SEED = 20_240_001  # fixed; outside the training and benchmark seed ranges

#: The printed table: (metrics key, header, "higher" or "lower" is better).
COLUMNS = [("pearson", "pearson", "higher"), ("ssim", "ssim", "higher"), ("f1", "F1", "higher"),
           ("realism", "realism", "lower")]  # fmt: skip
#: One line per row and per column, printed under the table and stored in metrics.json.
LEGEND = {
    "oracle": "the true DAPI scored against itself by the same pipeline: the ceiling for every "
    "column (its F1 < 1: the segmentation cannot split every labelled nucleus, even in the truth)",
    "lcm": "the packaged latent consistency model, 1 step",
    "pix2pix": "the Pix2Pix (conditional GAN) baseline",
    "pearson": "pixel correlation with the true DAPI (higher is better, 1 at most)",
    "ssim": "structural similarity with the true DAPI (higher is better, 1 at most)",
    "F1": "nuclei found vs missed and invented, matched at IoU >= 0.5 (higher is better)",
    "realism": "distance between the power spectra, i.e. texture and sharpness (lower is better, "
    "0 = the true DAPI's texture)",
}


def _panel(img: np.ndarray, lo: float, hi: float, tint=(1.0, 1.0, 1.0)) -> np.ndarray:
    x = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    return (x[..., None] * np.array(tint)[None, None] * 255).astype(np.uint8)


def side_by_side_png(path: Path, panels: list[tuple[str, np.ndarray]]) -> None:
    """One row of labelled RGB panels, written atomically with Pillow (a scikit-image dependency)."""
    import io

    from PIL import Image, ImageDraw

    h, w = panels[0][1].shape[:2]
    gap = 8
    canvas = Image.new("RGB", (len(panels) * (w + gap) - gap, h + 24), (20, 20, 20))
    draw = ImageDraw.Draw(canvas)
    for i, (title, rgb) in enumerate(panels):
        canvas.paste(Image.fromarray(rgb), (i * (w + gap), 24))
        draw.text((i * (w + gap) + 4, 5), title, fill=(235, 235, 235))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _write_tiff(path: Path, data: np.ndarray, pixel_size: float, description: str) -> None:
    from .io import write_image

    write_image(path, data, {"pixel_size": pixel_size, "axes": "YX"}, description)


def run_demo(
    out: Path = Path("lcm-stain-demo"), device: str = "auto", overwrite: bool = False
) -> dict:
    from .engine import stain
    from .simulate import simulate_pair

    out = Path(out)
    names = [
        "qobm.ome.tif",
        "dapi_lcm.ome.tif",
        "dapi_pix2pix.ome.tif",
        "dapi_truth.ome.tif",
        "side_by_side.png",
        "metrics.json",
    ]
    existing = [n for n in names if (out / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds demo outputs ({existing[0]}, …); pass --overwrite"
        )
    out.mkdir(parents=True, exist_ok=True)
    s = simulate_pair(DEMO_PRESET, size=DEMO_SIZE, seed=DEMO_SEED)
    px = s.pixel_size
    preds, seconds = {}, {}
    for model in ("lcm", "pix2pix"):
        t0 = time.perf_counter()
        preds[model] = stain(s.qobm, model=model, device=device, pixel_size=px, seed=0)
        seconds[model] = round(time.perf_counter() - t0, 3)
    report = {
        "sample": {
            "preset": DEMO_PRESET,
            "size": DEMO_SIZE,
            "seed": DEMO_SEED,
            "pixel_size_um": px,
        },
        "seconds": seconds,
        "models": {},
    }
    report["models"]["oracle"] = metrics.image_metrics(
        s.dapi, s.dapi, true_labels=s.nuclei, pixel_size=px
    )
    for model, pred in preds.items():
        report["models"][model] = metrics.image_metrics(
            pred, s.dapi, true_labels=s.nuclei, pixel_size=px
        )
    report["legend"] = LEGEND
    report = json.loads(json.dumps(report, default=float))
    _write_tiff(out / "qobm.ome.tif", s.qobm, px, "simulated qOBM phase (rad)")
    _write_tiff(out / "dapi_lcm.ome.tif", preds["lcm"], px, "virtual DAPI, packaged LCM, 1 step")
    _write_tiff(
        out / "dapi_pix2pix.ome.tif", preds["pix2pix"], px, "virtual DAPI, Pix2Pix baseline"
    )
    _write_tiff(out / "dapi_truth.ome.tif", s.dapi, px, "simulated DAPI ground truth")
    cyan = (0.3, 0.85, 1.0)
    side_by_side_png(
        out / "side_by_side.png",
        [
            ("qOBM phase", _panel(s.qobm, -0.3, 0.3)),
            ("LCM (1 step)", _panel(preds["lcm"], 0, 0.9, cyan)),
            ("Pix2Pix", _panel(preds["pix2pix"], 0, 0.9, cyan)),
            ("DAPI ground truth", _panel(s.dapi, 0, 0.9, cyan)),
        ],
    )
    atomic_write_bytes(out / "metrics.json", json.dumps(report, indent=2).encode())
    print(f"demo outputs in {out.resolve()}:")
    for n in names:
        print(f"  {out / n}")
    print(table(report["models"]))
    return report


def table(models: dict[str, dict]) -> str:
    """The demo's metrics table with every row and column explained and the best model named."""
    lines = [f"{'model':10s}" + "".join(f" {head:>8s}" for _k, head, _b in COLUMNS)]
    for name, m in models.items():
        lines.append(f"{name:10s}" + "".join(f" {m[k]:8.3f}" for k, _h, _b in COLUMNS))
    real = {n: m for n, m in models.items() if n != "oracle"}
    best = []
    for k, head, better in COLUMNS:
        pick = (max if better == "higher" else min)(real, key=lambda n, k=k: real[n][k])
        best.append(f"{head} {pick}")
    lines.append("best model per column: " + ", ".join(best))
    width = max(len(n) for n in LEGEND)
    lines += [f"  {n:{width}s}  {LEGEND[n]}" for n in (*models, *(h for _k, h, _b in COLUMNS))]
    return "\n".join(lines)
