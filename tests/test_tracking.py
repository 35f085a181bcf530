"""Tracking building blocks: background start, candidates and splitting, lanes, association, counting."""
from __future__ import annotations

import numpy as np
import pytest

from defectflow.config import FramesParams, ParamsError, params_from_dict
from defectflow.tracking.association import BeltAssociation, NorfairAssociation, iou
from defectflow.tracking.candidates import (LengthEstimate, end_band, find_candidates, masked_background,
                                            mode_background)
from defectflow.tracking.lanes import DEFAULT_LANE, Grid, Lane, lanes_for_camera
from defectflow.tracking.tracker import LaneTracker

RIGHT = np.array([1.0, 0.0])


def _lane_masks(w=160, h=60):
    lane = np.ones((h, w), np.uint8)
    poly = np.array([[0, 0], [w, 0], [w, h], [0, h]], float)
    return lane, end_band(lane, poly, RIGHT)


def test_background_starts_right_while_products_cover_most_of_the_belt():
    rng = np.random.default_rng(0)
    belt = rng.uniform(50, 70, (40, 60)).astype(np.float32)
    frames = []
    for _ in range(40):
        f = belt + rng.normal(0, 2, belt.shape).astype(np.float32)
        covered = rng.random(belt.shape) < 0.6                       # products over 60% of the time
        f[covered] = rng.uniform(120, 250, covered.sum())
        frames.append(f)
    assert np.abs(np.median(np.stack(frames), axis=0) - belt).mean() > 40   # a median would take the products
    mode = mode_background(frames)
    assert np.median(np.abs(mode - belt)) < 3
    covers = [np.zeros(belt.shape, np.uint8) for _ in frames]
    for f, c in zip(frames, covers):
        c[f > 100] = 1                                               # what a first pass would box
    assert np.abs(masked_background(frames, covers, mode) - belt).max() < 8


def test_touching_products_are_split_at_the_product_length():
    lane, ends = _lane_masks()
    moving = np.zeros_like(lane)
    moving[20:50, 30:90] = 1                                         # two 30 px products touching
    moving[20:50, 110:138] = 1                                       # one alone
    cands = find_candidates(moving, lane, ends, 20, RIGHT, LengthEstimate(30.0))
    assert sorted(c.box for c in cands) == [(30, 20, 60, 50), (60, 20, 90, 50), (110, 20, 138, 50)]
    assert [c.split for c in sorted(cands, key=lambda c: c.box)] == [True, True, False]
    one = find_candidates(moving, lane, ends, 20, RIGHT, LengthEstimate(45.0))   # 60 < 1.5 x 45: one product
    assert len(one) == 2


def test_a_cut_moves_to_a_neck_and_a_blob_across_the_lane_keeps_the_phase_of_its_necks():
    lane, ends = _lane_masks()
    moving = np.zeros_like(lane)
    moving[20:50, 30:96] = 1
    moving[20:24, 62:70] = 0                                         # a neck at 62..70, not at the middle 63
    moving[46:50, 62:70] = 0
    cands = sorted(c.box[0] for c in find_candidates(moving, lane, ends, 20, RIGHT, LengthEstimate(33.0)))
    assert cands[0] == 30 and 62 <= cands[1] <= 70
    across = np.zeros_like(lane)
    across[20:50, :] = 1                                             # products of 40 px fill the lane
    for x in (25, 65, 105, 145):
        across[20:30, x - 2:x + 2] = 0                               # the gaps between them
    boxes = sorted(c.box[0] for c in find_candidates(across, lane, ends, 20, RIGHT, LengthEstimate(40.0)))
    assert [b for b in boxes if b > 0] == pytest.approx([25, 65, 105, 145], abs=2)


def test_length_estimate_is_not_fooled_by_fragments():
    est = LengthEstimate()
    for _ in range(20):
        est.add(30.0, 900.0)                                         # whole products
        est.add(6.0, 40.0)                                           # label fragments: small
        est.add(60.0, 1800.0)                                        # touching pairs
    assert est.value() == 30.0
    assert LengthEstimate(12.0).value() == 12.0


def test_lane_end_band_only_where_products_enter_and_leave():
    lane, ends = _lane_masks()
    assert ends[:, :3].all() and ends[:, -3:].all()
    assert not ends[10:50, 10:150].any()                             # not along the sides


