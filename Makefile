# Two commands do everything on a fresh machine:
#   make run   - set up and run the simulated cart (Ctrl-C stops it all)
#   make test  - set up and run the whole test suite
# And:
#   make run CONFIG=my-cart.toml   - the simulated cart with another configuration
#                                    (other ports, another state folder ...)
#   make test-quick                - the tests that need no running cart (no e2e, no slow),
#                                    on three workers at once: under a minute
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
CONFIG ?=

.PHONY: run test test-quick bench soak soak-hog clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11 or newer is needed (found " + sys.version.split()[0] + ")"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(PY) -m nirf.services.launcher $(if $(CONFIG),--config $(CONFIG),--profile sim)

# Two passes: the tests that start no cart, on three workers at once (most run on manual
# clocks; none judges timing), then the whole-cart tests one at a time (their carts keep
# real time, and two carts at once would share the CPU). Both passes always run; the
# status is the first failure's.
XDIST := -n 3 --dist loadfile
# Bytecode caches on for the tests even where the environment turns them off: every worker
# and every process of every simulated cart would otherwise compile the sources anew (the
# __pycache__ folders are ignored by git).
test test-quick: export PYTHONDONTWRITEBYTECODE :=

test: $(STAMP)
	@status=0; \
	$(PY) -m pytest -q -p no:cacheprovider -m "not e2e" $(XDIST) || status=$$?; \
	$(PY) -m pytest -q -p no:cacheprovider -m e2e || status=$$?; \
	exit $$status

test-quick: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not e2e and not slow" $(XDIST)

bench: $(STAMP)
	$(PY) -m bench

soak: $(STAMP)
	$(PY) -m bench.soak --minutes $${MINUTES:-30}

# P6: the soak with a busy loop on every core beside the cart (run as root to renice)
soak-hog: $(STAMP)
	$(PY) -m bench.soak --hog --minutes $${MINUTES:-10}

clean:
	rm -rf $(VENV) var build *.egg-info
