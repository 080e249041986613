"""The adapter tests run tiny tensors: one intra-op thread each. Threads buy nothing at
these sizes and, on a shared machine, OpenMP's waiting turns milliseconds into seconds."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
