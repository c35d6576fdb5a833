"""Metrics: exact values on hand-made images, degenerate cases, segmentation and matching."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.draw import disk, ellipse

from napari_lcm_stain import metrics as M

PS = 0.414  # µm/px (20x)


def _discs(shape, centres, radius, value=0.8):
    img = np.zeros(shape, np.float64)
    lab = np.zeros(shape, np.int32)
    for i, c in enumerate(centres, start=1):
        rr, cc = disk(c, radius, shape=shape)
        img[rr, cc] = value
        lab[rr, cc] = i
    return img, lab


@pytest.fixture
def field():
    """A 96² field: three separated discs (r = 8 px = 3.3 µm) + mild noise, and its labels."""
    img, lab = _discs((96, 96), [(24, 24), (24, 70), (70, 48)], 8)
    noisy = img + 0.02 * np.random.default_rng(0).standard_normal(img.shape) + 0.05
    return noisy, lab


# ------------------------------------------------------------------ pixel metrics


def test_identical_images_score_perfect(field):
    img, _ = field
    assert M.pearson(img, img) == pytest.approx(1.0)
    assert M.ssim(img, img) == pytest.approx(1.0)
    assert M.psnr(img, img) == M.PSNR_CAP_DB
    assert M.nrmse(img, img) == 0.0
    assert M.realism_distance(img, img) == 0.0


def test_pearson_linear_relations():
    x = np.random.default_rng(1).random((32, 32))
    assert M.pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert M.pearson(x, -x) == pytest.approx(-1.0)
    y = np.random.default_rng(2).random((32, 32))
    assert abs(M.pearson(x, y)) < 0.1


def test_pearson_constant_images_defined():
    c = np.full((16, 16), 0.3)
    assert M.pearson(c, c) == 1.0
    assert M.pearson(c, np.random.default_rng(0).random((16, 16))) == 0.0


def test_normalize_pair_uses_target_percentiles():
    t = np.linspace(0, 10, 1000).reshape(20, 50)
    p = t * 2
    pn, tn = M.normalize_pair(p, t)
    lo, hi = np.percentile(t, M.NORM_PERCENTILES)
    assert tn.min() == 0.0 and tn.max() == 1.0
    np.testing.assert_allclose(tn, np.clip((t - lo) / (hi - lo), 0, 1))
    # the prediction goes through the SAME map, so its brightness error survives (then clipped)
    np.testing.assert_allclose(pn, np.clip((p - lo) / (hi - lo), 0, 1))
    assert pn.mean() > tn.mean()


def test_ssim_properties(field):
    img, _ = field
    rng = np.random.default_rng(3)
    noisy = img + 0.1 * rng.standard_normal(img.shape)
    noisier = img + 0.3 * rng.standard_normal(img.shape)
    s1, s2 = M.ssim(noisy, img), M.ssim(noisier, img)
    assert 0 < s2 < s1 < 1
    # symmetric once both images share one scale (no target-based normalisation involved)
    a = np.clip(noisy, 0, 1)
    b = np.clip(img, 0, 1)
    ab = M._ssim_raw(a, b, 1.0)
    assert ab == pytest.approx(M._ssim_raw(b, a, 1.0))
    # matches skimage with the Wang et al. settings and data_range = 1 after normalisation
    from skimage.metrics import structural_similarity

    pn, tn = M.normalize_pair(noisy, img)
    ref = structural_similarity(
        tn, pn, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert s1 == pytest.approx(ref)


def test_ssim_rejects_tiny_images():
    with pytest.raises(ValueError, match="11x11"):
        M.ssim(np.zeros((8, 8)), np.ones((8, 8)))


def test_psnr_and_nrmse_hand_values():
    t = np.zeros((20, 20))
    t[:, 10:] = 1.0  # normalised target is exactly 0/1
    p = t.copy()
    p[:10, :10] = 0.5  # 100 px off by 0.5 -> MSE = 100*0.25/400
    mse = 100 * 0.25 / 400
    assert M.psnr(p, t) == pytest.approx(10 * np.log10(1 / mse))
    assert M.nrmse(p, t) == pytest.approx(np.sqrt(100 * 0.25) / np.sqrt(200))
    assert M.nrmse(np.zeros_like(t), t) == pytest.approx(1.0)


def test_constant_images_never_nan():
    c = np.full((32, 32), 0.2)
    z = np.zeros((32, 32))
    for pred, targ in [(c, c), (z, c), (c, z), (z, z)]:
        d = M.image_metrics(pred, targ, true_labels=np.zeros((32, 32), np.int32), pixel_size=PS)
        assert np.isnan(d.pop("edge_sharpness"))  # no true nuclei: no rim to measure (documented)
        assert np.isnan(d.pop("rim_slope"))
        for k, v in d.items():
            assert np.isfinite(v), (k, v)
    assert M.image_metrics(c, c)["ssim"] == 1.0


def test_realism_penalises_blur_and_noise(field):
    img, _ = field
    blur = ndi.gaussian_filter(img, 3)
    noisy = img + 0.2 * np.random.default_rng(5).standard_normal(img.shape)
    d_blur = M.realism_distance(blur, img)
    d_noise = M.realism_distance(noisy, img)
    assert d_blur > 0.2 and d_noise > 0.2
    assert M.realism_distance(ndi.gaussian_filter(img, 0.5), img) < d_blur
    # a blurred image lacks high-frequency power
    sp, st = M.radial_log_power(blur), M.radial_log_power(img)
    assert sp[-8:].mean() < st[-8:].mean() - 1


def _shot_noise_field():
    """Smooth-edged discs (like the simulator's blurred DAPI) with Poisson noise, and labels."""
    img, lab = _discs((96, 96), [(24, 24), (24, 70), (70, 48)], 8, value=0.6)
    clean = ndi.gaussian_filter(img, 1.5) + 0.05
    noisy = np.random.default_rng(3).poisson(clean * 400) / 400
    return noisy, lab


def test_edge_sharpness_truth_is_one_blur_lower_contrast_higher():
    t, lab = _shot_noise_field()
    assert M.edge_sharpness(t, t, lab) == pytest.approx(1.0)
    assert M.edge_sharpness(ndi.gaussian_filter(t, 2), t, lab) < 0.8
    assert M.edge_sharpness(ndi.gaussian_filter(t, 4), t, lab) < 0.5
    # twice the contrast (about the background), or an unsharp-masked truth: sharper rims
    bg = np.median(t)
    assert M.edge_sharpness(bg + 2 * (t - bg), t, lab) == pytest.approx(2.0)
    sharpened = t + 1.5 * (t - ndi.gaussian_filter(t, 2))
    assert M.edge_sharpness(sharpened, t, lab) > 1.2
    # the same affine map on both changes nothing; a washed-out prediction alone scores lower
    assert M.edge_sharpness(3 * t + 1, 3 * t + 1, lab) == pytest.approx(1.0)
    assert M.edge_sharpness(0.5 * t, t, lab) == pytest.approx(0.5)


def test_edge_sharpness_smoothing_keeps_shot_noise_out():
    t, lab = _shot_noise_field()
    clean = ndi.gaussian_filter(np.where(lab > 0, 0.6, 0.0), 1.5) + 0.05
    # the noise-free truth against the noisy one: close to 1 with the default smoothing
    assert M.edge_sharpness(clean, t, lab) == pytest.approx(1.0, abs=0.03)
    flat = np.full_like(t, 0.3)
    assert M.edge_sharpness(flat, t, lab) == 0.0
    assert M.edge_sharpness(flat, t, lab, sigma_px=0) == 0.0


def test_edge_sharpness_no_nuclei_is_nan_and_bad_input_raises():
    t, lab = _shot_noise_field()
    assert np.isnan(M.edge_sharpness(t, t, np.zeros_like(lab)))
    assert np.isnan(M.edge_sharpness(t, np.full_like(t, 0.2), lab))  # flat truth: no edge
    with pytest.raises(ValueError, match="true_labels shape"):
        M.edge_sharpness(t, t, lab[:10])
    with pytest.raises(ValueError, match="sigma_px"):
        M.edge_sharpness(t, t, lab, sigma_px=-1)
    with pytest.raises(TypeError, match="integer label"):
        M.edge_sharpness(t, t, lab.astype(float))
    d = M.image_metrics(t, t, true_labels=lab, pixel_size=PS)
    assert d["edge_sharpness"] == pytest.approx(1.0)
    assert "edge_sharpness" not in M.image_metrics(t, t)  # no labels, no rims


def test_rim_slope_sees_blur_and_contrast_but_not_noise():
    """rim_slope: 1 for the truth, lower when blurred or washed out, and, unlike the gradient
    magnitude, not raised by zero-mean noise drawn over a blurred stain."""
    t, lab = _shot_noise_field()
    assert M.rim_slope(t, t, lab) == pytest.approx(1.0)
    blur = ndi.gaussian_filter(t, 3)
    assert M.rim_slope(blur, t, lab) < 0.8
    assert M.rim_slope(0.5 * t, t, lab) == pytest.approx(0.5)
    assert M.rim_slope(3 * t + 1, 3 * t + 1, lab) == pytest.approx(1.0)
    for seed in range(4):
        grain = blur + 0.4 * np.random.default_rng(seed).standard_normal(t.shape)
        assert M.edge_sharpness(grain, t, lab) > M.edge_sharpness(blur, t, lab) + 0.2  # fooled
        assert M.rim_slope(grain, t, lab) == pytest.approx(M.rim_slope(blur, t, lab), abs=0.1)
    inverted = t.max() - t  # dark nuclei: the slope into the nucleus is negative
    assert M.rim_slope(inverted, t, lab) < 0
    assert np.isnan(M.rim_slope(t, t, np.zeros_like(lab)))
    with pytest.raises(ValueError, match="true_labels shape"):
        M.rim_slope(t, t, lab[:10])
    d = M.image_metrics(t, t, true_labels=lab, pixel_size=PS)
    assert d["rim_slope"] == pytest.approx(1.0)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="shape"):
        M.pearson(np.zeros((4, 4)), np.zeros((5, 5)))
    with pytest.raises(ValueError, match="NaN"):
        M.psnr(np.full((16, 16), np.nan), np.zeros((16, 16)))
    with pytest.raises(TypeError):
        M.ssim("a.tif", np.zeros((16, 16)))
    with pytest.raises(ValueError, match="pixel_size"):
        M.segment_nuclei(np.zeros((16, 16)), 0)
    with pytest.raises(TypeError, match="integer label"):
        M.match_nuclei(np.zeros((4, 4)), np.zeros((4, 4), np.int32))
    with pytest.raises(ValueError, match="2D"):
        M.segment_nuclei(np.zeros((2, 16, 16)), PS)


