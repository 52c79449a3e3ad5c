"""bisect: a planted regression in a 64-commit history is found in at most 7 evaluations."""

import json
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mvc import Repo
from tests.helpers import mvc_proc, write_safetensors

N = 64
BAD_AT = 41  # commit index (0-based) where the regression lands


@pytest.fixture
def history(tmp_path):
    root = tmp_path / "w"
    repo = Repo.init(root)
    rng = np.random.default_rng(0)
    ids = []
    w = rng.standard_normal(256).astype("<f4")
    for i in range(N):
        w = w + rng.standard_normal(256).astype("<f4") * 1e-3
        if i == BAD_AT:
            w[7] = 1e6  # the regression
        write_safetensors(root / "model.safetensors", {"w": ("F32", (256,), w.tobytes()),
                                                        "step": ("I64", (1,), np.int64(i).tobytes())})
        ids.append(repo.commit(f"step {i}", when=1_700_000_000 + i))
    repo.close()
    (root / ".mvcignore").write_text("check.py\ncount.txt\n.mvcignore\n")
    (root / "check.py").write_text(textwrap.dedent("""
        import os, sys
        import numpy as np
        from safetensors.numpy import load_file
        with open("count.txt", "a") as f:
            f.write(os.environ["MVC_BISECT_REV"] + "\\n")
        t = load_file("model.safetensors")
        step = int(t["step"][0])
        if step in SKIP:
            sys.exit(125)
        if "--metric" in sys.argv:
            print("max", float(np.abs(t["w"]).max()))
            sys.exit(0)
        sys.exit(1 if np.abs(t["w"]).max() > 1e3 else 0)
    """).replace("SKIP", os.environ.get("MVC_TEST_SKIP", "()")))
    return root, ids


def run_bisect(root, *extra, skip=(), script_args=()):
    check = (root / "check.py").read_text().replace("in ()", f"in {tuple(skip)!r}")
    (root / "check.py").write_text(check)
    assert mvc_proc("bisect", "start", "HEAD", "HEAD~63", cwd=root).returncode == 0
    res = mvc_proc("bisect", "run", *extra, sys.executable, "check.py", *script_args, cwd=root)
    assert res.returncode == 0, res.stdout + res.stderr
    evaluated = (root / "count.txt").read_text().split()
    return res, evaluated


def test_finds_planted_regression(history):
    root, ids = history
    res, evaluated = run_bisect(root)
    assert f"{ids[BAD_AT]} is the first bad commit" in res.stdout
    assert f"step {BAD_AT}" in res.stdout and "model.safetensors:w" in res.stdout
    assert len(evaluated) <= 7
    assert all(e in ids for e in evaluated)
    # state survives between commands; reset returns to the branch
    log = mvc_proc("bisect", "log", cwd=root).stdout
    assert log.startswith("mvc bisect start") and f"bisect bad {ids[BAD_AT]}" in log
    assert mvc_proc("bisect", "reset", cwd=root).returncode == 0
    st = json.loads(mvc_proc("status", "--json", cwd=root).stdout)
    assert st["branch"] == "main" and st["head"] == ids[-1] and st["clean"]


def test_skip_is_honoured(history):
    root, ids = history
    res, evaluated = run_bisect(root, skip=(31, 32, 45))
    assert f"{ids[BAD_AT]} is the first bad commit" in res.stdout
    assert "skip" in res.stdout


def test_skipping_the_neighbour_leaves_two_suspects(history):
    root, ids = history
    res, _ = run_bisect(root, skip=(BAD_AT - 1,))
    assert "the first bad commit is one of:" in res.stdout
    assert ids[BAD_AT - 1][:12] in res.stdout and ids[BAD_AT][:12] in res.stdout


def test_metric_mode(history):
    root, ids = history
    res, evaluated = run_bisect(root, "--metric", "--threshold", "1000", script_args=("--metric",))
    assert f"{ids[BAD_AT]} is the first bad commit" in res.stdout
    assert "metric" in res.stdout and len(evaluated) <= 7


def test_manual_marks_across_commands(history):
    root, ids = history
    assert mvc_proc("bisect", "start", cwd=root).returncode == 0
    assert mvc_proc("bisect", "bad", cwd=root).returncode == 0
    out = mvc_proc("bisect", "good", ids[0], cwd=root).stdout
    assert "Bisecting:" in out
    for _ in range(8):
        with Repo(root) as r:
            step = int(r.load("HEAD")["step"][0])
        out = mvc_proc("bisect", "bad" if step >= BAD_AT else "good", cwd=root).stdout
        if "is the first bad commit" in out:
            break
    assert f"{ids[BAD_AT]} is the first bad commit" in out


def test_missing_command_changes_nothing(history):
    root, ids = history
    mvc_proc("bisect", "start", "HEAD", "HEAD~63", cwd=root, check=True)
    head = mvc_proc("rev-parse", "HEAD", cwd=root).stdout
    log = mvc_proc("bisect", "log", cwd=root).stdout
    res = mvc_proc("bisect", "run", "no-such-command-xyz", cwd=root)
    assert res.returncode != 0 and "not found" in res.stderr and "Traceback" not in res.stderr
    assert mvc_proc("rev-parse", "HEAD", cwd=root).stdout == head
    assert mvc_proc("bisect", "log", cwd=root).stdout == log


def test_bad_input(history):
    root, ids = history
    res = mvc_proc("bisect", "good", cwd=root)
    assert res.returncode != 0 and "not bisecting" in res.stderr
    res = mvc_proc("bisect", "start", "HEAD~63", "HEAD", cwd=root)  # swapped
    assert res.returncode != 0 and "ancestor of a good one" in res.stderr
    assert "not bisecting" in mvc_proc("bisect", "log", cwd=root).stderr


def test_abort_on_exit_code_over_127(history):
    root, _ = history
    mvc_proc("bisect", "start", "HEAD", "HEAD~63", cwd=root, check=True)
    res = mvc_proc("bisect", "run", sys.executable, "-c", "import sys; sys.exit(200)", cwd=root)
    assert res.returncode != 0 and "outside 0-127" in res.stderr
    assert Path(root).exists()