def test_lanes_per_camera_and_region_errors_name_the_key():
    fp = params_from_dict({"frames": {"region": [[0, 0.5], [1, 0.5], [1, 1], [0, 1]], "lanes": [
        {"name": "far", "region": [0, 0, 1, 0.4], "cameras": ["top"], "direction": "right_to_left"}]}}).frames
    (main,) = lanes_for_camera(fp, "side", 100, 50)
    assert main.name == DEFAULT_LANE and main.polygon[:, 1].min() == 25 and main.direction is None
    (far,) = lanes_for_camera(fp, "top", 100, 50)
    assert far.name == "far" and list(far.direction) == [-1.0, 0.0] and far.polygon[:, 1].max() == 20
    grid = Grid([main], (50, 100, 3))
    assert grid.masks[0].shape == (grid.size[1], grid.size[0]) and grid.masks[0].mean() > 0.9
    assert grid.to_grid(grid.to_frame((2, 3, 10, 12))) == (2, 3, 10, 12)
    with pytest.raises(ParamsError, match=r"frames\.lanes\.0\.region"):
        params_from_dict({"frames": {"lanes": [{"name": "a", "region": [[0, 0], [1.2, 0], [0, 1]]}]}})
    with pytest.raises(ParamsError, match=r"frames\.region.*at least 3"):
        params_from_dict({"frames": {"region": [[0, 0], [1, 1]]}})
    with pytest.raises(ParamsError, match="unique"):
        params_from_dict({"frames": {"lanes": [{"name": "a", "region": [0, 0, 1, 1]}] * 2}})


@pytest.mark.parametrize("backend", [BeltAssociation, NorfairAssociation])
def test_association_keeps_ids_of_products_in_lockstep_through_a_stop(backend):
    assoc = backend(lost_updates=3)
    ids = []
    for t, x in enumerate([0, 20, 40, 60, 60, 60, 60, 80, 100]):     # moves, stops, goes
        out = assoc.update([(x + 10, 10, x + 50, 40), (x + 52, 10, x + 92, 40)])
        ids.append(sorted(tid for tid, _, _ in out))
    assert ids[-1] == ids[2] and len(ids[-1]) == 2                   # the same two tracks throughout
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)


def _lane_tracker(direction=RIGHT, **kw):
    lane = Lane("main", np.array([[0, 0], [200, 0], [200, 60], [0, 60]], float), direction)
    return LaneTracker(lane, stride=1, max_lost_frames=3, min_pass_frames=3, min_travel=0.25, **kw)


def _run(lt, xs, width=30):
    starts = []
    for t, x in enumerate(xs):
        starts += lt.update(t, [] if x is None else [(x, 10, x + width, 40)])
    lt.flush()
    return starts, lt.ended()


def test_counted_once_at_the_line_even_when_it_stops_and_backs_up():
    xs = list(range(0, 90, 6)) + [88, 84, 80, 84, 88, 92] + list(range(96, 180, 6))   # crosses x=100 at 70
    starts, ended = _run(_lane_tracker(), xs)
    assert len(starts) == 1 and [ok for _, ok in ended] == [True]
    cap = starts[0]
    assert abs(xs[cap.center] + 15 - 100) <= 6                       # centre frame nearest the crossing
    back = list(range(0, 78, 6)) + list(range(78, 0, -6))            # reaches the line, goes back
    assert [ok for _, ok in _run(_lane_tracker(), back)[1]] in ([], [False])


def test_not_counted_when_it_leaves_before_the_line_or_does_not_travel():
    starts, ended = _run(_lane_tracker(), list(range(0, 60, 6)) + [None] * 6)   # lost before the line
    assert not starts and all(not ok for _, ok in ended)
    starts, ended = _run(_lane_tracker(), [84, 86, 84, 86, 84, 86] * 3)        # jitters across the line
    assert all(not ok for _, ok in ended)


def test_auto_direction_from_the_tracks():
    lt = _lane_tracker(direction=None)
    starts, ended = _run(lt, list(range(190, 10, -6)))                # right to left
    assert list(np.round(lt.direction())) == [-1, 0]
    assert len(starts) == 1 and [ok for _, ok in ended] == [True]


def test_frames_params_defaults():
    fp = FramesParams()
    assert (fp.direction, fp.stride, fp.tracker, fp.lanes, fp.product_length) == ("auto", 3, "belt", None, None)
