"""The QA report: one self-contained HTML page (images embedded, no CDN) and the plot PNGs.

>>> write_report("reports/report.html", metrics, verdicts, scores, threshold_info,
...              roc_png=b"...", hist_png=b"...", max_images=24)      # doctest: +SKIP
"""
from __future__ import annotations

import base64
import datetime as _dt
import io
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from defectflow.fsutil import ImageReadError, atomic_path, read_image

THUMB_PX = 160

_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>defectflow report</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px; }
 h1 { margin-bottom: 0.2em; } .sub { color: #666; margin-top: 0; }
 .cards { display: flex; gap: 1em; flex-wrap: wrap; margin: 1.5em 0; }
 .card { border: 1px solid #ddd; border-radius: 8px; padding: 0.8em 1.2em; min-width: 9em; }
 .card .n { font-size: 2em; font-weight: 600; } .card.bad .n { color: #b00020; } .card.ok .n { color: #1b7f3b; }
 table { border-collapse: collapse; margin: 1em 0; } td, th { border-bottom: 1px solid #eee; padding: 0.35em 0.8em; text-align: left; }
 th { background: #fafafa; } .num { text-align: right; font-variant-numeric: tabular-nums; }
 .plots img { max-width: 48%; border: 1px solid #eee; } .note { color: #8a5a00; }
 .tag { padding: 0.1em 0.5em; border-radius: 4px; font-size: 0.85em; }
 .tag.defect { background: #fde7ea; color: #b00020; } .tag.good { background: #e6f4ea; color: #1b7f3b; }
 .tag.unknown { background: #eee; color: #555; }
</style></head><body>
<h1>Defect inspection report</h1>
<p class="sub">generated {{ generated }} &middot; threshold {{ "%.4g"|format(threshold) }} ({{ method_used }})
 &middot; {{ n_test }} test images</p>
<div class="cards">
 <div class="card"><div class="n">{{ n_products }}</div>products inspected</div>
 <div class="card bad"><div class="n">{{ n_flagged }}</div>flagged defective</div>
 <div class="card ok"><div class="n">{{ n_passed }}</div>passed</div>
 {% if metrics.product_accuracy is not none %}<div class="card"><div class="n">{{ "%.1f"|format(100 * metrics.product_accuracy) }}%</div>product accuracy</div>{% endif %}
</div>
{% for note in notes %}<p class="note">{{ note }}</p>{% endfor %}
{% if bands %}<h2>Operator bands (fitted on validation)</h2>
<table><tr><th>band</th><th>score</th>{% if bands.test_counts %}<th>good test images</th><th>defective test images</th>{% endif %}</tr>
{% for b in band_rows %}<tr><td><span class="tag {{ b.tag }}">{{ b.name }}</span></td><td class="num">{{ b.range }}</td>
{% if bands.test_counts %}<td class="num">{{ bands.test_counts.good[b.name] }}</td><td class="num">{{ bands.test_counts.defect[b.name] }}</td>{% endif %}</tr>{% endfor %}
</table>{% endif %}
{% if fa %}<h2>False alarms (good products flagged)</h2>
<table><tr><th></th><th>rate</th><th>good images</th><th>95% interval</th></tr>
{% for r in fa_rows %}<tr><th>{{ r.name }}</th><td class="num">{{ r.rate }}</td><td class="num">{{ r.n }}</td><td class="num">{{ r.ci }}</td></tr>{% endfor %}
</table>
{% if fa.shift %}<p{% if fa.shift.shifted %} class="note"{% endif %}>Good test images against the good calibration images:
{% if fa.shift.shifted %}{{ fa.shift.message }}{% else %}no shift seen (p = {{ "%.2g"|format([fa.shift.p_mannwhitney, fa.shift.p_ks]|min) }}, {{ fa.shift.test }}).{% endif %}</p>{% endif %}
{% endif %}
<h2>Metrics (test images)</h2>
<table>
{% for key, value in metric_rows %}<tr><th>{{ key }}</th><td class="num">{{ value }}</td></tr>{% endfor %}
</table>
{% if per_type %}<h3>AUROC per defect type</h3><table><tr><th>defect type</th><th>images</th><th>AUROC</th></tr>
{% for t in per_type %}<tr><td>{{ t.name }}</td><td class="num">{{ t.n }}</td><td class="num">{{ t.auroc }}</td></tr>{% endfor %}</table>{% endif %}
<h2>Scores</h2>
<div class="plots">{% if roc_png %}<img alt="ROC curve" src="data:image/png;base64,{{ roc_png }}">{% endif %}
{% if hist_png %}<img alt="score histogram" src="data:image/png;base64,{{ hist_png }}">{% endif %}</div>
<h2>Flagged products ({{ n_flagged }}{% if flagged|length < n_flagged %}, {{ flagged|length }} shown{% endif %})</h2>
{% if flagged %}<table><tr><th>image</th>{% if has_overlays %}<th>{{ overlay_title }}</th>{% endif %}<th>product</th><th>run</th><th>true label</th><th>max score</th><th>flagged cameras</th></tr>
{% for p in flagged %}<tr><td>{% if p.thumb %}<img alt="{{ p.product_id }}" src="data:image/jpeg;base64,{{ p.thumb }}">{% else %}(image unavailable){% endif %}</td>
{% if has_overlays %}<td>{% if p.overlay %}<img alt="{{ p.product_id }} anomaly map" src="data:image/jpeg;base64,{{ p.overlay }}">{% else %}(no map){% endif %}</td>{% endif %}
<td>{{ p.product_id }}</td><td>{{ p.run }}</td><td><span class="tag {{ p.label }}">{{ p.label }}</span></td>
<td class="num">{{ "%.4g"|format(p.max_score) }}</td><td>{{ p.flagged_cameras }}</td></tr>{% endfor %}</table>
{% else %}<p>No product was flagged.</p>{% endif %}
</body></html>
"""


def thumbnail(path: str | Path, size: int = THUMB_PX) -> str | None:
    """Base64 JPEG of ``path`` shrunk to ``size`` px on its longer side; None if unreadable."""
    try:
        img = read_image(path, cv2.IMREAD_COLOR)
    except ImageReadError:
        return None
    return encode_thumb(img, size)


def encode_thumb(img: np.ndarray, size: int = THUMB_PX) -> str | None:
    """Base64 JPEG of a BGR uint8 image shrunk to ``size`` px on its longer side."""
    h, w = img.shape[:2]
    f = size / max(h, w)
    if f < 1:
        img = cv2.resize(img, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])
    return base64.b64encode(buf.tobytes()).decode() if ok else None


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def write_report(path: Path, metrics: dict, verdicts: pd.DataFrame, scores: pd.DataFrame, threshold: float,
                 method_used: str, roc_png: bytes | None, hist_png: bytes | None, max_images: int = 24,
                 notes: list[str] | None = None, overlays: dict | None = None,
                 overlay_title: str = "heat map + boxes") -> Path:
    """Render the report to ``path`` (atomic). Thumbnails: the highest-scoring image of each flagged product."""
    from jinja2 import Environment, select_autoescape

    flagged_df = verdicts[verdicts["verdict"] == "defect"].sort_values("max_score", ascending=False)
    flagged = []
    for rec in flagged_df.head(max_images).to_dict("records"):
        rows = scores[scores["product_id"] == rec["product_id"]]
        thumb = thumbnail(rows.loc[rows["score"].idxmax(), "image_path"]) if len(rows) else None
        flagged.append({**rec, "thumb": thumb, "overlay": (overlays or {}).get(str(rec["product_id"]))})
    keys = ("score_from", "image_auroc", "image_auroc_ci", "pixel_auroc", "map_threshold", "n_boxes", "accuracy", "precision", "recall", "f1", "fpr", "n_test", "n_good", "n_defect",
            "n_unknown", "tp", "fp", "tn", "fn", "product_accuracy", "n_products")
    metric_rows = [(k, _fmt(metrics.get(k))) for k in keys if k in metrics]
    metric_rows += [(f"image_auroc ({h} head)", _fmt(v.get("image_auroc")))
                    for h, v in (metrics.get("heads") or {}).items()]
    per_type = [{"name": k, "n": v["n"], "auroc": _fmt(v["auroc"])}
                for k, v in (metrics.get("per_defect_type") or {}).items()]
    bands = metrics.get("bands")
    band_rows = []
    if bands:
        lo, hi = bands["low"], bands["high"]
        band_rows = [{"name": "good", "tag": "good", "range": f"< {lo:.4g}"},
                     {"name": "review", "tag": "unknown", "range": f"{lo:.4g} to {hi:.4g}"},
                     {"name": "bad", "tag": "defect", "range": f">= {hi:.4g}"}]
    fa = metrics.get("false_alarms")
    fa_rows = _false_alarm_rows(fa) if fa else []
    env = Environment(autoescape=select_autoescape(default=True, default_for_string=True))
    html = env.from_string(_TEMPLATE).render(
        generated=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"), threshold=threshold, method_used=method_used,
        n_test=metrics.get("n_test", 0), n_products=len(verdicts), n_flagged=len(flagged_df),
        n_passed=int((verdicts["verdict"] == "good").sum()), metrics=metrics, metric_rows=metric_rows,
        per_type=per_type, bands=bands, band_rows=band_rows, notes=list(notes or []) + list(metrics.get("notes") or []),
        roc_png=base64.b64encode(roc_png).decode() if roc_png else None,
        hist_png=base64.b64encode(hist_png).decode() if hist_png else None, flagged=flagged,
        has_overlays=bool(overlays), overlay_title=overlay_title, fa=fa, fa_rows=fa_rows)
    with atomic_path(path) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return path


def _false_alarm_rows(fa: dict) -> list[dict]:
    def ci(r):
        return f"{r['ci95'][0]:.3g} - {r['ci95'][1]:.3g}" if r.get("ci95") else ""
    rows = [{"name": "target (threshold.target_fpr)", "rate": _fmt(fa.get("target")), "n": "", "ci": ""}]
    if fa.get("expected") is not None:
        rng = fa.get("promised_range95")
        rows.append({"name": "promised by the conformal threshold", "rate": _fmt(fa["expected"]), "n": "",
                     "ci": f"{rng[0]:.3g} - {rng[1]:.3g} (over calibration draws)" if rng else ""})
    rows.append({"name": "validation (calibration images)", "rate": _fmt(fa["val"]["rate"]), "n": fa["val"]["n"],
                 "ci": ci(fa["val"])})
    rows.append({"name": "test", "rate": _fmt(fa["test"]["rate"]), "n": fa["test"]["n"], "ci": ci(fa["test"])})
    return rows


# ------------------------------------------------------------------ plots
def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return buf.getvalue()


def roc_plot(roc: pd.DataFrame, auroc: float | None, op_point: tuple[float, float] | None) -> bytes | None:
    """ROC curve PNG (None when there is no curve: a single class)."""
    if roc.empty:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.plot(roc["fpr"], roc["tpr"], lw=2, label=f"AUROC {auroc:.4f}" if auroc is not None else None)
    ax.plot([0, 1], [0, 1], ls="--", c="#999", lw=1)
    if op_point is not None:
        ax.plot([op_point[0]], [op_point[1]], "o", c="#b00020", label="threshold")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (test images)",
           xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right")
    return _png(fig)


def hist_plot(hist: pd.DataFrame, threshold: float, clipped: bool = False) -> bytes | None:
    if hist.empty:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    width = float(np.diff(hist["score"]).min()) if len(hist) > 1 else 1.0
    colours = {"good": "#1b7f3b", "defect": "#b00020", "unknown": "#888"}
    for label, c in colours.items():
        if label in hist and hist[label].sum():
            ax.bar(hist["score"], hist[label], width=width, alpha=0.55, color=c, label=label)
    ax.axvline(threshold, c="k", ls="--", lw=1, label="threshold")
    ax.set(xlabel="anomaly score (NLL per dim)" + ("; last bar: all higher scores" if clipped else ""),
           ylabel="images", title="Score histogram (test images)")
    ax.legend()
    return _png(fig)
