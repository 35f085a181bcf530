"""The report's Jinja template: QA's answers on the first screen, the engineering detail below."""

CSS = """
 body { font-family: system-ui, 'DejaVu Sans', sans-serif; margin: 1.5em 2em; color: #222; max-width: 1150px; }
 h1 { margin: 0 0 0.1em; } .sub { color: #666; margin-top: 0; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
 .cards { display: flex; gap: 0.8em; flex-wrap: wrap; margin: 0.8em 0; }
 .card { border: 1px solid #ddd; border-radius: 8px; padding: 0.5em 1em; min-width: 8em; }
 .card .n { font-size: 1.9em; font-weight: 600; } .card.bad .n { color: #b00020; } .card.ok .n { color: #1b7f3b; }
 .card.rev .n { color: #8a5a00; }
 table { border-collapse: collapse; margin: 0.6em 0; } td, th { border-bottom: 1px solid #eee; padding: 0.3em 0.7em; text-align: left; }
 th { background: #fafafa; } .num { text-align: right; font-variant-numeric: tabular-nums; }
 .row { display: flex; gap: 1.2em; flex-wrap: wrap; align-items: flex-start; }
 .plots img { max-width: 48%; border: 1px solid #eee; } .note { color: #8a5a00; }
 .tag { padding: 0.1em 0.5em; border-radius: 4px; font-size: 0.85em; }
 .tag.defect, .tag.flagged { background: #fde7ea; color: #b00020; } .tag.good, .tag.passed { background: #e6f4ea; color: #1b7f3b; }
 .tag.unknown, .tag.review { background: #fff3dc; color: #8a5a00; }
 .product { border: 1px solid #eee; border-radius: 6px; padding: 0.4em 0.6em; margin: 0.5em 0; page-break-inside: avoid; }
 .tiles { display: flex; gap: 0.5em; flex-wrap: wrap; } .tile { font-size: 0.8em; text-align: center; }
 .tile img { display: block; border: 2px solid #ddd; } .tile.hit img { border-color: #b00020; }
 video, .poster { width: 360px; } .gallery { display: flex; flex-wrap: wrap; gap: 0.5em; }
 @page { size: A4; margin: 1.2cm; }
 @media print { .screen-only { display: none; } body { margin: 0; font-size: 9.5pt; } }
 @media screen { .print-only { display: none; } }
"""

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>defectflow {{ kind }} report</title><style>{{ css|safe }}</style></head><body>
<h1>Defect inspection report{% if line %} &middot; {{ line }}{% endif %}</h1>
<p class="sub">{{ kind }} run &middot; generated {{ generated }} &middot; threshold {{ "%.4g"|format(qa.threshold) }}
 &middot; model {{ card.model_version or "n/a" }}</p>
<div class="cards">
 <div class="card"><div class="n">{{ qa.inspected }}</div>products inspected</div>
 <div class="card ok"><div class="n">{{ qa.passed }}</div>passed</div>
 <div class="card bad"><div class="n">{{ qa.flagged }}</div>flagged defective</div>
 <div class="card rev"><div class="n">{{ qa.review }}</div>sent to review</div>
 <div class="card"><div class="n">{{ pct(qa.defect_rate) }}</div>defect rate{% if prev_rate is not none %} (previous {{ pct(prev_rate) }}){% endif %}</div>
</div>
<p class="sub">{{ qa.rule }}.</p>
<div class="row">
<table><tr><th>run</th><th>inspected</th><th>passed</th><th>review</th><th>flagged</th><th>defect rate</th></tr>
{% for r in qa.per_run %}<tr><td>{{ r.run }}</td><td class="num">{{ r.inspected }}</td><td class="num">{{ r.passed }}</td>
<td class="num">{{ r.review }}</td><td class="num">{{ r.flagged }}</td><td class="num">{{ pct(r.defect_rate) }}</td></tr>{% endfor %}</table>
<table><tr><th>camera</th><th>products seen</th><th>passed</th><th>review</th><th>flagged</th></tr>
{% for r in qa.per_camera %}<tr><td>{{ r.camera }}</td><td class="num">{{ r.inspected }}</td><td class="num">{{ r.passed }}</td>
<td class="num">{{ r.review }}</td><td class="num">{{ r.flagged }}</td></tr>{% endfor %}</table>
{% if trend_png %}<img alt="defect rate trend" src="data:image/png;base64,{{ trend_png }}" style="max-width: 560px">{% endif %}
</div>
<h2>Flagged products ({{ qa.flagged }}{% if products|length < qa.flagged %}, {{ products|length }} shown{% endif %})</h2>
{% for p in products %}<div class="product"><b>{{ p.product_id }}</b> &middot; run {{ p.run }} &middot; max score {{ "%.4g"|format(p.max_score) }}
 &middot; flagged by {{ p.flagged_cameras }}{% if has_labels %} &middot; true label <span class="tag {{ p.label }}">{{ p.label }}</span>{% endif %}
