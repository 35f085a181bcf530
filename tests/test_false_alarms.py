"""The conformal threshold holds its false-alarm rate; intervals; the good-score shift test."""
import numpy as np
import pytest

from defectflow.false_alarms import (binomial_ci, conformal_threshold, false_alarm_summary, needed_good_images,
                                     score_shift)


@pytest.mark.parametrize("alpha,n", [(0.05, 40), (0.1, 25), (0.02, 60)])
def test_conformal_threshold_holds_its_rate_on_exchangeable_scores(alpha, n):
    from scipy.stats import gamma

    rng = np.random.default_rng(0)
    rates = []
    for _ in range(2000):
        fit = conformal_threshold(rng.gamma(2.0, size=n), alpha)
        rates.append(float(gamma.sf(fit["threshold"], 2.0)))      # the rate it gives every future good image
    mean = float(np.mean(rates))
    # promised: alpha - 1/(n+1) <= rate <= alpha, up to the simulation's noise
    assert alpha - 1 / (n + 1) - 0.004 <= mean <= alpha + 0.004
    assert fit["expected_fpr"] <= alpha and fit["enough"]
    lo, hi = fit["fpr_range95"]
    inside = np.mean([lo <= r <= hi for r in rates])      # the realised rates spread as Beta(n + 1 - k, k) says
    assert 0.9 <= inside <= 0.99


def test_plain_quantile_would_not_hold_but_conformal_does():
    """The bias the issue saw: a plain (interpolated) quantile of few good scores flags more than asked."""
    rng = np.random.default_rng(1)
    plain, conf = [], []
    for _ in range(3000):
        cal, new = rng.normal(size=20), rng.normal(size=100)
        plain.append((new >= np.quantile(cal, 0.9)).mean())
        conf.append((new >= conformal_threshold(cal, 0.1)["threshold"]).mean())
    assert np.mean(plain) > 0.11 and np.mean(conf) <= 0.101


def test_too_few_calibration_images_are_named_with_the_count_needed():
    assert needed_good_images(0.05) == 19 and needed_good_images(0.02) == 49 and needed_good_images(0.01) == 99
    fit = conformal_threshold(np.arange(10.0), 0.05)
    assert not fit["enough"] and fit["threshold"] == 9.0 and fit["needed"] == 19
    assert "10 good calibration images are too few" in fit["note"] and "at least 19" in fit["note"]
    assert conformal_threshold(np.arange(19.0), 0.05)["enough"]
    with pytest.raises(ValueError, match="NaN"):
        conformal_threshold([1.0, np.nan], 0.05)
    with pytest.raises(ValueError, match="alpha"):
        conformal_threshold([1.0, 2.0], 1.5)


def test_binomial_interval_is_exact_and_covers():
    lo, hi = binomial_ci(5, 100)
    assert lo < 0.05 < hi and hi - lo < 0.12
    assert binomial_ci(0, 50)[0] == 0.0 and binomial_ci(50, 50)[1] == 1.0 and binomial_ci(0, 0) is None
    rng = np.random.default_rng(2)
    k = rng.binomial(200, 0.05, size=400)
    covered = [binomial_ci(int(x), 200)[0] <= 0.05 <= binomial_ci(int(x), 200)[1] for x in k]
    assert np.mean(covered) >= 0.93


def test_score_shift_sees_a_shift_and_not_noise():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=60)
    same = score_shift(ref, rng.normal(size=300))
    assert same is not None and not same["shifted"] and same["message"] == ""
    up = score_shift(ref, rng.normal(0.8, 1.0, size=300))
    assert up["shifted"] and "higher" in up["message"] and "add recent good images" in up["message"].lower()
    wider = score_shift(ref, rng.normal(0.0, 3.0, size=300))
    assert wider["shifted"] and wider["p_ks"] < wider["p_mannwhitney"]
    assert score_shift([1.0], [1.0, 2.0]) is None


def test_false_alarm_summary_reports_target_val_test_and_the_shift():
    rng = np.random.default_rng(4)
    cal = rng.normal(size=2000)              # many calibration images: the rate the threshold gives is about 0.05
    fit = conformal_threshold(cal, 0.05)
    info = {"target_fpr": 0.05, "method_used": "target_fpr", "conformal": fit,
            "val": {"n_good": 2000, "fpr": float((cal >= fit["threshold"]).mean())},
            "calibration_good_scores": sorted(cal.tolist())}
    ok = false_alarm_summary(rng.normal(size=400), fit["threshold"], info)
    assert ok["target"] == 0.05 and ok["val"]["n"] == 2000 and ok["test"]["n"] == 400
    assert ok["test"]["ci95"][0] <= ok["test"]["rate"] <= ok["test"]["ci95"][1]
    assert ok["test_holds_target"] and ok["test_at_most_target"] and not ok["shift"]["shifted"]
    bad = false_alarm_summary(rng.normal(1.0, 1.0, size=400), fit["threshold"], info)
    assert bad["test_holds_target"] is False and bad["test_at_most_target"] is False
    assert bad["shift"]["shifted"] and bad["test"]["rate"] > 0.15
