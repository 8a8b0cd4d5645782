# Two commands on a fresh machine:
#   make demo   - set up .venv and run a local master + 3 peers training with uint8 DiLoCo
#   make test   - set up .venv and run lint, types and the test suite (native, then numpy)
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.pccl-installed

.PHONY: demo test lint soak bench clean

$(STAMP): pyproject.toml setup.py $(wildcard native/*.c native/*.h)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	# torch is pinned: any other spec may pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0 -e '.[dev,torch]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pccl demo

lint: $(STAMP)
	$(BIN)/ruff check pccl master peer bindings examples tests
	$(BIN)/ruff format --check pccl master peer bindings examples tests
	$(BIN)/mypy pccl master peer bindings examples

# The second pass runs on the numpy kernels the files whose results go through a kernel: the
# kernels themselves, quantization, the ring over shared memory and TCP (every dtype, op and
# codec, bit parity across peers), DiLoCo's outer step, FSDP shards and the metrics of real
# operations. The rest never reach a kernel (wire, master, deadlines, listeners, tools) or
# repeat these files' all-reduces around a different subject; the first pass runs them.
NUMPY_FILES := $(foreach f,kernels_parity quantization shm_link e2e_allreduce diloco fsdp metrics,tests/test_$(f).py)

test: lint
	$(BIN)/python -m pytest -q -m "not slow"
	PCCL_FORCE_NUMPY=1 $(BIN)/python -m pytest -q -m "not slow and not chaos" $(NUMPY_FILES)

soak: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/pccl bench kernels --json out/kernels.json
	$(BIN)/pccl bench allreduce --peers 4 --mib 256 --streams 4 --compare gloo --json out/allreduce.json

clean:
	rm -rf $(VENV) build *.egg-info pccl/_native*.so
