"""Shared test setup: every test starts from the same seed, on one CPU thread."""

import pytest
import torch

# Test tensors are tiny: a second intra-op thread buys nothing, and on a shared 2-core machine
# spinning OpenMP workers slow tiny ops down by orders of magnitude when another process is busy.
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: compiles with torch.compile / inductor (several seconds)")


@pytest.fixture(autouse=True)
def _seed():
    """Seed torch for every test so failures reproduce."""
    torch.manual_seed(0)
    yield
