# The two commands of the README: `make serve` and `make test`. Both set up what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 50051
STORE ?= sqlite:var/recur.db

.PHONY: serve test proto models bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Serving needs only the base dependencies (no torch).
$(VENV)/.serve: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	touch $@

# Tests and training also need the train, dev and tracing extras (torch==2.13.0, CPU build).
$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[train,dev,tracing]'
	touch $@ $(VENV)/.serve

serve: $(VENV)/.serve
	mkdir -p var
	$(BIN)/recur serve --models-dir models --store $(STORE) --port $(PORT)

# tritonclient needs protobuf < 7 and the server's stubs protobuf >= 7.35: the Open Inference Protocol
# tests (tests/v2) run tritonclient scripts as subprocesses in this venv of their own.
$(VENV)-tritonclient/.done:
	$(PYTHON) -m venv $(VENV)-tritonclient
	$(VENV)-tritonclient/bin/pip install --quiet --disable-pip-version-check 'tritonclient[grpc]==2.73.0' 'protobuf>=6.33,<7' 'numpy>=1.26'
	touch $@

# The Node.js example's packages, exactly as package-lock.json pins them (tests/test_node_client.py runs it).
examples/node/node_modules/.done: examples/node/package.json examples/node/package-lock.json
	@command -v npm >/dev/null || { echo "the Node.js example needs node and npm (sudo apt-get install nodejs npm)" >&2; exit 1; }
	cd examples/node && npm ci --no-audit --no-fund --loglevel=error
	touch $@

test: $(VENV)/.dev $(VENV)-tritonclient/.done examples/node/node_modules/.done
	deploy/ensure-packages
	$(BIN)/python -m pytest -q

# Regenerate the gRPC stubs from protos/ (a test fails when they are stale).
proto: $(VENV)/.dev
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. protos/recur/v1/recur.proto protos/recur/kserve/grpc_service.proto

# Re-create the three shipped default models (about 15 minutes on 2 cores).
models: $(VENV)/.dev
	$(BIN)/recur train --task lm --cell lstm --layers 2 --hidden 256 --embed 64 --batch 64 --bptt 128 --epochs 3 --max-steps 2800 --out runs/pylm
	$(BIN)/recur export runs/pylm/best.pt --name pylm --version 1
	$(BIN)/recur train --task tagger --cell gru --layers 1 --hidden 128 --embed 32 --batch 64 --bptt 128 --epochs 1 --max-steps 1200 --out runs/pytag
	$(BIN)/recur export runs/pytag/best.pt --name pytag --version 1
	$(BIN)/recur train --task digits --cell lstm --layers 1 --hidden 64 --batch 64 --epochs 80 --lr 1e-2 --warmup 20 --out runs/digits
	$(BIN)/recur export runs/digits/best.pt --name digits --version 1

# The benchmark suite: writes BENCHMARKS.md and bench/throughput.png (several minutes; run it on a quiet machine).
# bench.capacity's load generator is h2load (Debian's nghttp2-client), outside Python.
bench: $(VENV)/.dev $(VENV)-tritonclient/.done
	deploy/ensure-packages h2load
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.capacity
	$(BIN)/python -m bench.targets
	$(BIN)/python -m bench.scale
	$(BIN)/python -m bench.redis_store
	$(BIN)/python -m bench.redis_ha
	$(BIN)/python -m bench.soak
	$(BIN)/python -m bench.v2
	$(BIN)/python -m bench.activations

clean:
	rm -rf $(VENV) $(VENV)-tritonclient var runs data examples/node/node_modules