# ------------------------------------------------------------------ segmentation


def test_segment_finds_separate_discs(field):
    img, lab = field
    seg = M.segment_nuclei(img, PS)
    assert seg.dtype == np.int32 and seg.shape == img.shape
    assert seg.max() == 3
    s = M.nuclei_scores(seg, lab)
    assert s["f1"] == 1.0 and s["mean_iou"] > 0.85


def test_segment_splits_touching_and_keeps_elongated_whole():
    img = np.zeros((128, 128))
    for c in (56, 72):  # two r=8 discs, centres 16 px apart: touching
        rr, cc = disk((40, c), 8)
        img[rr, cc] = 0.8
    rr, cc = ellipse(95, 64, 4, 22)  # 3.3 x 18 µm endothelial-like nucleus
    img[rr, cc] = 0.6
    seg = M.segment_nuclei(img, PS)
    assert len(np.unique(seg[30:50, 40:90])) - 1 == 2
    assert len(np.unique(seg[85:105])) - 1 == 1


def test_segment_removes_small_objects_and_ignores_flat_or_noise():
    img, _ = _discs((64, 64), [(32, 32)], 1.5)  # ≈ 7 px = 1.2 µm² < SEG_MIN_AREA_UM2
    img2, _ = _discs((64, 64), [(20, 20), (40, 40)], 8)
    img2 += img
    seg = M.segment_nuclei(img2, PS)
    assert seg.max() == 2
    assert M.segment_nuclei(np.zeros((64, 64)), PS).max() == 0
    noise = 0.01 * np.random.default_rng(0).standard_normal((64, 64))
    assert M.segment_nuclei(noise, PS).max() == 0  # below SEG_MIN_CONTRAST


