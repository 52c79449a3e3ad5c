"""Peak memory stays near a few chunks, not the model or its largest tensor (the 2 GiB figure is
measured by `python -m bench --size-mib 2048 --largest-mib 256`, see docs/benchmarks.md)."""

import os
import subprocess
import sys

import pytest

from bench.__main__ import timed
from mvc.synth import write_model


@pytest.mark.slow
def test_commit_and_checkout_rss_independent_of_model_size(tmp_path):
    root = tmp_path / "w"
    root.mkdir()
    write_model(str(root / "model.safetensors"), 512, seed=0, largest_mib=192)
    subprocess.run([sys.executable, "-m", "mvc", "init", "."], cwd=root, check=True, capture_output=True)

    def peak(*args):
        return timed(list(args), str(root))[1]

    commit = peak("-q", "commit", "-m", "big")
    os.remove(root / "model.safetensors")
    checkout = peak("-q", "checkout", "-f", "main")
    size = 700 * 2**20  # the model is ~0.7 GiB with a 192 MiB tensor
    assert commit < 400 * 2**20 and checkout < 400 * 2**20, (commit, checkout)
    assert commit < size / 1.5 and checkout < size / 1.5
