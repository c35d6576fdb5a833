"""Scale-out: the tiled dask graph on a 2-process LocalCluster equals the local computation."""

from __future__ import annotations

import numpy as np
import pytest

from _fake_predictor import FakePredictor, blobs, fake_loader
from napari_lcm_stain import tiling as T
from napari_lcm_stain.engine import iter_stain

distributed = pytest.importorskip("distributed")

# worker processes import torch: ~40 s on the 2-core CI machine
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(
        n_workers=2,
        processes=True,
        threads_per_worker=1,
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=40,
    )
    c = distributed.Client(cluster)
    try:
        yield c
    finally:
        c.close()
        cluster.close()


def _finish(gen):
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def test_distributed_graph_equals_local(client):
    pred = FakePredictor()
    img = pred.normalize(blobs((260, 300), seed=8))
    grid = T.make_grid(img.shape, pred.multiple, 128, 32)
    noise = T.make_noise_canvas(pred, grid.padded, 2)
    local = T.predict_tiled(img, pred, 128, 32, noise, batch=2)
    # workers build their own predictor from the picklable loader (no model in the graph)
    lazy = T.predict_tiled_dask(img, pred, 128, 32, noise, batch=2, loader=fake_loader)
    remote = client.compute(lazy).result()
    np.testing.assert_allclose(remote, local, atol=1e-6)
    assert len(client.scheduler_info()["workers"]) == 2


def test_iter_stain_with_scheduler_equals_local(client):
    pred = FakePredictor()
    stack = blobs((2, 90, 110), seed=9)
    kw = {"tile": 64, "overlap": 16, "seed": 4, "samples": 2}
    local = _finish(iter_stain(stack, pred, **kw))
    remote = _finish(iter_stain(stack, pred, scheduler=client, loader=fake_loader, **kw))
    np.testing.assert_allclose(remote.mean, local.mean, atol=1e-6)
    np.testing.assert_allclose(remote.std, local.std, atol=1e-6)
    address = _finish(
        iter_stain(stack, pred, scheduler=client.scheduler.address, loader=fake_loader, **kw)
    )
    np.testing.assert_allclose(address.mean, local.mean, atol=1e-6)


def test_cli_scheduler_with_packaged_model(client, tmp_path):
    """`lcm-stain stain --scheduler ADDRESS`: workers load the packaged model themselves."""
    from _fake_predictor import packaged_predictor

    if packaged_predictor("lcm") is None:
        pytest.skip("packaged LCM weights not trained yet")
    import tifffile

    from napari_lcm_stain import cli, io
    from napari_lcm_stain.engine import stain

    img = blobs((2, 96, 130), seed=10)
    tifffile.imwrite(tmp_path / "in.tif", img)
    args = ["stain", str(tmp_path / "in.tif"), "--tile", "64", "--overlap", "32", "--device", "cpu"]
    assert (
        cli.main(
            args + ["-o", str(tmp_path / "d.ome.tif"), "--scheduler", client.scheduler.address]
        )
        == 0
    )
    remote = np.asarray(io.read_image(tmp_path / "d.ome.tif")[0])
    local = stain(img, "lcm", tile=64, overlap=32, device="cpu", pixel_size="auto")  # no metadata
    np.testing.assert_allclose(remote, local, atol=1e-5)
