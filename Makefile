# The two set-up commands of the README; each creates the environment it needs first.
#   make pipeline   run the main job end to end on the built-in default data
#   make test       run the tests
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: pipeline test repro env clean-data tanks

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)

env: $(VENV)/.installed

pipeline: $(VENV)/.installed
	$(BIN)/twin generate
	$(BIN)/twin prepare
	# the hybrid last: the latest registered version, which `twin export` / `serve` take
	$(BIN)/twin train -m model=black_box,mechanistic,hybrid num_threads=1
	$(BIN)/twin evaluate num_threads=1
	@echo "Runs and the registered model: $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db"

test: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The data stages through DVC (dvc.yaml: generate -> prepare), skipping those whose inputs
# did not change; training and evaluation are `make pipeline`'s.
repro: $(VENV)/.installed
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

clean-data:
	rm -rf data/raw data/prepared outputs

# The Cascaded Tanks benchmark end to end (benchmarks/cascaded_tanks.py): raw CSV -> twin
# prepare -> twin train (3 kinds x 3 seeds) -> twin evaluate mode=simulation ->
# benchmarks/cascaded_tanks.md.
tanks: $(VENV)/.installed
	$(BIN)/python benchmarks/cascaded_tanks.py
