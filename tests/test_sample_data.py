"""The sample data opens in a real napari viewer with the right layers, names, types and scale."""

from __future__ import annotations

import numpy as np
import pytest

from napari_lcm_stain._sample_data import sample_stack


def test_sample_functions_return_layer_data_without_napari():
    layers = sample_stack(z_planes=2)
    names = [kw["name"] for _, kw, _ in layers]
    assert names[:3] == ["qOBM phase", "DAPI (ground truth)", "nuclei (ground truth)"]
    assert [t for _, _, t in layers][:3] == ["image", "image", "labels"]
    data, kw, _ = layers[0]
    assert data.shape == (2, 256, 256) and data.dtype == np.float32
    assert kw["scale"] == pytest.approx((1.0, 0.414, 0.414))
    lo, hi = kw["contrast_limits"]
    assert -0.4 <= lo < 0 < hi <= 1.0
    assert layers[1][1]["blending"] == "additive"
    assert layers[2][0].dtype == np.int32 and layers[2][0].max() > 0


@pytest.mark.gui
def test_field_opens_in_viewer(make_napari_viewer):
    viewer = make_napari_viewer()
    added = viewer.open_sample("napari-lcm-stain", "qobm_field")
    by_name = {layer.name: layer for layer in viewer.layers}
    assert {"qOBM phase", "DAPI (ground truth)", "nuclei (ground truth)"} <= set(by_name)
    assert len(added) == len(viewer.layers)
    phase, dapi, nuclei = (by_name[n] for n in ("qOBM phase", "DAPI (ground truth)",
                                                "nuclei (ground truth)"))  # fmt: skip
    assert type(phase).__name__ == "Image" and type(dapi).__name__ == "Image"
    assert type(nuclei).__name__ == "Labels"
    assert phase.data.shape == (512, 512)
    for layer in (phase, dapi, nuclei):
        np.testing.assert_allclose(layer.scale, [0.414, 0.414])
    assert dapi.colormap.name in ("cyan", "blue")
    assert phase.colormap.name == "gray"
    assert nuclei.data.max() > 10


@pytest.mark.gui
def test_stack_opens_in_viewer(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-lcm-stain", "qobm_stack")
    phase = viewer.layers["qOBM phase"]
    nuclei = viewer.layers["nuclei (ground truth)"]
    assert phase.data.shape == (5, 256, 256)
    assert nuclei.data.shape == (5, 256, 256)
    np.testing.assert_allclose(phase.scale, [1.0, 0.414, 0.414])
    assert viewer.dims.ndim == 3
