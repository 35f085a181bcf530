"""Write ``tools/dvc_plots/offline.html``: a DVC plots HTML template with vega, vega-lite and vega-embed
inlined from ``node_modules`` (package.json pins them), so ``dvc plots show/diff --html-template
tools/dvc_plots/offline.html`` renders with no network. Run ``npm ci`` here first (``make plots`` does).
``python make_template.py [OUT]`` writes OUT instead; ``node check_offline.js PAGE.html`` renders a page's plots
with only what the page inlines."""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIBS = ("vega/build/vega.min.js", "vega-lite/build/vega-lite.min.js", "vega-embed/build/vega-embed.min.js")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    scripts = []
    for rel in LIBS:
        path = HERE / "node_modules" / rel
        if not path.is_file():
            print(f"{path}: missing; run `npm ci` in {HERE}", file=sys.stderr)
            return 2
        js = path.read_text(encoding="utf-8")
        if "</script" in js.lower() or "{plot_divs}" in js:
            print(f"{path}: cannot be inlined (contains </script or {{plot_divs}})", file=sys.stderr)
            return 2
        scripts.append(f"<script>/* {rel} */\n{js}\n</script>")
    out = Path(argv[0]) if argv else HERE / "offline.html"
    out.write_text("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>DVC plots</title>\n"
                   + "\n".join(scripts) + "\n<style>table { border-spacing: 15px; }</style></head>\n"
                   "<body>\n{plot_divs}\n</body></html>\n", encoding="utf-8")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
