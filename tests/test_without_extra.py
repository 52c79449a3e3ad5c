"""Versioning works without the compress extra: torch, transformers, bitsandbytes, accelerate, peft and
yaml are made unimportable in a child process, which then runs the real CLI. Compression commands say,
in one line, which extra they need. (A fresh `pip install .` without extras is checked the same way by
hand; see the issue note: it installs no torch.)"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import bf16, sha256, tree_hashes, write_safetensors

RUNNER = r"""
import importlib.abc, sys
import os
BLOCKED = ("torch", "transformers", "bitsandbytes", "accelerate", "peft", "yaml") + tuple(
    filter(None, os.environ.get("MVC_TEST_BLOCK", "").split(",")))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Block())
import importlib.util
_find = importlib.util.find_spec
importlib.util.find_spec = lambda n, *a: None if n.split(".")[0] in BLOCKED else _find(n, *a)
sys.argv = ["mvc", *sys.argv[1:]]
from mvc.cli.main import main
main()
"""


def bare(cwd, *args, block: str = ""):
    env = dict(os.environ, MVC_TEST_BLOCK=block)
    return subprocess.run([sys.executable, "-c", RUNNER, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env=env)


def ok(cwd, *args):
    res = bare(cwd, *args)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_versioning_without_the_compress_extra(tmp_path, rng):
    a = tmp_path / "a"
    ok(tmp_path, "init", "a")
    write_safetensors(a / "m.safetensors", {f"w{i}": ("BF16", (256, 256), bf16(rng, (256, 256))) for i in range(3)})
    ok(a, "commit", "-m", "base")
    first = sha256(a / "m.safetensors")
    ok(a, "switch", "-c", "side")
    write_safetensors(a / "m.safetensors", {f"w{i}": ("BF16", (256, 256), bf16(rng, (256, 256))) for i in range(3)})
    ok(a, "commit", "-m", "side edit")
    assert "changed" in ok(a, "diff", "--stat", "main", "side")
    ok(a, "switch", "main")
    assert sha256(a / "m.safetensors") == first
    (a / "config.json").write_text("{}")
    ok(a, "commit", "-m", "config")
    ok(a, "merge", "side", "-m", "merge side")
    ok(a, "checkout", "HEAD~1")
    ok(a, "switch", "main")
    ok(a, "remote", "add", "origin", f"file://{tmp_path / 'remote'}")
    ok(a, "push")
    ok(tmp_path, "clone", f"file://{tmp_path / 'remote'}", "b")
    assert tree_hashes(tmp_path / "b") == tree_hashes(a)
    ok(a, "fsck")


def test_compression_commands_name_the_extra(tmp_path):
    ok(tmp_path, "init", "a")
    for args in (["compress", "prune", "--sparsity", "0.5"], ["eval"], ["compress", "run", "bird-bone"]):
        res = bare(tmp_path / "a", *args)
        assert res.returncode == 1, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "'compress' extra" in lines[0] and "pip install 'mvc[compress]'" in lines[0], lines


def test_report_without_torch_and_without_plotly(tmp_path, rng):
    """The report needs plotly (the report extra), not torch; without plotly it says so in one line."""
    ok(tmp_path, "init", "a")
    a = tmp_path / "a"
    up = "model.layers.0.mlp.up_proj.weight"
    write_safetensors(a / "m.safetensors", {up: ("BF16", (32, 16), bf16(rng, (32, 16)))})
    ok(a, "commit", "-m", "base")
    ok(a, "report", "-o", "r.html")
    assert "plotly" in (a / "r.html").read_text()[:200_000].lower()
    (a / "r.html").unlink()
    res = bare(a, "report", "-o", "r.html", block="plotly")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and "'report' extra" in lines[0], res.stderr
    assert not (a / "r.html").exists()
