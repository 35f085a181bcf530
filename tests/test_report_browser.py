"""The report in headless Chromium: images show, the H.264 video plays, nothing is fetched from outside.

CI installs Chromium (.ci/run); without it these tests are skipped with the reason.
"""
import json

import cv2
import numpy as np
import pandas as pd
import pytest

from tests.browser_check import chromium, open_report, problems

pytestmark = pytest.mark.skipif(chromium() is None, reason="chromium not installed (.ci/run installs it)")


def _small_report(tmp_path):
    from defectflow.annotate import Mp4Writer
    from defectflow.config import params_from_dict
    from defectflow.reporting.build import ReportInputs, build_report

    out = tmp_path / "rep"
    (out / "videos").mkdir(parents=True)
    rows = []
    for i, (pid, cam, score) in enumerate([("p1", "cam0", 3.0), ("p1", "cam1", 0.4), ("p2", "cam0", 0.2)]):
        img = tmp_path / f"{pid}_{cam}.png"
        cv2.imwrite(str(img), np.full((40, 50, 3), 60 * i, np.uint8))
        rows.append({"item_id": f"{pid}-{cam}", "product_id": pid, "run": "r1", "split": "test", "camera": cam,
                     "image_path": str(img), "label": "unknown", "defect_type": None, "score": score,
                     "pred_defect": score >= 1.0})
    scored = pd.DataFrame(rows)
    verdicts = pd.DataFrame({"product_id": ["p1", "p2"], "run": "r1", "split": "test", "label": "unknown",
                             "n_cameras": [2, 1], "max_score": [3.0, 0.2], "flagged_cameras": ["cam0", ""],
                             "verdict": ["defect", "good"]})
    w = Mp4Writer(out / "videos" / "r1_cam0.mp4", fps=10)
    for k in range(15):
        w.write(np.full((48, 64, 3), 10 * k, np.uint8))
    w.close()
    qa = build_report(ReportInputs(kind="score", line="line-1", params=params_from_dict({}), model_dir=tmp_path / "m",
                                   data_manifest=tmp_path / "none.parquet", thr_info={"threshold": 1.0},
                                   scored=scored, verdicts=verdicts, videos=[out / "videos" / "r1_cam0.mp4"],
                                   history_file=tmp_path / "history.jsonl"), out, pdf=False)
    return out / "report.html", qa


def test_report_loads_cleanly_in_chromium(tmp_path):
    html, qa = _small_report(tmp_path)
    assert qa["flagged"] == 1 and qa["passed"] == 1
    result = open_report(html, tmp_path / "shot.png")
    assert problems(result) == [], json.dumps(result)[:2000]
    assert len(result["images"]) >= 3 and result["videos"][0]["duration"] == pytest.approx(1.5, abs=0.2)
    shot = cv2.imread(str(tmp_path / "shot.png"))
    assert shot.shape[:2] == (900, 1280) and shot.std() > 5        # a page was drawn, not a blank


def test_check_catches_broken_images_dead_videos_and_remote_requests(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text('<html><body><img src="missing.png"><img src="http://example.com/a.png">'
                    '<video src="nothing.mp4"></video></body></html>')
    found = problems(open_report(page))
    assert any("broken image" in p and "missing.png" in p for p in found)
    assert any("leaves the machine: http://example.com/a.png" in p for p in found)
    assert any("video does not load" in p and "nothing.mp4" in p for p in found)
