# The two README commands. Both bootstrap .venv first (idempotent, fast when done).
PY := .venv/bin/python
TEST_ARGS ?=

.PHONY: setup demo test bench clean
setup:
	@bash scripts/bootstrap.sh

# Main job: a short 2-process TorchX DLRM+CCE run on synthetic Criteo-shaped data.
demo: setup
	@bash scripts/demo.sh

# The whole test suite (unit + multi-process gloo tests).
test: setup
	$(PY) -m pytest -q -p no:cacheprovider --durations=20 $(TEST_ARGS)

bench: setup
	$(PY) benchmarks/kmeans.py

clean:
	rm -rf .venv runs
