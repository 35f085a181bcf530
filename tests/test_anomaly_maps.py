"""Anomaly maps: upsampling and combination, image scores, pixel AUROC, thresholds, boxes, rendering."""
import cv2
import numpy as np
import pytest

from defectflow.anomaly_maps import (AnomalyMapError, Box, MapExtractor, anomaly_maps, boxes_from_map,
                                     combine_levels, contact_sheet, draw_boxes, f1_pixel_threshold,
                                     gaussian_ksize, good_pixel_threshold, image_scores, level_stats, load_mask,
                                     map_grid, overlay, pixel_auroc)


def test_maps_upsample_average_and_keep_the_hot_spot_in_place():
    lv0 = np.zeros((2, 8, 8), np.float32)
    lv0[0, 2, 5] = 8.0                       # image 0: hot cell at row 2, col 5 of an 8x8 grid
    lv1 = np.zeros((2, 4, 4), np.float32)
    lv1[0, 1, 2] = 4.0                       # the same place on the coarser level
    out = anomaly_maps([lv0, lv1], (64, 64), sigma=2.0)
    assert out.shape == (2, 64, 64) and out.dtype == np.float32
    y, x = np.unravel_index(np.argmax(out[0]), out[0].shape)
    assert 16 <= y < 24 and 40 <= x < 48     # inside the cell (8 px per cell)
    assert np.allclose(out[1], 0.0)
    no_blur = anomaly_maps([lv0, lv1], (64, 64), sigma=0.0)
    assert no_blur[0].max() > out[0].max()   # the blur spreads the peak
    # levels are averaged: a single level at twice the value gives the same map
    one = anomaly_maps([np.zeros((1, 4, 4), np.float32) + 2.0, np.zeros((1, 2, 2), np.float32)], (8, 8), 0.0)
    assert np.allclose(one, 1.0)
    with pytest.raises(AnomalyMapError):
        anomaly_maps([lv0, lv1[:1]], (64, 64))


def test_maps_are_blurred_on_a_coarse_grid_and_match_a_full_size_blur():
    """Levels are combined and blurred at three samples per finest cell, then upsampled: the result
    stays within 2% of the peak of blurring at image size, and the grid's max score within 4%."""
    assert map_grid([(28, 28), (14, 14), (7, 7)], (224, 224)) == (84, 84)
    assert map_grid([(4, 4)], (4, 4)) == (4, 4)                      # never above image size
    rng = np.random.default_rng(0)
    levels = [rng.random((3, 28, 28), dtype=np.float32), rng.random((3, 14, 14), dtype=np.float32)]
    levels[0][1, 10, 20] = 6.0                                      # a defect-like spike
    grid = combine_levels(levels, (224, 224), sigma=4.0)
    assert grid.shape == (3, 84, 84)
    full = anomaly_maps(levels, (224, 224), sigma=4.0)
    k = gaussian_ksize(4.0)
    ref = np.stack([cv2.GaussianBlur(np.mean([cv2.resize(lv[i], (224, 224)) for lv in levels], axis=0), (k, k), 4.0,
                                     borderType=cv2.BORDER_REFLECT_101) for i in range(3)])
    assert np.abs(full - ref).max() <= 0.02 * ref.max()
    assert np.all(image_scores(full, "max") <= image_scores(grid, "max") + 1e-6)
    # the grid samples the spike's cell centre, which 224 px pixel centres miss by 1/16 cell: a little higher
    np.testing.assert_allclose(image_scores(grid, "max"), image_scores(ref, "max"), rtol=0.04)
    assert np.unravel_index(np.argmax(full[1]), (224, 224)) == np.unravel_index(np.argmax(ref[1]), (224, 224))


def test_level_norm_standardises_each_level():
    a = np.full((2, 4, 4), 10.0, np.float32)
    a[0, 0, 0] = 12.0
    stats = level_stats([a])
    out = anomaly_maps([a], (4, 4), sigma=0.0, level_norm=stats)
    assert abs(out.mean()) < 1e-5 and out[0, 0, 0] == out.max()


