"""SIGKILL `mvc commit` at random moments: every time fsck passes and HEAD is the old or the new commit."""

import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from mvc import Repo
from tests.helpers import bf16, mvc_cmd, mvc_proc, write_safetensors

KILLS = 24


def write_model(root: Path, rng) -> None:
    write_safetensors(root / "model.safetensors",
                      {f"layer{i}": ("BF16", (1024, 1024), bf16(rng, (1024, 1024))) for i in range(12)})
    (root / "config.json").write_text(f'{{"v": {rng.integers(1 << 30)}}}')


@pytest.mark.slow
def test_sigkill_during_commit(tmp_path):
    rng = np.random.default_rng(7)
    random.seed(7)
    root = tmp_path / "w"
    Repo.init(root).close()
    write_model(root, rng)
    mvc_proc("-q", "commit", "-m", "base", cwd=root, check=True)
    # how long one full commit takes here, to spread the kills over it
    write_model(root, rng)
    t = time.monotonic()
    mvc_proc("-q", "commit", "-m", "timing", cwd=root, check=True)
    full = time.monotonic() - t
    outcomes = {"old": 0, "new": 0}
    for i in range(KILLS):
        old = mvc_proc("rev-parse", "HEAD", cwd=root, check=True).stdout.strip()
        write_model(root, rng)
        proc = subprocess.Popen(mvc_cmd() + ["-q", "commit", "-m", f"attempt {i}"], cwd=root,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(random.uniform(0.0, full * 1.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        fsck = mvc_proc("fsck", cwd=root)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        head = mvc_proc("rev-parse", "HEAD", cwd=root, check=True).stdout.strip()
        if head == old:
            outcomes["old"] += 1
        else:
            with Repo(root) as r:
                c = r.commit_obj(head)
                assert c.parents == (old,) and c.message == f"attempt {i}\n"
            outcomes["new"] += 1
        # the repository keeps working after every kill
        st = mvc_proc("status", "--json", cwd=root)
        assert st.returncode == 0, st.stderr
    assert sum(outcomes.values()) == KILLS
    # whatever was left unreferenced is garbage that gc can remove, and fsck still passes
    assert mvc_proc("gc", cwd=root).returncode == 0
    assert mvc_proc("fsck", cwd=root).returncode == 0
    print(outcomes)
