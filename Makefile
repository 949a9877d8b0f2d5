# Two commands for a newcomer: `make run` and `make test`. Both create .venv if missing and (re)install the
# requirements when they changed. constraints.txt pins torch so no dependency can pull a CUDA build onto a CPU box.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: run test bench demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt constraints.txt | $(PY)
	$(PY) -m pip install -q -c constraints.txt -r requirements.txt
	touch $@

$(DEV_STAMP): requirements-dev.txt $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -r requirements-dev.txt
	touch $@

run: $(STAMP)
	$(PY) studio.py $(ARGS)

test: $(DEV_STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q tests $(ARGS)

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) bench/run_all.py

clean:
	rm -rf $(VENV)
