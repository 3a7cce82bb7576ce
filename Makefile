# make setup : create .venv and install the exact versions of requirements-lock.txt
# make test  : set up if needed, then run the whole test suite on CPU (what CI runs)
# make test-fast : the quick tier for the edit loop: no test that starts a process or trains
#                  more than a few steps (pytest -m "not slow"), ~2 minutes on 2 cores
# make demo  : set up if needed, then a short CPU training run of TwistNet-18 on synthtex
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-lock

.PHONY: setup test test-fast demo clean gpu-check

setup: $(STAMP)

$(STAMP): requirements-lock.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --no-input -r requirements-lock.txt
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q test_models.py tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" test_models.py tests

demo: setup
	$(PY) train.py --dataset synthtex --model twistnet18 --epochs 3 --img_size 64 --run_dir runs/demo

clean:
	rm -rf runs/demo .pytest_cache

# make gpu-check: on a CUDA machine, pytest -m cuda + throughput -> gpu_report.md/.json (<= 8 min)
gpu-check: setup
	$(PY) -m helpers.gpu_check