# ------------------------------------------------------------------ matching & scores


def test_two_discs_vs_one_disc_recall_half():
    _, true = _discs((64, 64), [(20, 20), (44, 44)], 7)
    _, pred = _discs((64, 64), [(20, 20)], 7)
    s = M.nuclei_scores(pred, true)
    assert s["recall"] == 0.5 and s["missed"] == 0.5
    assert s["precision"] == 1.0 and s["hallucinated"] == 0.0
    assert s["f1"] == pytest.approx(2 / 3)
    assert (s["tp"], s["fp"], s["fn"], s["n_pred"], s["n_true"]) == (1, 0, 1, 1, 2)


def test_shifted_disc_below_iou_threshold_is_no_match():
    _, true = _discs((64, 64), [(32, 24)], 8)
    _, pred = _discs((64, 64), [(32, 34)], 8)  # shift 10 px of r=8: IoU ≈ 0.23
    inter = np.sum((true > 0) & (pred > 0))
    union = np.sum((true > 0) | (pred > 0))
    assert inter / union < 0.5
    m = M.match_nuclei(pred, true)
    assert m.tp == 0 and m.fp == 1 and m.fn == 1
    s = M.nuclei_scores(pred, true)
    assert s["recall"] == 0.0 and s["hallucinated"] == 1.0 and s["f1"] == 0.0
    # a small shift stays a match, with the IoU computed by hand
    _, pred2 = _discs((64, 64), [(32, 26)], 8)
    m2 = M.match_nuclei(pred2, true)
    inter = np.sum((true > 0) & (pred2 > 0))
    union = np.sum((true > 0) | (pred2 > 0))
    assert m2.tp == 1 and m2.ious[0] == pytest.approx(inter / union)


