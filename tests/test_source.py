"""Plumbing never prints or reads the environment; the commit and checkout paths never import torch
(the import table itself is tests/test_layers.py)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "mvc"
# modules allowed to print, read os.environ or exit: the CLI, and entry points for humans
FRONT = {"cli", "demo.py", "__main__.py"}


def modules():
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG)
        yield rel, ast.parse(p.read_text(), str(p))


def is_front(rel: Path) -> bool:
    return rel.parts[0] in FRONT


@pytest.mark.parametrize("rel,tree", list(modules()), ids=lambda x: str(x) if isinstance(x, Path) else "")
def test_plumbing_does_not_print_or_read_env(rel, tree):
    if is_front(rel):
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in ("print", "input", "exit"), f"{rel}:{node.lineno} calls {node.func.id}"
        if isinstance(node, ast.Attribute) and node.attr == "environ":
            raise AssertionError(f"{rel}:{node.lineno} reads os.environ")
        if (isinstance(node, ast.Attribute) and node.attr in ("stdout", "stderr")
                and isinstance(node.value, ast.Name) and node.value.id == "sys"):
            raise AssertionError(f"{rel}:{node.lineno} touches sys.{node.attr}")


def test_commit_and_checkout_never_import_torch(tmp_path, rng):
    from tests.helpers import bf16, write_safetensors

    root = tmp_path / "w"
    write_safetensors(root / "m.safetensors", {"w": ("BF16", (256, 256), bf16(rng, (256, 256)))})
    import pickle
    import zipfile

    with zipfile.ZipFile(root / "weights.pt", "w") as z:  # a torch zip's layout: its pickle is scanned
        z.writestr("archive/data.pkl", pickle.dumps({"a": 1}, protocol=2))
    script = f"""
import os, sys
from mvc.cli.main import cli
def run(*a):
    try:
        cli(list(a), standalone_mode=False)
    except SystemExit:
        pass
os.chdir({str(root)!r})
run("init", ".")
run("commit", "-m", "one")
os.remove("m.safetensors")
run("checkout", "-f", "main")
run("status")
run("diff", "--stat")
bad = [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "bitsandbytes")]
print("HEAVY", bad)
assert os.path.exists("m.safetensors")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out, out
