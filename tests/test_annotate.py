import cv2
import numpy as np
import pandas as pd

from defectflow.annotate import GREEN, RED, annotate_videos, pass_tracks


def _rows(frames, x0s, product="p0", camera="cam0", video="v.avi"):
    return pd.DataFrame({"product_id": product, "camera": camera, "video_path": video,
                         "frame_index": frames, "box_x0": x0s, "box_y0": 10, "box_x1": [x + 20 for x in x0s],
                         "box_y1": 40})


def test_track_extrapolates_straight_motion():
    track = pass_tracks(_rows([10, 11, 12], [30, 34, 38]), extend=5)
    assert min(track) == 5 and max(track) == 17
    assert track[12] == (38, 10, 58, 40)
    assert track[15][0] == 50 and track[5][0] == 10


def test_annotated_video_has_boxes_in_verdict_colours(tmp_path):
    video = tmp_path / "run_cam0.avi"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (120, 60))
    for _ in range(20):
        w.write(np.full((60, 120, 3), 128, np.uint8))
    w.release()
    rows = pd.concat([_rows([5, 6, 7], [10, 12, 14], "bad", video=str(video)),
                      _rows([5, 6, 7], [70, 72, 74], "fine", video=str(video))])
    scored = pd.DataFrame({"product_id": ["bad", "fine"], "camera": "cam0", "score": [2.0, 0.1]})
    verdicts = pd.DataFrame({"product_id": ["bad", "fine"], "verdict": ["defect", "good"]})
    out = annotate_videos(rows, scored, verdicts, threshold=1.0, out_dir=tmp_path / "videos")
    assert [p.name for p in out] == ["run_cam0.mp4"]
    cap = cv2.VideoCapture(str(out[0]))
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    assert len(frames) == 20
    f6 = frames[6].astype(int)
    # left edge of each box, away from the label: red for the flagged one, green for the good one
    assert np.abs(f6[30, 12] - np.array(RED)).max() < 60
    assert np.abs(f6[30, 72] - np.array(GREEN)).max() < 60
    assert np.abs(frames[19].astype(int) - 128).max() < 20  # no box long after the pass


def test_mp4_writer_is_h264_yuv420p_and_pads_odd_sizes(tmp_path):
    import av

    from defectflow.annotate import Mp4Writer

    w = Mp4Writer(tmp_path / "odd.mp4", fps=12.5)
    for i in range(6):
        w.write(np.full((31, 45, 3), 40 * i, np.uint8))
    w.close()
    with av.open(str(tmp_path / "odd.mp4")) as c:
        s = c.streams.video[0]
        assert s.codec_context.name == "h264" and s.codec_context.pix_fmt == "yuv420p"
        assert (s.codec_context.width, s.codec_context.height) == (46, 32)
        assert sum(1 for _ in c.decode(video=0)) == 6
