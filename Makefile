# The two commands of the README: `make bench` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test bench install clean

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.deps
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

test: install
	FASTMAML_REQUIRE_NATIVE=1 $(PY) -m pytest -q tests

$(VENV)/.peers: requirements-peers.txt $(VENV)/.deps
	-$(PY) -m pip install -q --no-deps --no-build-isolation -r requirements-peers.txt \
		|| echo "some optional benchmark peers did not install: their rows will be skipped"
	touch $@

bench: install $(VENV)/.peers
	$(PY) -m fastmaml.bench

clean:
	rm -rf build $(VENV)
