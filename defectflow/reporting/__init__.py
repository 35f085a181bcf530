"""The QA report: counts and trend first, then metrics, galleries, defect families and the model card.

``build.write_report`` assembles the page (``page.py``) into ``report.html`` (self-contained: images
inline, videos beside it in ``videos/``) and ``report.pdf``; the other modules make its parts.
"""
