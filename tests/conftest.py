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


@pytest.fixture(scope="session")
def demo_base(tmp_path_factory):
    """A repository made by `mvc init --demo` once per session; tests get copies (`demo`)."""
    from mvc.compress.demo_model import init_demo

    path = tmp_path_factory.mktemp("demo") / "repo"
    init_demo(str(path)).close()
    return path


@pytest.fixture
def demo(demo_base, tmp_path):
    import shutil

    path = tmp_path / "repo"
    shutil.copytree(demo_base, path)
    return path


@pytest.fixture(scope="module")
def s3_server():
    """A real S3-compatible server (moto's standalone server) on 127.0.0.1: its endpoint URL."""
    pytest.importorskip("moto")
    from tests.remotes import start_moto

    proc, url = start_moto()
    yield url
    proc.terminate()
    proc.wait(timeout=10)
