"""Test session settings."""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under `pytest -n 2` each worker gets one core; more torch threads only oversubscribe them.
    torch.set_num_threads(1)
