"""Shared test settings: bounded CPU threads, headless matplotlib, and no mmengine
default scope leaking from one test into the next."""
import os
import sys

os.environ.setdefault('MPLBACKEND', 'Agg')

import pytest  # noqa: E402
import torch  # noqa: E402
from cpus import usable_cpus  # noqa: E402

# The suite runs on small CPU machines, often beside other work: a few threads each,
# the CPUs shared out among pytest-xdist's workers where it runs in several (`make
# test`): more threads than CPUs spin against each other.
_workers = max(1, int(os.environ.get('PYTEST_XDIST_WORKER_COUNT') or 1))
torch.set_num_threads(max(1, min(4, usable_cpus() // _workers)))


def _default_scope_restored():
    """Every mmengine Runner makes its scope ('mmseg', 'mmdet', 'mmengine') the
    process-wide current one, and registries build from the current scope first; put
    back what was current before, so results do not depend on test order."""
    registry = sys.modules.get('mmengine.registry')  # never imported here first
    saved = registry.DefaultScope._instance_dict.copy() if registry else {}
    yield
    registry = sys.modules.get('mmengine.registry')
    if registry is not None:
        registry.DefaultScope._instance_dict.clear()
        registry.DefaultScope._instance_dict.update(saved)


# per test, and per module for Runners built in module-scoped fixtures
_restore_default_scope = pytest.fixture(autouse=True)(_default_scope_restored)
_restore_default_scope_per_module = pytest.fixture(
    autouse=True, scope='module')(_default_scope_restored)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """mmengine's loggers keep the stream they were created with, and one an earlier
    test captured is closed by now: a message logged to it (the default scope
    switching, a Runner's info) becomes a "Logging error" traceback on stderr, which
    the tools' one-error-line checks read. Point them at this test's stdout first."""
    logging_module = sys.modules.get('mmengine.logging')   # never imported here first
    if logging_module is not None:
        import logging
        for logger in list(logging_module.MMLogger._instance_dict.values()):
            for handler in logger.handlers:
                if type(handler) is logging.StreamHandler:
                    handler.stream = sys.stdout   # (setStream would flush the closed one)
    yield


def pytest_configure(config):
    config.addinivalue_line(
        'markers', 'gpu: needs a CUDA device, skipped without one (tests/test_gpu.py; '
        'run them with `pytest -m gpu`)')


@pytest.fixture(scope='module')
def fast_config_loading():
    """Each upstream ``mmseg::``/``mmdet::`` base resolved once per module (see
    data_gen.memoized_upstream_lookup); modules that load many configs use it."""
    from data_gen import memoized_upstream_lookup
    with memoized_upstream_lookup():
        yield


@pytest.fixture(scope='module')
def one_thread():
    """One intra-op thread for what a module runs in this process: on a small, shared
    CPU, OpenMP threads spinning against other processes make tiny models 10-100x
    slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
