"""World-model tests run single-threaded.

Their models are tiny, so per-op overhead dominates and a second thread buys nothing; on a
busy machine two OpenMP threads spinning at barriers made the overfitting test 8x slower.
The previous setting is restored after each test, so other rooms' tests are unaffected.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
