"""Fitting the pixel-size estimator (``pixel_size_estimate``) on simulated fields.

Fields are simulated at their native pixel size (no resampling), log-uniform over
``RANGE_UM``, from every source the simulator has: the fixed presets, domain-randomised
instruments and tissue architectures with either phase retrieval. A ridge regression of
log(µm/px) on the features (a small tanh network) is fitted on one set of seeds and its error
measured on another.

    python -m napari_lcm_stain.training.pixel_size --out src/napari_lcm_stain/weights/pixel_size_estimator.json
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from .. import simulate as S
from ..checkpoints import atomic_write_bytes
from ..pixel_size_estimate import features

#: µm/px the estimator is fitted on: 60×-class (0.15) to 5×-class (1.6) sampling.
RANGE_UM = (0.15, 1.6)
#: Seeds of the fitting fields; the held-out fields use SEED0 + 500 000 + i.
SEED0 = 700_000
_FIXED = ("brain-20x", "tumour-dense-20x", "shifted-20x", "brain-60x")


def simulated_field(i: int, seed0: int = SEED0) -> tuple[np.ndarray, float]:
    """Field ``i``: (phase, µm/px) at its native pixel size, 64–512 px per side (suite fields of
    the same area at coarse sampling are small)."""
    rng = np.random.default_rng(seed0 + i)
    px = float(math.exp(rng.uniform(*np.log(RANGE_UM))))
    kind = i % 4
    if kind == 0:
        p = S.get_preset(_FIXED[(i // 4) % len(_FIXED)])
    else:
        p = S.sample_instrument(rng)
        if kind >= 2:
            p = S.sample_tissue(rng, p)
    p = replace(p, pixel_size=px, qobm_pixel_size=None)
    size = int(round(math.exp(rng.uniform(math.log(64), math.log(512)))))
    s = S.simulate_pair(p, size=size, seed=int(rng.integers(2**31)))
    return s.qobm, px


def _dataset(n: int, seed0: int, cache: Path | None, log) -> tuple[np.ndarray, np.ndarray]:
    """Features and log(µm/px) of ``n`` fields (read from / written to ``cache``, an .npz)."""
    if cache is not None and cache.exists():
        d = np.load(cache)
        if len(d["y"]) == n and int(d["seed0"]) == seed0:
            return d["X"], d["y"]
    xs, ys = [], []
    for i in range(n):
        q, px = simulated_field(i, seed0)
        xs.append(features(q))
        ys.append(math.log(px))
        if (i + 1) % 100 == 0:
            log(f"  {i + 1}/{n} fields (seeds from {seed0})")
    X, y = np.asarray(xs), np.asarray(ys)
    if cache is not None:
        np.savez(cache, X=X, y=y, seed0=seed0)
    return X, y


def _fit_mlp(Z: np.ndarray, y: np.ndarray, hidden: int, decay: float, seed: int = 0) -> dict:
    """A one-hidden-layer tanh network, log(µm/px) from standardised features (full batch)."""
    import torch

    torch.manual_seed(seed)
    zt = torch.as_tensor(Z, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.float32)[:, None]
    net = torch.nn.Sequential(
        torch.nn.Linear(Z.shape[1], hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
    )
    with torch.no_grad():
        net[2].bias.fill_(float(y.mean()))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=decay)
    for _ in range(3000):
        opt.zero_grad()
        loss = torch.nn.functional.smooth_l1_loss(net(zt), yt, beta=0.05)
        loss.backward()
        opt.step()
    w1, b1, w2, b2 = (t.detach().double().numpy() for t in net.parameters())
    return {"w1": w1.T.tolist(), "b1": b1.tolist(), "w2": w2[0].tolist(), "b2": float(b2[0])}


def fit(n: int, n_test: int, hidden: int = 32, decay: float = 1e-3, cache_dir=None,
        log=print) -> dict:  # fmt: skip
    """Fit on ``n`` fields, measure on ``n_test`` others; returns the estimator JSON dict."""
    cache = Path(cache_dir) if cache_dir else None
    X, y = _dataset(n, SEED0, cache / "fit.npz" if cache else None, log)
    Xt, yt = _dataset(n_test, SEED0 + 500_000, cache / "test.npz" if cache else None, log)
    mean, std = X.mean(0), X.std(0) + 1e-9
    cfg = {
        "kind": "pixel_size_estimator",
        "model": "mlp",
        "mean": mean.tolist(),
        "std": std.tolist(),
        **_fit_mlp((X - mean) / std, y, hidden, decay),
        "range_um": list(RANGE_UM),
        "hidden": hidden,
        "weight_decay": decay,
        "n_fit": n,
    }
    from ..pixel_size_estimate import predict_log_px

    est = np.exp(np.clip(predict_log_px(cfg, Xt), *np.log(RANGE_UM)))
    err = np.abs(est / np.exp(yt) - 1)
    med, p90 = float(np.median(err)), float(np.quantile(err, 0.9))
    cfg["held_out"] = {"n": n_test, "median_rel_error": med, "p90_rel_error": p90}
    log(f"held-out simulated fields: median error {med:.1%}, 90th percentile {p90:.1%}")
    return cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=600, help="fitting fields (%(default)s)")
    ap.add_argument("--n-test", type=int, default=150, help="held-out fields (%(default)s)")
    ap.add_argument("--hidden", type=int, default=32, help="hidden units (%(default)s)")
    ap.add_argument("--decay", type=float, default=1e-3, help="weight decay (%(default)s)")
    ap.add_argument("--cache", default=None, help="folder for feature caches (default: none)")
    ap.add_argument("--out", required=True, help="JSON file to write (required)")
    a = ap.parse_args(argv)
    cfg = fit(a.n, a.n_test, a.hidden, a.decay, a.cache)
    cfg["command"] = (
        f"python -m napari_lcm_stain.training.pixel_size --n {a.n} --n-test {a.n_test} "
        f"--hidden {a.hidden} --decay {a.decay} --out {a.out}"
    )
    atomic_write_bytes(Path(a.out), (json.dumps(cfg, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