def test_image_scores():
    maps = np.zeros((2, 10, 10), np.float32)
    maps[0, 0, 0] = 5.0
    maps[1] = 1.0
    assert image_scores(maps, "max").tolist() == [5.0, 1.0]
    top = image_scores(maps, "topk", top_fraction=0.02)          # top 2 pixels
    assert top.tolist() == pytest.approx([2.5, 1.0])
    with pytest.raises(AnomalyMapError):
        image_scores(maps, "median")


def test_pixel_auroc_counts_good_images_as_all_zero_masks():
    maps = np.zeros((3, 4, 4), np.float32)
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    maps[0][mask] = 1.0                       # a perfect map for the defective image
    assert pixel_auroc(maps, [mask, None, None]) == 1.0
    maps[1, 0, 0] = 2.0                       # a hot pixel on a good image lowers it
    assert pixel_auroc(maps, [mask, None, None]) < 1.0
    assert pixel_auroc(maps, [None, None, None]) is None
    with pytest.raises(AnomalyMapError):
        pixel_auroc(maps, [mask])


def test_pixel_auroc_streamed_in_bins_matches_the_exact_value():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(4)
    maps = rng.gamma(2.0, 1.0, (12, 32, 32)).astype(np.float32)
    masks = [None] * 12
    for i in range(0, 12, 3):                      # four defective images: a brighter blob
        m = np.zeros((32, 32), bool)
        y, x = rng.integers(4, 24, 2)
        m[y:y + 6, x:x + 5] = True
        maps[i][m] += rng.uniform(0.5, 3.0)
        masks[i] = m
    maps[5, :4, :4] = 0.0                          # ties too
    y = np.stack([np.zeros((32, 32), bool) if m is None else m for m in masks])
    exact = roc_auc_score(y.ravel(), maps.ravel())
    assert 0.6 < exact < 0.99
    assert pixel_auroc(maps, masks) == pytest.approx(exact, abs=1e-4)
    assert pixel_auroc(list(maps), masks) == pixel_auroc(maps, masks)
    assert abs(pixel_auroc(maps, masks, bins=16) - exact) > 1e-4        # the bins are what makes it exact enough


def test_load_mask_resizes_and_none_is_empty(tmp_path):
    m = np.zeros((100, 100), np.uint8)
    m[10:60, 20:40] = 255
    cv2.imwrite(str(tmp_path / "m.png"), m)
    got = load_mask(tmp_path / "m.png", (10, 10))
    assert got.dtype == bool and got.shape == (10, 10)
    assert got[1:6, 2:4].all() and got.sum() == 10
    assert not load_mask(None, (5, 7)).any() and load_mask(None, (5, 7)).shape == (5, 7)


def test_thresholds():
    rng = np.random.default_rng(0)
    good = rng.normal(size=(4, 50, 50)).astype(np.float32)
    thr = good_pixel_threshold(good, fpr=0.01)
    assert (good > thr).mean() == pytest.approx(0.01, abs=0.002)
    maps = rng.normal(size=(2, 20, 20)).astype(np.float32)
    mask = np.zeros((20, 20), bool)
    mask[5:10, 5:10] = True
    maps[0][mask] += 10.0
    t, f1 = f1_pixel_threshold(maps, [mask, None])
    assert f1 == 1.0 and maps[0][mask].min() >= t > np.delete(maps.ravel(), np.flatnonzero(
        np.stack([mask, np.zeros_like(mask)]).ravel())).max()


