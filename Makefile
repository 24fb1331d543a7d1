# Two entry points for a fresh machine (see README): `make quickstart` and `make test`.
# torch goes in first, on its own, so that no dependency pulls a multi-GB CUDA build.
# No --no-compile: with PYTHONDONTWRITEBYTECODE set (as on these machines) nothing would
# ever be compiled, and every Ray worker would compile torch and transformers again.
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
PIP    := $(PY) -m pip install -q -c constraints.txt

.PHONY: quickstart test lint format install browser clean

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[dev,minilm,synthsae]"
	# SAEBench, for the tests that check our metrics against its code: its pins (numpy<2,
	# datasets<4) clash with ours, and the functions the tests call need neither.
	$(PIP) --no-deps sae-bench
	@command -v chromium >/dev/null || $(MAKE) --no-print-directory browser
	touch $@

# The report's browser test opens it in headless Chromium (Debian's package; Playwright
# drives it, so nothing is downloaded from a browser CDN).
browser:
	apt-get install -y -q chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium) \
	  || echo "could not install Chromium (apt-get, as root): the report's browser test needs it"

install: $(VENV)/.installed

quickstart: install
	$(VENV)/bin/sae-ray sweep sweeps/quickstart.yaml

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	WANDB_MODE=offline $(PY) -m pytest -ra --durations=10

clean:
	rm -rf $(VENV) runs wandb .pytest_cache .ruff_cache
