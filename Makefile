# The README's two commands:
#   make demo   set up .venv if needed, then run the embedded CPU demo (tools/demo.py)
#   make test   set up .venv if needed, then run the test suite
# `make setup` always re-runs tools/setup_env.sh (idempotent; seconds once done).

SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
PYTEST_ARGS ?=
DEMO_ARGS   ?=
# pytest-xdist workers for `make test`: one per CPU this process may use (nproc, cut
# to a cgroup CPU quota), at most 4 (each holds the whole stack in memory); 1 (or
# `make test PYTEST_WORKERS=1`) runs the suite in one process, as it also runs where
# pytest-xdist is not installed. A test file stays on one worker (--dist loadfile),
# with its module fixtures.
PYTEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); \
    set -- $$(cat /sys/fs/cgroup/cpu.max 2>/dev/null); \
    if [ -n "$$2" ] && [ "$$1" != max ]; then q=$$(( ($$1 + $$2 - 1) / $$2 )); \
      [ "$$q" -lt "$$n" ] && n=$$q; fi; \
    [ "$$n" -lt 1 ] && n=1; [ "$$n" -gt 4 ] && n=4; echo $$n)

.PHONY: setup test demo clean distclean

# Re-run the set-up when the venv is missing or what defines it has changed.
$(STAMP): tools/setup_env.sh setup.py requirements/runtime.txt requirements/tests.txt
	COLORA_VENV="$(abspath $(VENV))" bash tools/setup_env.sh
	touch $@

setup:
	COLORA_VENV="$(abspath $(VENV))" bash tools/setup_env.sh
	touch $(STAMP)

# expanded when the recipe runs, after the set-up: the venv's pytest is asked
XDIST = $(if $(filter-out 0 1,$(PYTEST_WORKERS)),$(shell $(PY) -c 'import xdist' \
        2>/dev/null && echo '-n $(PYTEST_WORKERS) --dist loadfile'))

test: $(STAMP)
	$(PY) -m pytest tests $(XDIST) $(PYTEST_ARGS)

demo: $(STAMP)
	@test -f tools/demo.py || { echo "tools/demo.py is not in this checkout yet" >&2; exit 1; }
	$(PY) tools/demo.py $(DEMO_ARGS)

# Generated outputs; keeps .venv (use `make distclean` to remove it too).
clean:
	rm -rf build dist *.egg-info .pytest_cache work_dirs demo_out
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