<div class="tiles">{% for t in p.tiles %}<div class="tile{% if t.flagged %} hit{% endif %}">
{% if t.crop %}<img alt="{{ p.product_id }} {{ t.camera }}" src="data:image/jpeg;base64,{{ t.crop }}">{% else %}(image unavailable){% endif %}
{{ t.camera }} {{ "%.3g"|format(t.score) }}</div>
{% if t.overlay %}<div class="tile{% if t.flagged %} hit{% endif %}"><img alt="{{ p.product_id }} {{ t.camera }} anomaly map" src="data:image/jpeg;base64,{{ t.overlay }}">{{ overlay_title }}</div>{% endif %}
{% endfor %}</div></div>
{% else %}<p>No product was flagged.</p>{% endfor %}
{% if videos %}<h2>Annotated videos</h2>
<p class="sub">Each product boxed with its track id, product id, score and verdict: red = flagged by this camera, orange = flagged by another camera, green = passed.</p>
<div class="gallery">{% for v in videos %}<figure>
<video class="screen-only" controls muted preload="metadata" src="{{ v.src }}"></video>
{% if v.poster %}<img class="print-only poster" alt="{{ v.name }} frame" src="data:image/jpeg;base64,{{ v.poster }}">{% endif %}
<figcaption>{{ v.name }}<span class="print-only"> (video beside the report: {{ v.src }})</span></figcaption></figure>{% endfor %}</div>{% endif %}
{% for note in notes %}<p class="note">{{ note }}</p>{% endfor %}
{% if metrics %}<h2>Metrics (test images)</h2>
{% if band_rows %}<h3>Operator bands (fitted on validation)</h3>
<table><tr><th>band</th><th>score</th>{% if bands.test_counts %}<th>good test images</th><th>defective test images</th>{% endif %}</tr>
{% for b in band_rows %}<tr><td><span class="tag {{ b.tag }}">{{ b.name }}</span></td><td class="num">{{ b.range }}</td>
{% if bands.test_counts %}<td class="num">{{ bands.test_counts.good[b.name] }}</td><td class="num">{{ bands.test_counts.defect[b.name] }}</td>{% endif %}</tr>{% endfor %}
</table>{% endif %}
{% if fa_rows %}<h3>False alarms (good products flagged)</h3>
<table><tr><th></th><th>rate</th><th>good images</th><th>95% interval</th></tr>
{% for r in fa_rows %}<tr><th>{{ r.name }}</th><td class="num">{{ r.rate }}</td><td class="num">{{ r.n }}</td><td class="num">{{ r.ci }}</td></tr>{% endfor %}
</table>{% if fa.shift %}<p{% if fa.shift.shifted %} class="note"{% endif %}>Good test images against the good calibration images:
{% if fa.shift.shifted %}{{ fa.shift.message }}{% else %}no shift seen (p = {{ "%.2g"|format([fa.shift.p_mannwhitney, fa.shift.p_ks]|min) }}, {{ fa.shift.test }}).{% endif %}</p>{% endif %}{% endif %}
<div class="row"><table>{% for key, value in metric_rows %}<tr><th>{{ key }}</th><td class="num">{{ value }}</td></tr>{% endfor %}</table>
<div>{% if confusion %}<h3>Confusion (test images)</h3><table><tr><th>actual \\ predicted</th><th>good</th><th>defect</th></tr>
<tr><th>good</th><td class="num">{{ confusion.tn }}</td><td class="num">{{ confusion.fp }}</td></tr>
<tr><th>defect</th><td class="num">{{ confusion.fn }}</td><td class="num">{{ confusion.tp }}</td></tr></table>{% endif %}
{% if per_type %}<h3>AUROC per defect type</h3><table><tr><th>defect type</th><th>images</th><th>AUROC</th></tr>
{% for t in per_type %}<tr><td>{{ t.name }}</td><td class="num">{{ t.n }}</td><td class="num">{{ t.auroc }}</td></tr>{% endfor %}</table>{% endif %}
{% if splits %}<h3>Split sizes (images)</h3><table><tr><th>split</th><th>images</th><th>products</th></tr>
{% for s in splits %}<tr><td>{{ s.split }}</td><td class="num">{{ s.images }}</td><td class="num">{{ s.products }}</td></tr>{% endfor %}</table>{% endif %}</div></div>{% endif %}
<h2>Scores</h2><div class="plots">{% for name, png in plots %}<img alt="{{ name }}" src="data:image/png;base64,{{ png }}">{% endfor %}</div>
{% if false_alarms or missed %}<h2>Worst false alarms and missed defects</h2>
<h3>False alarms (good, flagged; highest score first)</h3><div class="gallery">{% for t in false_alarms %}<div class="tile">{% if t.img %}<img alt="false alarm {{ t.product_id }}" src="data:image/jpeg;base64,{{ t.img }}">{% endif %}{{ t.product_id }} {{ t.camera }} {{ "%.3g"|format(t.score) }}</div>{% else %}none{% endfor %}</div>
<h3>Missed defects (defective, passed; lowest score first)</h3><div class="gallery">{% for t in missed %}<div class="tile">{% if t.img %}<img alt="missed {{ t.product_id }}" src="data:image/jpeg;base64,{{ t.img }}">{% endif %}{{ t.product_id }} {{ t.camera }} {{ t.defect_type }} {{ "%.3g"|format(t.score) }}</div>{% else %}none{% endfor %}</div>{% endif %}
{% if masks %}<h2>Composite masks (flagged products shown)</h2><div class="gallery">{% for t in masks %}<div class="tile"><img alt="mask {{ t.product_id }}" src="data:image/jpeg;base64,{{ t.img }}">{{ t.product_id }} {{ t.camera }}</div>{% endfor %}</div>{% endif %}
{% if compare %}<h2>This model against the previous one</h2><p class="sub">previous model {{ compare.previous_model or "n/a" }} &rarr; {{ compare.model or "n/a" }}</p>
<table><tr><th></th><th>previous</th><th>this model</th></tr>{% for r in compare.rows %}<tr><th>{{ r.name }}</th><td class="num">{{ fmt(r.before) }}</td><td class="num">{{ fmt(r.after) }}</td></tr>{% endfor %}</table>
<p>{{ compare.changed|length }} product verdict(s) changed{% if compare.changed %}:{% endif %}
{% for c in compare.changed[:30] %} {{ c.product_id }} ({{ c.before }} &rarr; {{ c.after }}{% if c.label %}, label {{ c.label }}{% endif %}){% endfor %}</p>{% endif %}
<h2>Defect families</h2>{% if families %}<p>{{ families.rule }} k = {{ families.k }} (silhouettes {{ families.silhouettes }}){% if families.ari is not none %}; adjusted Rand index against the true defect types {{ "%.3f"|format(families.ari) }}{% endif %}.</p>
<div class="row">{% if families.scatter %}<img alt="families scatter" src="data:image/png;base64,{{ families.scatter }}">{% endif %}
<div>{% for c in families.clusters %}<div><b>family {{ c.id }}</b> ({{ c.n }} items{% if c.types %}; true types {{ c.types }}{% endif %})
<div class="gallery">{% for img in c.examples %}<img alt="family {{ c.id }} example" src="data:image/jpeg;base64,{{ img }}" style="width: 90px">{% endfor %}</div></div>{% endfor %}</div></div>
{% else %}<p>{{ families_note }}</p>{% endif %}
<h2>Threshold policy and model card</h2>
<table>{% for key, value in policy %}<tr><th>{{ key }}</th><td>{{ value }}</td></tr>{% endfor %}
{% for key, value in card.items() %}<tr><th>{{ key }}</th><td>{{ fmt(value) }}</td></tr>{% endfor %}</table>
</body></html>
"""
