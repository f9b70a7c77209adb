"""Every test starts from the same global RNG state, so an unseeded draw cannot make a test flaky.
The repository root goes on sys.path so that test files import ``tests.helpers``."""
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
