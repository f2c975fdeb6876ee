# Set-up is part of each target: a fresh machine needs only python3.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test bench clean

$(BIN)/proxyd: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# Run proxyd on the example config, with its demo backends, in the foreground.
run: $(BIN)/proxyd
	scripts/demo-backend 8081 8082 & demo=$$!; \
	trap 'kill $$demo 2>/dev/null' EXIT INT TERM; \
	$(BIN)/proxyd -c etc/proxyd.toml

test: $(BIN)/proxyd
	$(BIN)/pytest -n auto -q

bench: $(BIN)/proxyd
	$(BIN)/python scripts/bench

clean:
	rm -rf $(VENV) *.egg-info
