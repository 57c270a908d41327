"""Shared fixtures for these tests."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """These tests use tiny tensors: one thread is fastest, and it stays fast when the CPU is shared
    (OpenMP workers spinning against other processes make each small op ~100x slower)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
