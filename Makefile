# The two commands of the README: `make run` (demo end to end) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup run test demo ui clean plots

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

setup: $(STAMP)

demo: setup  ## write the demo videos that params.yaml asks for (source.kind: demo)
	$(PY) -m defectflow.cli demo

run: demo  ## the whole DAG on the demo, each stage a Prefect flow on one local server
	$(PY) -m flows.server -- dvc repro
	@$(PY) -m defectflow.cli summary

test: setup
	$(VENV)/bin/ruff check --select F,E9 defectflow flows tasks tests bench
	$(PY) -m pytest -q -n 2 --dist loadfile

plots: setup  ## dvc plots show offline (vega libraries bundled from npm); then e.g. dvc plots diff HEAD~1 --html-template tools/dvc_plots/offline.html
	cd tools/dvc_plots && npm ci --no-audit --no-fund --loglevel=error
	$(PY) tools/dvc_plots/make_template.py
	dvc plots show --html-template tools/dvc_plots/offline.html -o reports/dvc_plots

ui: setup  ## a Prefect server with its UI, to watch runs
	$(PY) -m flows.server --serve

clean:
	rm -rf data/frames data/detect data/masks data/roi data/augment data/synth models reports