def test_hungarian_is_one_to_one_and_label_values_arbitrary():
    _, true = _discs((64, 64), [(20, 20), (44, 44)], 7)
    pred = np.where(true == 1, 17, np.where(true == 2, 5, 0)).astype(np.int32)
    m = M.match_nuclei(pred, true)
    assert sorted(map(tuple, m.pairs.tolist())) == [(5, 2), (17, 1)]
    # one predicted blob covering both nuclei matches at most one of them
    merged = (true > 0).astype(np.int32)  # IoU exactly 0.5 with each disc
    m2 = M.match_nuclei(merged, true)
    assert (m2.tp, m2.fp, m2.fn) == (1, 0, 1)


def test_empty_cases_defined():
    z = np.zeros((32, 32), np.int32)
    _, one = _discs((32, 32), [(16, 16)], 6)
    assert M.nuclei_scores(z, z) == {
        "recall": 1.0,
        "precision": 1.0,
        "f1": 1.0,
        "missed": 0.0,
        "hallucinated": 0.0,
        "mean_iou": 0.0,
        "tp": 0,
        "fp": 0,
        "fn": 0,
        "n_pred": 0,
        "n_true": 0,
        "n_ignored": 0,
    }
    s = M.nuclei_scores(z, one)  # empty prediction
    assert (s["recall"], s["precision"], s["f1"], s["hallucinated"]) == (0.0, 0.0, 0.0, 0.0)
    s = M.nuclei_scores(one, z)  # nothing to find, one invented
    assert (s["recall"], s["precision"], s["f1"], s["hallucinated"]) == (1.0, 0.0, 0.0, 1.0)


def test_recall_by_contrast_bins():
    _, true = _discs((64, 64), [(16, 16), (16, 48), (48, 16), (48, 48)], 6)
    pred = np.where(np.isin(true, [1, 3]), true, 0).astype(np.int32)  # finds nuclei 1 and 3
    cnr = np.array([0.2, -0.3, 3.0, -5.0])  # |CNR| bins: [0,.5) x2, [2,4), [4,inf)
    bins = M.recall_by_contrast(M.match_nuclei(pred, true), cnr)
    by_lo = {b["lo"]: b for b in bins}
    assert (by_lo[0.0]["n_true"], by_lo[0.0]["n_matched"], by_lo[0.0]["recall"]) == (2, 1, 0.5)
    assert by_lo[2.0]["recall"] == 1.0 and by_lo[4.0]["recall"] == 0.0
    assert by_lo[4.0]["hi"] is None
    assert by_lo[0.5]["n_true"] == 0 and by_lo[0.5]["recall"] is None
    with pytest.raises(ValueError, match="nucleus_cnr"):
        M.recall_by_contrast(M.match_nuclei(pred, true), cnr[:2])


