# make demo: compress ResNet-50, export ONNX, print the plan and the measured speed-up.
# make test: the test suite. Both create their own virtual environment in .venv.
# make bench: the speed benchmark suite, all of it (hours: run it on a quiet machine);
#   a piece: make bench BENCH="speed --models resnet50 --backends onnxruntime --batch 1"
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BENCH ?=
STAMP := $(VENV)/.fxlrd-installed

.PHONY: demo test bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: on these machines 2.13.0 is a local CPU build (a looser request pulls CUDA).
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m fxlrd demo --model resnet50 --ratio 2 --out build

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks $(BENCH)

clean:
	rm -rf build .pytest_cache .hypothesis
