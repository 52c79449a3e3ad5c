import os

import numpy as np
import pytest

from mvc import Repo

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MVC_AUTHOR", "Test <test@example.com>")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def repo(tmp_path):
    r = Repo.init(tmp_path / "work")
    yield r
    r.close()