# ------------------------------------------------------------------ hard subset


def _sample():
    img, true = _discs((96, 96), [(20, 20), (20, 70), (70, 20), (70, 70)], 7)
    distr = np.zeros_like(true)
    rr, cc = disk((48, 48), 4)
    distr[rr, cc] = 1  # a red blood cell in the middle
    return SimpleNamespace(
        dapi=img,
        nuclei=true,
        distractors=distr,
        nucleus_cnr=np.array([0.3, 5.0, 4.0, 6.0]),  # nucleus 1: low contrast
        nucleus_in_section=np.array([1.0, 0.2, 1.0, 1.0]),  # nucleus 2: out of section
        pixel_size=PS,
    )


def test_hard_subset_recall_and_distractor_hallucinations():
    s = _sample()
    pred = np.where(np.isin(s.nuclei, [2, 3, 4]), s.nuclei, 0).astype(np.int32)  # misses #1
    rr, cc = disk((48, 55), 3)  # invented object touching the RBC (r = 4 at (48, 48))
    pred[rr, cc] = 10
    rr, cc = disk((90, 48), 3)  # invented object far from any distractor
    pred[rr, cc] = 11
    h = M.hard_subset_scores(s, pred)
    assert h["n_hard"] == 2 and h["tp_hard"] == 1 and h["hard_recall"] == 0.5
    assert (h["n_low_contrast"], h["low_contrast_recall"]) == (1, 0.0)
    assert (h["n_out_of_section"], h["out_of_section_recall"]) == (1, 1.0)
    assert h["hallu_near_distractors"] == 1 and h["n_distractors"] == 1
    assert h["hallu_near_distractors_rate"] == pytest.approx(1 / 5)
    # hard F1: TP 1, FN 1, FP (near distractors) 1
    assert h["hard_f1"] == pytest.approx(2 / 4)


def test_hard_subset_distance_threshold_in_microns():
    s = _sample()
    pred = np.zeros_like(s.nuclei)
    # a 2 px object whose nearest pixel is 10 px = 4.1 µm from the RBC edge: not "near" at 3 µm
    pred[48, 62:64] = 1
    gap = ndi.distance_transform_edt(s.distractors == 0, sampling=PS)[48, 62]
    assert gap > M.DISTRACTOR_RADIUS_UM
    assert M.hard_subset_scores(s, pred)["hallu_near_distractors"] == 0
    assert M.hard_subset_scores(s, pred, radius_um=gap + 0.01)["hallu_near_distractors"] == 1


def test_hard_nuclei_mask_definition():
    m = M.hard_nuclei_mask([0.5, -0.9, 1.5, -3.0, 2.0], [1.0, 1.0, 1.0, 1.0, 0.4])
    assert m.tolist() == [True, True, False, False, True]


def test_image_metrics_one_dict_with_everything():
    s = _sample()
    d = M.image_metrics(s.dapi, s.dapi, sample=s)
    for k in ("pearson", "ssim", "psnr", "nrmse", "realism", "recall", "f1", "hard_recall"):
        assert k in d
    assert d["pearson"] == pytest.approx(1.0) and d["f1"] == 1.0 and d["hard_recall"] == 1.0
    with pytest.raises(ValueError, match="pixel_size"):
        M.image_metrics(s.dapi, s.dapi, true_labels=s.nuclei)


