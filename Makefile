# The two set-up commands of the README: `make demo` (main job) and `make test` (tests).
# Each creates .venv on first use from this project's own files.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-output
DEMO_STAYS ?= 2000

.PHONY: demo test lint venv clean

$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,ray]'
	touch $(STAMP)

venv: $(STAMP)

# make demo: set-up, then synth -> prepare -> quick benchmark -> analyze -> report. Re-running it skips the
# synthetic data and dataset when they exist and resumes the benchmark (finished runs are kept).
$(DEMO_DIR)/raw/planted.json: | $(STAMP)
	$(BIN)/carebench synth --out $(DEMO_DIR)/raw --stays $(DEMO_STAYS) --seed 0 --overwrite

$(DEMO_DIR)/data/manifest.json: $(DEMO_DIR)/raw/planted.json
	$(BIN)/carebench prepare --mimic-iv $(DEMO_DIR)/raw/mimic-iv --mimic-cxr $(DEMO_DIR)/raw/mimic-cxr-jpg \
		--out $(DEMO_DIR)/data --overwrite

demo: $(STAMP) $(DEMO_DIR)/data/manifest.json
	$(BIN)/carebench describe $(DEMO_DIR)/data
	$(BIN)/carebench benchmark --plan quick --data $(DEMO_DIR)/data --out $(DEMO_DIR)/runs --jobs 2
	$(BIN)/carebench analyze $(DEMO_DIR)/runs --label-groups $(DEMO_DIR)/raw/planted.json
	$(BIN)/carebench report $(DEMO_DIR)/runs --planted $(DEMO_DIR)/raw/planted.json
	@echo "Report: $(abspath $(DEMO_DIR))/runs/report/index.html"

# make test: lint (ruff check + ruff format --check, so formatting never drifts), then the whole test suite.
test: lint
	command -v chromium || (apt-get update && apt-get install -y chromium)
	$(BIN)/python -m pytest -n 2 -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks docs/make_contact_sheet.py
	$(BIN)/ruff format --check src tests benchmarks docs/make_contact_sheet.py

clean:
	rm -rf $(VENV) .venv-meds-etl $(DEMO_DIR) .pytest_cache
