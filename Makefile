# `make demo` and `make test` each create .venv and install what they need:
# the demo only the package (no torch, no transformers); the tests and
# benchmarks also the dev extras (the official implementations they compare to).
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BASE_STAMP := $(VENV)/.installed-base
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: demo test benchmark clean

$(BASE_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e .
	touch $(BASE_STAMP)

# After the base: a changed pyproject.toml re-installs both.
$(DEV_STAMP): $(BASE_STAMP)
	$(VENV)/bin/pip install --quiet -e ".[dev]"
	# keras-hub (the KerasHub Gemma oracle) without its tensorflow-text requirement;
	# its real dependencies are in the dev extra (keras, h5py, kagglehub) or come with it (regex, rich).
	$(VENV)/bin/pip install --quiet --no-deps "keras-hub==0.32.0"
	touch $(DEV_STAMP)

demo: $(BASE_STAMP)
	$(VENV)/bin/python -m recurrent_lm.demo

test: $(DEV_STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

benchmark: $(DEV_STAMP)
	$(VENV)/bin/python benchmarks/scan_methods.py
	$(VENV)/bin/python benchmarks/griffin_forward.py
	$(VENV)/bin/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
