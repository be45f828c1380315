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


def random_multihot(rng, b, k, p=0.1, empty_rows=()):
    y = rng.random((b, k)) < p
    y[np.arange(b), rng.integers(0, k, size=b)] = True  # at least one positive
    for r in empty_rows:
        y[r] = False
    return y
