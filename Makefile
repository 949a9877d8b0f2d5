# Two commands for a newcomer: `make run` and `make test`. Both create .venv if missing and (re)install the
# requirements when they changed. constraints.txt pins torch so no dependency can pull a CUDA build onto a CPU box.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: run test test-fast bench bench-gpu demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt requirements-nodeps.txt constraints.txt | $(PY)
	$(PY) -m pip install -q -c constraints.txt -r requirements.txt
	$(PY) -m pip install -q --no-deps -c constraints.txt -r requirements-nodeps.txt
	touch $@

$(DEV_STAMP): requirements-dev.txt $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -r requirements-dev.txt
	touch $@

run: $(STAMP)
	$(PY) studio.py $(ARGS)

test: $(DEV_STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q tests $(ARGS)

# The fast set (about a minute): everything but the tests marked slow (full-size planning, subprocess CLIs, browser).
test-fast: $(DEV_STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q tests -m "not slow" $(ARGS)

bench: $(DEV_STAMP)  # bench/llm_train.py compares against TRL (requirements-dev.txt)
	HF_HUB_OFFLINE=1 $(PY) bench/run_all.py

# Needs a CUDA GPU with >= 24 GB (says so and exits 0 elsewhere); ARGS="--only sd15,sdxl" runs a part (bench/gpu.py).
bench-gpu: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) bench/gpu.py --write $(ARGS)

# The first CLI run: the built-in demo (built into workspace/demo/ if missing) trains in seconds on a CPU; the run
# lands in workspace/runs/demo-image (then -2, -3...), where the studio's Runs table shows it too.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) train.py --config presets/demo-image.yaml $(ARGS)

clean:
	rm -rf $(VENV)
