import os
import sys

import numpy as np
import pytest
import torch

from mlsoftmax.kernels import available_impls

IMPLS = list(available_impls(torch.device("cpu")))
HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def exit_rank():
    """End a spawned rank whose results are saved, skipping torch's C++ teardown: with torch 2.4, gloo hung in
    ``destroy_process_group()`` in about 1 run of 30, and without it aborted at exit about as often."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def random_multihot(rng, b, k, p=0.1, empty_rows=()):
    y = rng.random((b, k)) < p
    y[np.arange(b), rng.integers(0, k, size=b)] = True  # at least one positive
    for r in empty_rows:
        y[r] = False
    return y
