"""False-alarm rates that hold: a conformal threshold from good images, binomial intervals, and a
check that new good images still score like the ones the threshold was fitted on.

A line sets the rate of false alarms it can afford, ``alpha`` (``threshold.target_fpr``). With
``n`` good calibration scores (never used to train, pick the epoch or standardise the heads: they
are then exchangeable with future good images), the threshold is the ``k``-th smallest of them,
``k = ceil((n + 1) (1 - alpha))``, and an image is flagged when ``score >= threshold``. A future good
image is then flagged with probability ``(n + 1 - k) / (n + 1)``: at most ``alpha`` and at least
``alpha - 1 / (n + 1)`` (split conformal prediction; Vovk et al. 2005, Angelopoulos & Bates 2021).
Over the draw of the calibration images that rate is itself random, ``Beta(n + 1 - k, k)``
(``fpr_range95``): with 60 images and ``alpha`` 0.05 a run may give anything from about 1 % to 11 %,
so more calibration images make the rate tighter, not only possible.
It needs ``n >= 1 / alpha - 1`` good images; with fewer, no threshold from them can promise
``alpha`` and :func:`conformal_threshold` says so, how many are needed, and falls back to the
largest score (a rate of ``1 / (n + 1)``).

The promise holds only while good images keep scoring like the calibration ones. Test or newly
scored good images are compared with them by a two-sample test (:func:`score_shift`): when they
differ, no threshold fitted on the old good images can hold its rate, and the QA user must add
recent good images to validation.

>>> fit = conformal_threshold(np.arange(100.0), alpha=0.05)
>>> fit["threshold"], round(fit["expected_fpr"], 4)
(95.0, 0.0495)
"""
from __future__ import annotations

import math

import numpy as np

SHIFT_ALPHA = 0.01   # significance level of the good-score shift test


def needed_good_images(alpha: float) -> int:
    """The fewest good calibration images for which a conformal threshold can promise ``alpha``."""
    return max(1, math.ceil((1.0 - alpha) / alpha - 1e-9))


def conformal_threshold(good_scores, alpha: float) -> dict:
    """Threshold at false-alarm rate ``alpha`` from good calibration scores (see the module docstring).

    Returns ``{threshold, k, n, alpha, expected_fpr, enough, needed, note}``: ``expected_fpr`` =
    ``(n + 1 - k) / (n + 1)`` is the rate promised for future good images; ``enough`` is false
    when ``n`` is too small for ``alpha`` (then the threshold is the largest score and ``note`` says
    how many good images it would need).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    s = np.sort(np.asarray(good_scores, np.float64))
    n = len(s)
    if n == 0:
        raise ValueError("no good calibration scores")
    if not np.isfinite(s).all():
        raise ValueError("good calibration scores contain NaN or inf")
    needed = needed_good_images(alpha)
    k = math.ceil((n + 1) * (1.0 - alpha) - 1e-9)
    enough = k <= n
    k = min(k, n)
    note = ""
    if not enough:
        note = (f"{n} good calibration images are too few for a false-alarm rate of {alpha:g}: a threshold from "
                f"them can promise at best {1 / (n + 1):.3g}; it needs at least {needed} good calibration "
                f"images (add good images to validation, raise source.val_fraction, or raise threshold.target_fpr)")
    from scipy.stats import beta

    spread = beta(n + 1 - k, k)          # the rate this threshold gives future good images, over calibration draws
    return {"threshold": float(s[k - 1]), "k": int(k), "n": int(n), "alpha": float(alpha),
            "expected_fpr": (n + 1 - k) / (n + 1), "fpr_range95": [float(spread.ppf(0.025)), float(spread.ppf(0.975))],
            "enough": bool(enough), "needed": int(needed), "note": note}


def binomial_ci(k: int, n: int, level: float = 0.95) -> list[float] | None:
    """Exact (Clopper-Pearson) interval of a rate of ``k`` events in ``n``; None when ``n == 0``."""
    if n <= 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="exact")
    return [float(ci.low), float(ci.high)]


def rate_with_ci(flagged) -> dict:
    """``{rate, k, n, ci95}`` of a boolean array (e.g. the good images flagged)."""
    flagged = np.asarray(flagged, bool)
    n, k = int(flagged.size), int(flagged.sum())
    return {"rate": (k / n) if n else None, "k": k, "n": n, "ci95": binomial_ci(k, n)}


def score_shift(reference, new, alpha: float = SHIFT_ALPHA) -> dict | None:
    """Do ``new`` good scores come from the distribution of the ``reference`` (calibration) ones?

    Two-sided Mann-Whitney U test (a shift up or down of the scores) and, beside it, the
    two-sample Kolmogorov-Smirnov test (any change of shape). ``shifted`` when either p-value is
    below ``alpha / 2`` (Bonferroni over the two). None with fewer than 2 scores on a side.
    """
    from scipy.stats import ks_2samp, mannwhitneyu

    a = np.asarray(reference, np.float64)
    b = np.asarray(new, np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) < 2 or len(b) < 2:
        return None
    p_mw = float(mannwhitneyu(b, a, alternative="two-sided").pvalue)
    p_ks = float(ks_2samp(b, a).pvalue)
    shifted = min(p_mw, p_ks) < alpha / 2
    higher = float(np.median(b)) > float(np.median(a))
    out = {"test": "Mann-Whitney U and Kolmogorov-Smirnov, two-sided", "alpha": alpha,
           "p_mannwhitney": p_mw, "p_ks": p_ks, "shifted": bool(shifted),
           "n_reference": int(len(a)), "n_new": int(len(b)),
           "median_reference": float(np.median(a)), "median_new": float(np.median(b)), "message": ""}
    if shifted:
        out["message"] = (f"good images now score {'higher' if higher else 'lower'} than the good validation images "
                          f"the threshold was fitted on (median {np.median(b):.4g} vs {np.median(a):.4g}; "
                          f"p = {min(p_mw, p_ks):.2g}): no threshold fitted on those images can hold its false-alarm "
                          "rate. Add recent good images to validation and retrain.")
    return out


def false_alarm_summary(good_scores, threshold: float, thr_info: dict) -> dict:
    """Target, validation and test false-alarm rates (with exact 95% intervals) and the good-score shift
    test, for metrics.json: ``good_scores`` are the scores of the test images labelled good;
    ``thr_info`` is ``threshold.json``."""
    good = np.asarray(good_scores, np.float64)
    val = thr_info.get("val") or {}
    n_val = int(val.get("n_good") or 0)
    k_val = int(round((val.get("fpr") or 0.0) * n_val))
    conformal = thr_info.get("conformal") or {}
    out = {"target": thr_info.get("target_fpr"), "method": thr_info.get("method_used"),
           "expected": conformal.get("expected_fpr"), "promised_range95": conformal.get("fpr_range95"),
           "enough_calibration": conformal.get("enough"),
           "calibration_needed": conformal.get("needed"),
           "val": {"rate": val.get("fpr"), "k": k_val, "n": n_val, "ci95": binomial_ci(k_val, n_val)},
           "test": rate_with_ci(good >= threshold)}
    ci, target = out["test"]["ci95"], out["target"]
    out["test_holds_target"] = (None if ci is None or target is None or out["method"] != "target_fpr"
                                else bool(ci[0] <= target <= ci[1]))
    out["test_at_most_target"] = None if ci is None or target is None else bool(ci[0] <= target)
    ref = thr_info.get("calibration_good_scores")
    out["shift"] = score_shift(ref, good) if ref else None
    return out
