"""Crops at 1:1 pixels for the docs: truth | LCM-1 | LCM-1 at other guidances | LCM-1 texture |
LCM-4 | teacher-50 | Pix2Pix.

    python scripts/figure_crops.py                          # writes docs/images/crops.png
    python scripts/figure_crops.py --weights-dir runs/v5    # another run's checkpoints
    python scripts/figure_crops.py --out /tmp/crops.png --fields 2

Each row is one `lcm-stain evaluate` benchmark field (seeds 900 000 + i, presets alternating),
stained whole by every model through the same code path as the benchmark (`evaluate._predict`,
so ``--weights-dir`` finds ``lcm/teacher/pix2pix.safetensors`` exactly as `evaluate
--weights-dir` does), then cropped to the ``--crop``² window holding the most labelled nuclei.
Crops are pasted without resampling (one image pixel = one figure pixel); every crop of a row
shares one grey scale, the truth's 1-99.8 % mapped to black-white (`metrics.normalize_pair`), so a
fainter prediction looks fainter. Under each crop: the field's edge sharpness
(`metrics.edge_sharpness`, prediction ÷ truth on the true nuclear rims; 1 = as sharp). A guided
LCM (one that accepts guidance) gets a column at each end of its trained range beside LCM-1,
which is at its default guidance (`evaluate.guidance_rows`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from napari_lcm_stain import evaluate as E
from napari_lcm_stain import metrics as M

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "images" / "crops.png"
COLUMNS: tuple[tuple[str, str | None], ...] = (
    ("truth", None),
    ("LCM-1", "lcm-1"),  # at the model's default guidance
    ("LCM-1 texture", "lcm-1-texture"),  # with the texture decoder's grain (texture=True)
    ("LCM-4", "lcm-4"),
    ("teacher-50", "teacher-50"),
    ("Pix2Pix", "pix2pix"),
)
GAP, HEAD, FOOT, SIDE = 4, 18, 14, 112  # pixels between crops, header/footer strips, row label


def densest_window(labels: np.ndarray, crop: int, step: int = 16) -> tuple[int, int]:
    """Top-left corner of the ``crop``² window (on a ``step`` grid) with the most whole nuclei."""
    h, w = labels.shape
    best, corner = -1, (0, 0)
    for y in range(0, h - crop + 1, step):
        for x in range(0, w - crop + 1, step):
            win = labels[y : y + crop, x : x + crop]
            edge = np.concatenate([win[0], win[-1], win[:, 0], win[:, -1]])
            whole = np.setdiff1d(np.unique(win), np.unique(edge)).size  # nuclei not cut by the edge
            if whole > best:
                best, corner = whole, (y, x)
    return corner


def columns(weights_dir: Path | None) -> tuple[tuple[str, str | None], ...]:
    """COLUMNS with LCM-1 at the other guidances a guided LCM accepts after the LCM-1 column."""
    extra = [(f"LCM-1 g{r.guidance:g}", r.name) for r in E.guidance_rows(weights_dir)
             if r.model == "lcm" and r.steps == 1]  # fmt: skip
    return COLUMNS[:2] + tuple(extra) + COLUMNS[2:]


def field_crops(
    sample, crop: int, device: str, weights_dir: Path | None
) -> list[tuple[np.ndarray, float]]:
    """One (8-bit crop, edge sharpness) per column for one benchmark field."""
    rows = {r.name: r for r in E.FULL_ROWS + E.guidance_rows(weights_dir)}
    y, x = densest_window(np.asarray(sample.nuclei), crop)
    out = []
    for _title, name in columns(weights_dir):
        if name is None:
            pred = np.asarray(sample.dapi, np.float32)
        else:
            pred = E._predict(rows[name], sample, device, weights_dir)
        edge = M.edge_sharpness(pred, sample.dapi, sample.nuclei)
        shown, _ = M.normalize_pair(pred, sample.dapi)
        out.append((np.round(shown[y : y + crop, x : x + crop] * 255).astype(np.uint8), edge))
    return out


def make_figure(
    out: Path = OUT,
    n_fields: int = 3,
    size: int = 256,
    crop: int = 128,
    device: str = "cpu",
    weights_dir: Path | None = None,
) -> Path:
    from PIL import Image, ImageDraw

    grid = []
    labels = []
    for seed, preset, sample in E.benchmark_fields(n_fields, size):
        print(f"field {seed} ({preset})", flush=True)
        grid.append(field_crops(sample, crop, device, weights_dir))
        labels.append((preset, f"seed {seed}"))
    cols = columns(weights_dir)
    cell_h = crop + FOOT + GAP
    width = SIDE + len(cols) * (crop + GAP)
    fig = Image.new("L", (width, HEAD + len(grid) * cell_h), 255)
    draw = ImageDraw.Draw(fig)
    for j, (title, _name) in enumerate(cols):
        draw.text((SIDE + j * (crop + GAP) + 2, 3), title, fill=0)
    for i, (row, (preset, seed_txt)) in enumerate(zip(grid, labels)):
        top = HEAD + i * cell_h
        draw.text((4, top + crop // 2 - 12), preset, fill=0)
        draw.text((4, top + crop // 2 + 2), seed_txt, fill=0)
        for j, (img, edge) in enumerate(row):
            left = SIDE + j * (crop + GAP)
            fig.paste(Image.fromarray(img, mode="L"), (left, top))  # 1:1, no resampling
            txt = "edge n/a" if not np.isfinite(edge) else f"edge {edge:.2f}"
            draw.text((left + 2, top + crop + 1), txt, fill=0)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.save(out, optimize=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--fields", type=int, default=3, help="benchmark fields (rows)")
    ap.add_argument("--size", type=int, default=256, help="field size (px) the models stain")
    ap.add_argument("--crop", type=int, default=128, help="crop side (px), shown 1:1")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--weights-dir",
        type=Path,
        default=None,
        help="a training output folder: its lcm/teacher/pix2pix.safetensors instead of the "
        "packaged weights (as `lcm-stain evaluate --weights-dir`)",
    )
    a = ap.parse_args(argv)
    if not 16 <= a.crop <= a.size:
        ap.error(f"--crop must be between 16 and --size ({a.size}), got {a.crop}")
    if a.weights_dir is not None and not a.weights_dir.is_dir():
        ap.error(f"--weights-dir {a.weights_dir} is not a folder")
    print(f"wrote {make_figure(a.out, a.fields, a.size, a.crop, a.device, a.weights_dir)}")


if __name__ == "__main__":
    main()
