# Set-up and everyday commands. Every target creates the virtual environment at .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := datastore/demo
PORT ?= 8000

.PHONY: serve test lint format bench demo-datastore ohif clean

$(STAMP): requirements.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

demo-datastore: $(STAMP)
	$(PY) -m apps.sam_med2d.demo --output $(DEMO)

serve: demo-datastore
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/monailabel start_server --app apps/sam_med2d --studies $(DEMO) --host 127.0.0.1 --port $(PORT)

# The OHIF viewer served at /ohif/ (pinned @ohif/app from npm + the SAM-Med2D mode); the OHIF test builds it too.
ohif: $(STAMP)
	$(PY) -m apps.sam_med2d.ohif_viewer build

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) -m benchmarks.bench_model

clean:
	rm -rf $(VENV) datastore apps/sam_med2d/ohif/build
