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


def test_checking_out_a_bf16_model_and_its_fine_tune_imports_no_numpy(tmp_path, rng):
    """numpy's import is 70-100 ms of a checkout's start: the checkout of two-byte planes, whole
    or as differences, runs on the C kernels and buffers alone (and writes the files bit-exact)."""
    import hashlib

    import numpy as np

    from mvc.store import kernels
    from tests.helpers import bf16, mvc_proc, write_safetensors

    if not kernels.native():
        pytest.skip("the C kernels are not built here")
    root = tmp_path / "w"
    root.mkdir()
    assert mvc_proc("init", ".", cwd=root).returncode == 0
    base = {f"l{i}": bf16(rng, (512, 1024)) for i in range(3)}
    n = 512 * 1024

    def tuned(v):  # a fine-tune: most elements a few units off, some far (kernels.undiff_parts' case)
        step = rng.standard_normal(n) * np.where(rng.random(n) < 0.03, 400, 20)
        return (np.frombuffer(v, np.uint16).astype(np.int32) + step.astype(np.int32)).astype(np.uint16).tobytes()

    hashes = []
    for step, tensors in enumerate([base, {k: tuned(v) for k, v in base.items()}]):
        write_safetensors(root / "m.safetensors", {k: ("BF16", (512, 1024), v) for k, v in tensors.items()})
        hashes.append(hashlib.sha256((root / "m.safetensors").read_bytes()).hexdigest())
        assert mvc_proc("-q", "commit", "-m", f"v{step}", cwd=root).returncode == 0
    from mvc import Repo
    from mvc.store import codec

    repo = Repo(root)
    file = repo.odb.get(repo.tree_of("main").entries[0].oid, "file")
    chunks = [c for _, tid in file.tensors for c in repo.odb.get(tid, "tensor").chunks]
    assert chunks and all(isinstance(codec.diff_level(repo.backend.get(bytes.fromhex(c)))[3], codec.NibbleDiff)
                          for c in chunks)
    repo.close()
    probe = ("import sys, atexit\n"
             "atexit.register(lambda: print('numpy' in sys.modules, file=sys.stderr))\n"
             "from mvc.cli import main\n"
             "sys.argv = ['mvc', '-q', 'checkout', '-f', sys.argv[1]]\n"
             "main()\n")
    for rev, want in (("main~1", hashes[0]), ("main", hashes[1])):
        os.remove(root / "m.safetensors")
        p = subprocess.run([sys.executable, "-c", probe, rev], cwd=root, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        assert p.stderr.strip().splitlines()[-1] == "False", p.stderr
        assert hashlib.sha256((root / "m.safetensors").read_bytes()).hexdigest() == want
