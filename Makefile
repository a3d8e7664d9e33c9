# Two commands a newcomer needs: `make test` and `make demo` (as root on Debian 12 or 13).
# The project and its test extra live in a virtual environment inside the checkout ($(VENV));
# PYTHON is only the interpreter that makes it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
PREFIX ?= /usr/local
DESTDIR ?=

.PHONY: setup test lint demo install uninstall sdist

setup:
	PYTHON=$(PYTHON) VENV=$(VENV) ./scripts/setup-debian.sh
	./.ci/install-qemu.sh

# ruff; mypy (settings in pyproject.toml); the layering rules of doc/design.md.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) scripts/check_imports.py

test: setup lint
	$(PY) -m pytest -n 2 -p no:cacheprovider tests qemu-tests $(PYTEST_ARGS)
	# the guests again with the TCP data plane's C off: the Python path it is held equal to
	VHOSTPASST_DATAPLANE=python $(PY) -m pytest -n 2 -p no:cacheprovider qemu-tests \
		tests/netns/test_e2e_vhost.py $(PYTEST_ARGS)

demo: setup
	$(PY) scripts/demo.py

# The commands, passt/pasta links and the man page under $(PREFIX); the code in a venv of its
# own under $(PREFIX)/lib/vhostpasst (see doc/integration.md).
install:
	PYTHON=$(PYTHON) PREFIX=$(PREFIX) DESTDIR=$(DESTDIR) ./scripts/install.sh

uninstall:
	PREFIX=$(PREFIX) DESTDIR=$(DESTDIR) ./scripts/install.sh --uninstall

sdist: setup
	$(PY) -m build --sdist --outdir dist .
