# Every target runs inside .venv, which `make venv` creates with the CPU build of torch.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: venv run test test-slow lint format clean arm-tools

# What the main job needs: torch (CPU build), the package with its server extra, the tokenizer and the native kernels.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build first (a file on this machine's disk); the package's torch>=2.4 is then satisfied.
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[server]"
	# The real Gemma tokenizer, from the maxtext wheel on PyPI, checked by sha256 and cached.
	$(BIN)/python -m gemma2.io.assets
	touch $@

# The tests and lint add the oracle (transformers), orbax with jax, peft, pytest, ruff and mypy, and,
# where apt-get works (Debian, Ubuntu), the AArch64 cross compiler and qemu-user that run the NEON
# kernels' tests on an x86-64 machine (best effort: without them those tests say what is missing).
$(BIN)/.installed-dev: $(BIN)/.installed
	$(BIN)/pip install --quiet -e ".[server,test,dev]"
	-@$(MAKE) --no-print-directory arm-tools
	touch $@

ARM_TOOLS := gcc-aarch64-linux-gnu qemu-user
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)
arm-tools:
	@if command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null; then :; \
	elif command -v apt-get >/dev/null; then \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(ARM_TOOLS) >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -q >/dev/null 2>&1 && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(ARM_TOOLS) >/dev/null 2>&1; } || \
		echo "notice: could not install $(ARM_TOOLS); the NEON kernel tests will skip"; \
	else echo "notice: no apt-get; the NEON kernel tests need aarch64-linux-gnu-gcc and qemu-aarch64"; fi

venv: $(BIN)/.installed

# The main job: stream a completion from the default model.
run: venv
	$(BIN)/gemma2 generate --repetition-penalty 1.1 --max-new-tokens 80 "os.path.join(a, *p)"

test: $(BIN)/.installed-dev
	$(BIN)/python -m pytest -m "not slow and not gpu"

test-slow: $(BIN)/.installed-dev
	$(BIN)/python -m pytest -m "slow"

lint: $(BIN)/.installed-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy src

format: $(BIN)/.installed-dev
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
