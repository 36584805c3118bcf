# The README's commands. Installs pin the torch/torchvision pair known to work (constraints.txt).
PYTHON ?= python3
PIP_INSTALL = $(PYTHON) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: install demo test coverage

install:
	$(PIP_INSTALL) -e .

demo: install
	$(PYTHON) -m ptsp.cli prune --overwrite

test:
	$(PIP_INSTALL) -e ".[dev]"
	$(PYTHON) -m pytest -q

coverage: install
	$(PYTHON) recipes/coverage.py
