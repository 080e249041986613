"""The adapter tests run tiny tensors: one intra-op thread each. Threads buy nothing at
these sizes and, on a shared machine, OpenMP's waiting turns milliseconds into seconds."""
import os

import pytest
import torch

from colora_mm.adapters import up3x3


@pytest.fixture(scope='module')
def kernel():
    """The C++ extension (up-projection, filter and pair-factor kernels), built on first
    use; skipped without a toolchain, a failure in CI."""
    module = up3x3.load_kernel()
    if module is None:
        if os.environ.get('CI'):
            pytest.fail(f'the extension did not build in CI: {up3x3._state.get("error")}')
        pytest.skip(f'no C++ toolchain here: {up3x3._state.get("error")}')
    return module


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
