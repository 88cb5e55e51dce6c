"""Fixtures of tests/tasks."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: a 2-thread intra-op pool on a shared 2-core box spins ~100x slower than 1 thread
    (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
