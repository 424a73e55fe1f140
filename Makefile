# Two entry points: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# On machines that carry these wheels locally the resolver must see them first;
	# elsewhere this line falls back to the normal wheels for the platform.
	$(BIN)/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" \
		|| $(BIN)/python -m pip install -q torch torchvision
	$(BIN)/python -m pip install -q -e ".[dev,tensorboard]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/vgdistill demo $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check vgdistill tests setup.py

test: $(STAMP) lint
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs/demo
