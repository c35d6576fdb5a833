"""Forward time of candidate 1-step layouts vs the Pix2Pix generator on one 1024x1024 tile.

`python experiments/profile_layouts.py` prints the table in docs/architecture.md. Random weights (speed
does not depend on them), 2 threads, best of 5 after a warm-up. It is how the default preset's
latent layout was chosen: the old f=4 layout against f=8 layouts at about Pix2Pix's parameter count.
"""

from __future__ import annotations

import time

import torch

from napari_lcm_stain.models import VAE, LatentUNet, Pix2PixGenerator, count_parameters

THIN = dict(dec_quarter_channels=16, dec_half_channels=8, dec_half_conv=False)
LAYOUTS = [  # (latent factor, latent channels, U-Net widths, decoder width, decoder options)
    (4, 4, (24, 48, 96, 160), 32, {}),  # the layout of release 0.0.1
    (8, 8, (32, 64, 128), 48, {}),
    (8, 8, (40, 80, 160), 48, {}),  # the default preset's VAE-stage decoder
    (8, 8, (40, 80, 160), 48, THIN),  # packaged: the decoder stage's thin decoder
    (8, 8, (48, 96, 192), 48, {}),
]


def best_time(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@torch.inference_mode()
def main(size: int = 1024) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    x = torch.randn(1, 1, size, size)
    gen = Pix2PixGenerator(16, 6).eval()
    t_p2p = best_time(lambda: gen(x))
    print(f"Pix2Pix (ngf 16, depth 6): {t_p2p:.3f} s, {count_parameters(gen) / 1e6:.2f} M params")
    print(
        "| f | latent ch | U-Net widths | decoder | U-Net s | decoder s | total / Pix2Pix | params |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for f, lc, widths, dec, opts in LAYOUTS:
        unet, vae = LatentUNet(lc, f, widths).eval(), VAE(lc, 32, dec, f, **opts).eval()
        z = torch.randn(1, lc, size // f, size // f)
        t = torch.full((1,), 999)
        tu = best_time(lambda: unet(z, t, x))  # noqa: B023
        td = best_time(lambda: vae.decoder(z))  # noqa: B023
        n = (count_parameters(unet) + count_parameters(vae.decoder)) / 1e6
        print(
            f"| {f} | {lc} | {widths} | {dec}{' thin' if opts else ''} | {tu:.3f} | {td:.3f} | {(tu + td) / t_p2p:.2f} "
            f"| {n:.2f} M |"
        )


if __name__ == "__main__":
    main()
