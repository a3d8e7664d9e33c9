# Two commands a newcomer needs: `make test` and `make demo`.
PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: setup test lint demo

setup:
	./scripts/setup-debian.sh
	./.ci/install-qemu.sh

lint: setup
	$(PYTHON) -m ruff check .

test: setup lint
	$(PYTHON) -m pytest -n 2 -p no:cacheprovider tests qemu-tests $(PYTEST_ARGS)

demo: setup
	$(PYTHON) scripts/demo.py
