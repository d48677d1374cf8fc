"""Test session settings."""

import os

import pytest
import torch
from tiny import scrambled_tiny_dbsam, tiny_processor

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under `pytest -n 2` each worker gets one core; more torch threads only oversubscribe them.
    torch.set_num_threads(1)


@pytest.fixture
def single_thread():
    """One torch thread for tests that run many tiny steps: on shared cores more threads only oversubscribe them,
    and one thread is deterministic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    """The tiny DB-SAM with scrambled (non-identity) weights, shared by a module's inference tests."""
    return scrambled_tiny_dbsam()


@pytest.fixture(scope="module")
def processor():
    """The tiny model's processor."""
    return tiny_processor()
