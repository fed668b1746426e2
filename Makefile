# Everything runs from a local .venv built from nothing. torch is installed first, from the
# pinned CPU wheel, so that nothing later resolves a CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test serve world clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# pytest exits 5 when it collects nothing: that is a broken suite, not a pass.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

serve: $(STAMP)
	$(VENV)/bin/imageragturbo serve --host 127.0.0.1 --port 8000

world: $(STAMP)
	$(VENV)/bin/imageragturbo train world --out models/shapes-v2

clean:
	rm -rf $(VENV) build *.egg-info