def test_boxes_from_components():
    amap = np.zeros((100, 200), np.float32)
    amap[10:30, 20:60] = 3.0                  # big region, peak 5
    amap[15, 25] = 5.0
    amap[70:90, 150:160] = 2.0                # second region
    amap[50, 100] = 9.0                       # a single hot pixel: below min_area
    boxes = boxes_from_map(amap, 1.0, min_area=10)
    assert [(b.x0, b.y0, b.x1, b.y1) for b in boxes] == [(20, 10, 60, 30), (150, 70, 160, 90)]
    assert boxes[0].confidence == 5.0 and boxes[0].score_max == 5.0
    assert boxes[0].score_mean == pytest.approx((3.0 * 799 + 5.0) / 800)
    assert boxes[0].area == 800
    by_mean = boxes_from_map(amap, 1.0, min_area=10, confidence="mean")
    assert by_mean[0].confidence == pytest.approx(boxes[0].score_mean)
    # scaled to the original image (width 400, height 50), x1/y1 exclusive
    scaled = boxes_from_map(amap, 1.0, min_area=0.001, image_size=(400, 50))
    assert (scaled[0].x0, scaled[0].y0, scaled[0].x1, scaled[0].y1) == (40, 5, 120, 15)
    assert len(scaled) == 2                   # 0.001 * 20000 = 20 px > the single hot pixel
    assert boxes_from_map(np.zeros((10, 10), np.float32), 1.0) == []
    assert isinstance(boxes[0].to_dict(), dict)


def test_overlay_boxes_and_sheet():
    img = np.full((40, 60, 3), 0.5, np.float32)
    amap = np.zeros((10, 15), np.float32)
    amap[2:4, 2:4] = 1.0
    ov = overlay(img, amap, 0.0, 1.0)
    assert ov.shape == (40, 60, 3) and ov.dtype == np.uint8
    assert ov[10, 10, 2] > ov[35, 55, 2]      # hot = red (BGR channel 2)
    drawn = draw_boxes(ov, [Box(5, 5, 20, 20, 0.9, 0.9, 0.5, 10)])
    assert (drawn != ov).any() and (ov == overlay(img, amap, 0.0, 1.0)).all()
    sheet = contact_sheet([drawn] * 5, cols=4, captions=["a"] * 5)
    assert sheet.shape[1] == 4 * 64 + 4 and sheet.shape[0] == 2 * (40 + 18 + 4) + 4


def test_map_extractor_shapes(tmp_path):
    fx = MapExtractor("efficientnet_lite0", image_size=64, levels=(0, 1), pretrained=False, threads=1,
                      cache=tmp_path)
    img = np.random.default_rng(0).random((80, 70, 3)).astype(np.float32)
    cv2.imwrite(str(tmp_path / "a.png"), (img * 255).astype(np.uint8))
    maps = fx.extract([tmp_path / "a.png", tmp_path / "a.png"], n_transforms=2)
    assert [m.shape for m in maps] == [(4, 40, 8, 8), (4, 112, 4, 4)]
    assert fx.channels == [40, 112] and fx.strides == [8, 16]
    assert np.allclose(maps[0][0], maps[0][2], atol=1e-5)     # same image, same transform
    with pytest.raises(AnomalyMapError):
        MapExtractor("efficientnet_lite0", image_size=64, levels=(5,), pretrained=False, cache=tmp_path)


def test_maps_and_scores_with_a_conv_model():
    import torch

    from defectflow.anomaly_maps import maps_and_scores
    from defectflow.density.conv import ConvFlow

    model = ConvFlow([4, 6], n_blocks=1, seed=0)
    maps = [np.zeros((2, 4, 8, 8), np.float32), np.zeros((2, 6, 4, 4), np.float32)]
    maps[0][1, :, 3, 3] = 6.0                                  # image 1 has an outlier at one position
    amaps, scores = maps_and_scores(model, maps, (32, 32), sigma=1.0)
    assert amaps.shape == (2, 32, 32) and scores.shape == (2,)
    assert scores[1] > scores[0]
    y, x = np.unravel_index(np.argmax(amaps[1]), (32, 32))
    assert 12 <= y < 16 and 12 <= x < 16
    assert isinstance(model.nll_per_dim_maps([torch.from_numpy(m) for m in maps])[0], torch.Tensor)
