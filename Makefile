# Two commands do all the set-up from a fresh clone:
#   make demo   - creates .venv if missing, then trains MDAF on the embedded synthetic data
#   make test   - creates .venv if missing, then runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench gpu-setup clean

$(STAMP): requirements/cpu.txt requirements/torchrec.txt requirements/dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements/cpu.txt -r requirements/dev.txt
	$(PY) -m pip install -q --no-deps -r requirements/torchrec.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

# Test files run on 2 worker processes with one torch thread each (the subprocess trainings set it too): 2 cores busy,
# never oversubscribed.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile tests

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/mdaf-rec demo

bench: $(STAMP)
	$(PY) -m pip install -q -r requirements/bench.txt
	$(PY) tools/bench_scan.py
	$(PY) tools/bench_data.py

# CUDA stack (torch + fbgemm-gpu + torchrec + mamba-ssm) for a GPU machine; see README "GPU setup".
gpu-setup:
	bash tools/setup_gpu.sh .venv-gpu

clean:
	rm -rf $(VENV) build *.egg-info
