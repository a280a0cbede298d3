# Two commands do all the set-up: `make demo` and `make test` create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo bench clean

# pip byte-compiles one file at a time (about a minute); compileall on every core takes a third of that.
# It matters where PYTHONDONTWRITEBYTECODE is set: each process would compile torch again (5 s). A few of torch's test
# helpers are Python 3.12 syntax and fail to compile, hence the ignored status.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile -c constraints.txt -e ".[dev]"
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib src > /dev/null 2>&1 || true
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/tokenmixers compare --output results/compare

bench: $(STAMP)
	$(BIN)/python benchmarks/speed.py

clean:
	rm -rf $(VENV) results .pytest_cache
