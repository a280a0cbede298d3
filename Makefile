# Two commands do all the set-up: `make demo` and `make test` create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo bench clean

# pip would byte-compile every installed file, one at a time (about a minute). Instead one process imports what
# the commands and tests use and writes its bytecode into .venv (13 s), and the commands below may write the rest:
# where PYTHONDONTWRITEBYTECODE is set, every process would otherwise compile torch again (5 s), and the test
# suite's processes would each compile it at once.
RUN := PYTHONDONTWRITEBYTECODE=
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile -c constraints.txt -e ".[dev]"
	$(RUN) $(BIN)/python -c "import tokenmixers.compare, tokenmixers.detection.task, tokenmixers.analysis.erf, \
		tokenmixers.analysis.invariance, tokenmixers_cli, torch.distributed.run, torch.utils.tensorboard, \
		sklearn.datasets, pytest, xdist"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks tools
	$(RUN) $(BIN)/python -m pytest

demo: $(STAMP)
	$(RUN) $(BIN)/tokenmixers compare --output results/compare

bench: $(STAMP)
	$(RUN) $(BIN)/python benchmarks/speed.py

clean:
	rm -rf $(VENV) results .pytest_cache
