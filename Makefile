# Everything here works on a fresh machine with only python3 (3.11+) and make:
# the first target that needs the virtual environment creates it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Running needs the runtime and the embedded servers only; the dev tools
# (pytest, ruff, mypy, schemathesis, ...) come with the first target that needs them.
RUNTIME := $(VENV)/.installed-runtime
STAMP   := $(VENV)/.installed

.PHONY: run test check lint types fmt bench clean distclean

# The daemon's modules as bytecode, as an installed package has them: a start
# then reads them instead of compiling every module again (PYTHONDONTWRITEBYTECODE
# set in the environment would otherwise leave them uncompiled). Up-to-date
# files are skipped.
BYTECODE = $(BIN)/python -m compileall -q config actors jarvisd bench > /dev/null

$(RUNTIME): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[embedded,hiredis]'
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	$(BIN)/python -m pip install --quiet -e '.[embedded,hiredis,dev]'
	touch $(STAMP)

## run: start the daemon on the default embedded config (./jarvisd.toml)
run: $(RUNTIME)
	$(BYTECODE)
	$(BIN)/jarvisd run --config jarvisd.toml

## test: the whole test suite; servers are embedded unless JARVISD_TEST_* name external ones
# (pytest keeps its rewritten test modules as bytecode too, which
# PYTHONDONTWRITEBYTECODE would make it redo on every run.)
test: $(STAMP)
	$(BYTECODE)
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check config actors jarvisd tests bench examples
	$(BIN)/ruff format --check config actors jarvisd tests bench examples

types: $(STAMP)
	$(BIN)/mypy
	$(BIN)/mypy examples

fmt: $(STAMP)
	$(BIN)/ruff format config actors jarvisd tests bench examples
	$(BIN)/ruff check --fix config actors jarvisd tests bench examples

## bench: benchmarks that print figures (embedded servers unless JARVISD_TEST_* are set);
## with BENCH_JSON=FILE each also writes its figures, floors and ratios to FILE
JSON_ARG = $(if $(BENCH_JSON),--json $(BENCH_JSON))
bench: $(STAMP)
	$(BYTECODE)
	$(BIN)/python -m bench.cache $(JSON_ARG)
	$(BIN)/python -m bench.commands $(JSON_ARG)
	$(BIN)/python -m bench.bus $(JSON_ARG)
	$(BIN)/python -m bench.sockets $(JSON_ARG)
	$(BIN)/python -m bench.replay $(JSON_ARG)
	$(BIN)/python -m bench.http $(JSON_ARG)
	$(BIN)/python -m bench.approvals $(JSON_ARG)
	$(BIN)/python -m bench.console $(JSON_ARG)
	$(BIN)/python -m bench.cli $(JSON_ARG)
	$(BIN)/python -m bench.daemons $(JSON_ARG)
	$(BIN)/python -m bench.overload $(JSON_ARG)

## check: lint, types and tests — keep it green
check: lint types test

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build *.egg-info
	find config actors jarvisd bench tests examples -name __pycache__ -prune -exec rm -rf {} +

## distclean: all that make run made, including what embedded mode keeps outside var/ as root
distclean: clean
	if [ -x $(BIN)/jarvisd ]; then $(BIN)/jarvisd embedded forget --config jarvisd.toml; fi
	rm -rf $(VENV) var