def test_unlabelled_dapi_objects_are_ignored_not_hallucinated():
    dapi, lab = _discs((96, 96), [(24, 24), (70, 70)], 8)
    true = np.where(lab == 1, 1, 0).astype(np.int32)  # the second disc is visible but unlabelled
    d = M.image_metrics(dapi, dapi, true_labels=true, pixel_size=PS)
    assert (d["tp"], d["fp"], d["n_ignored"], d["precision"]) == (1, 0, 1, 1.0)
    d0 = M.image_metrics(dapi, dapi, true_labels=true, pixel_size=PS, ignore=None)
    assert (d0["tp"], d0["fp"], d0["n_ignored"], d0["precision"]) == (1, 1, 0, 0.5)
    # an invented object where the true DAPI is dark still counts as a hallucination
    pred = dapi.copy()
    rr, cc = disk((24, 70), 8)
    pred[rr, cc] = 0.8
    d1 = M.image_metrics(pred, dapi, true_labels=true, pixel_size=PS)
    assert (d1["tp"], d1["fp"], d1["n_ignored"]) == (1, 1, 1)
    assert d1["hallucinated"] == 0.5
    mask = M.unlabelled_mask(dapi, true, PS)
    assert mask[70, 70] and not mask[24, 24] and not mask[24, 70]


def test_haze_does_not_merge_nuclei():
    img, lab = _discs((128, 128), [(40, 40), (40, 66), (80, 52)], 7, value=0.4)
    yy, xx = np.mgrid[:128, :128]
    haze = 0.5 * np.exp(-((yy - 55) ** 2 + (xx - 55) ** 2) / (2 * 25.0**2))  # broad bright haze
    seg = M.segment_nuclei(img + haze, PS)
    assert M.nuclei_scores(seg, lab)["f1"] == 1.0
    plain = M.segment_nuclei(img + haze, PS, background_um=0)  # without haze removal: merged
    assert M.nuclei_scores(plain, lab)["f1"] < 1.0


def test_background_dominates_pixel_metrics():
    """An all-black prediction of a sparse field: decent SSIM, yet not one nucleus found."""
    img, lab = _discs((128, 128), [(30, 30), (90, 90)], 7)
    d = M.image_metrics(np.zeros_like(img), img, true_labels=lab, pixel_size=PS)
    assert d["ssim"] > 0.7
    assert d["recall"] == 0.0 and d["f1"] == 0.0


def test_stack_samples_need_one_plane():
    s = _sample()
    stack = SimpleNamespace(
        qobm=np.stack([s.dapi, s.dapi]),
        dapi=np.stack([s.dapi, s.dapi * 0]),
        nuclei=np.stack([s.nuclei, s.nuclei]),
        distractors=np.stack([s.distractors, s.distractors]),
        nucleus_cnr=np.stack([s.nucleus_cnr, s.nucleus_cnr]),
        nucleus_in_section=np.stack([s.nucleus_in_section, s.nucleus_in_section]),
        pixel_size=PS,
    )
    with pytest.raises(ValueError, match="sample_plane"):
        M.hard_subset_scores(stack, s.nuclei)
    plane = M.sample_plane(stack, 0)
    assert M.hard_subset_scores(plane, s.nuclei)["hard_recall"] == 1.0
    with pytest.raises(ValueError, match="not a Z stack"):
        M.sample_plane(s, 0)


def test_nuclear_brightness_measures_how_bright_true_nuclei_are_painted():
    labels = np.zeros((40, 40), np.int32)
    labels[5:15, 5:15] = 1  # clear in the phase
    labels[25:35, 25:35] = 2  # faint in the phase
    truth = np.where(labels > 0, 0.9, 0.1)
    cnr = [6.0, -0.5]
    half = np.where(labels == 1, 0.5, np.where(labels == 2, 0.9, 0.1))  # clear at half contrast
    d = M.nuclear_brightness(half, truth, labels, cnr)
    assert d["clear"] == {"pred": pytest.approx(0.4), "truth": pytest.approx(0.8), "n": 1}
    assert d["all"]["n"] == 2 and d["all"]["pred"] == pytest.approx(1.2)
    pooled = M.pool_brightness([d, M.nuclear_brightness(truth, truth, labels, cnr)])
    assert pooled["clear"] == pytest.approx((0.4 + 0.8) / 1.6)
    assert pooled["all"] == pytest.approx((1.2 + 1.6) / 3.2)
    assert M.pool_brightness([M.nuclear_brightness(truth, truth, labels * 0, cnr)]) == {
        "clear": None, "all": None}  # fmt: skip
    with pytest.raises(ValueError, match="nucleus_cnr"):
        M.nuclear_brightness(truth, truth, labels, [6.0])
