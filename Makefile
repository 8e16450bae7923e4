# The two commands of the README: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The demo and the image run lbapp's launcher (`lbapp`, lbapp/cli.py), which starts uvicorn with
# the production defaults and the hardened protocol; `uvicorn lbapp:app` is the lower-level way.

.PHONY: install test lint demo bench profile soak clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check lbapp tests
	$(BIN)/ruff format --check lbapp tests
	$(BIN)/mypy --strict lbapp

test: lint
	$(BIN)/pytest

# Three echo backends on 127.0.0.1:3001-3003 and lbapp on 127.0.0.1:8080; Ctrl-C stops all four.
# The echo backends serve /health, so the demo checks that path (the default check is a TCP connect).
demo: $(STAMP)
	@pids=""; trap 'kill $$pids 2>/dev/null; wait' EXIT INT TERM; \
	for i in 1 2 3; do $(BIN)/python -m lbapp.echo --port 300$$i --name backend-$$i & pids="$$pids $$!"; done; \
	LB_HEALTH_PATH=/health $(BIN)/lbapp --host 127.0.0.1 --port 8080

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info

# wrk benchmark of lbapp (launcher, 1 and 2 workers, access log on and off) against nginx and Go's
# httputil.ReverseProxy in one run of interleaved rounds: small, 1 MiB down, 1 MiB up, Connection:
# close, 10,000 idle clients. Installs wrk/nginx/golang-go with apt when root. See bench/README.md.
bench: $(STAMP)
	PYTHON=$(BIN)/python bench/run.sh

# py-spy flame graph (+ collapsed stacks) of lbapp under wrk load: bench/results/flame-<time>.svg.
profile: $(STAMP)
	$(BIN)/python -m pip install --quiet -r bench/requirements.txt
	PYTHON=$(BIN)/python $(BIN)/python bench/profile.py

# Soak test (not in CI): SOAK_SECONDS (default 600) of load with backends killed and restarted and
# clients aborting; CSV and PNG in bench/results/, non-zero exit if RSS or fds grow > 5%.
soak: $(STAMP)
	$(BIN)/python -m pip install --quiet -r bench/requirements.txt
	$(BIN)/python bench/soak.py --duration $${SOAK_SECONDS:-600} $(SOAK_ARGS)
