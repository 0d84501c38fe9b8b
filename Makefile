# `make demo` and `make test` each create .venv and install what they need.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test benchmark clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m recurrent_lm.demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile

benchmark: $(STAMP)
	$(VENV)/bin/python benchmarks/scan_methods.py
	$(VENV)/bin/python benchmarks/griffin_forward.py
	$(VENV)/bin/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
