# make demo: compress pretrained all-MiniLM-L6-v2 with real calibration text (data-aware:
#   FFN blocks narrowed, queries and keys sharing one input factor, attention ranks allocated over the model), then print the per-layer plan, speed-up and fidelity on
#   held-out sentences; writes the ONNX file in dynamic int8 (its speed-up and fidelity printed too), the saved model
#   and a JSON report under build/demo, and appends the run's figures to benchmarks/results/demo.jsonl (demo.md).
# make test: the test suite, in one pytest-xdist worker per core (TEST_WORKERS=0: one process). Both create their own virtual environment in .venv.
# make bench: the speed benchmark suite, all of it (hours: run it on a quiet machine);
#   a piece: make bench BENCH="speed --models resnet50 --backends onnxruntime --batch 1"
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BENCH ?=
TEST_WORKERS ?= auto
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
	start=$$(date +%s) && model=$$($(PY) -m benchmarks.demo_data build/demo 256) && $(PY) -m fxlrd compress "$$model" \
	  --calibration build/demo/sentences.txt --batch 8 --seq-len 64 --calibration-batches 32 --eval-batches 8 \
	  --ratio 1.5 --allocation global --sequential --mlp narrow --siblings '*.query,*.key' \
	  --onnx build/demo/minilm-lrd.onnx --int8 dynamic --save build/demo/minilm-lrd --overwrite --report build/demo/report.json \
	  && { $(PY) -m benchmarks.demo_log build/demo/report.json --wall-s $$(( $$(date +%s) - start )) \
	       || echo "make demo: the demo ran, but its figures were not logged (see above)"; }

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS)

bench: $(STAMP)
	$(PY) -m benchmarks $(BENCH)

clean:
	rm -rf build .pytest_cache .hypothesis
