"""The layering rule, enforced on the AST of every module (imports inside functions too).

    base (errors, state, progress, locking, filehash)
      <- store <- formats <- core <- {remote, compress} <- hooks <- cli

A module may import its own layer and the layers below it, nothing above, and remote and
compress never import each other. The package root (mvc/__init__.py) composes the layers
(it hands the core the remote layer's lazy fetcher) and may import anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "mvc"

BASE = {"errors", "state", "progress", "locking", "filehash"}
RANK = {"base": 0, "store": 1, "formats": 2, "core": 3, "remote": 4, "compress": 4, "hooks": 5, "cli": 6}
#: (importing module, imported module) pairs allowed against the table, each with its reason
ALLOWED: dict[tuple[str, str], str] = {}
HEAVY = ("torch", "transformers", "bitsandbytes", "peft", "accelerate", "safetensors.torch")


def layer(mod: str) -> str | None:
    """The layer of a module name such as 'mvc.store.odb' (None: the package root)."""
    parts = mod.split(".")
    if parts == ["mvc"]:
        return None
    head = parts[1]
    if head in ("store", "formats", "remote", "compress", "hooks", "cli"):
        return head
    if head == "__main__":
        return "cli"
    return "base" if head in BASE else "core"


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, source: str | None = None):
    """(line, absolute module name, at module level?) of every import of an mvc module."""
    mod = module_name(path)
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(source if source is not None else path.read_text(), str(path))
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, id(node) in top
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module is None or not node.level and target == "mvc":
                for a in node.names:  # `from .. import x` may name a module
                    yield node.lineno, f"{target}.{a.name}", id(node) in top
            else:
                yield node.lineno, target, id(node) in top


def violations(path: Path, source: str | None = None) -> list[str]:
    mod = module_name(path)
    mine = layer(mod)
    out = []
    for line, target, at_top in imports(path, source):
        if at_top and mine not in ("compress", None) and target.startswith(HEAVY):
            out.append(f"{mod}:{line} imports {target} at module level (only mvc.compress may)")
        if not target.startswith("mvc.") or mine is None:
            continue
        theirs = layer(target)
        if theirs is None or (mod, target) in ALLOWED:
            continue
        if RANK[theirs] > RANK[mine] or (RANK[theirs] == RANK[mine] and theirs != mine):
            out.append(f"{mod}:{line} ({mine}) imports {target} ({theirs})")
    return out


def all_modules():
    return sorted(PKG.rglob("*.py"))


@pytest.mark.parametrize("path", all_modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_module_keeps_to_its_layer(path):
    assert violations(path) == []


def test_a_store_module_importing_the_repo_is_caught():
    path = PKG / "store" / "odb.py"
    src = path.read_text() + "\n\ndef sneaky():\n    from mvc import repo\n    return repo\n"
    assert any("imports mvc.repo (core)" in v for v in violations(path, src))
    src = path.read_text() + "\n\ndef sneaky():\n    from ..repo import Repo\n    return Repo\n"
    assert any("imports mvc.repo (core)" in v for v in violations(path, src))


def test_a_module_level_torch_import_in_the_core_is_caught():
    path = PKG / "repo.py"
    assert any("imports torch at module level" in v for v in violations(path, "import torch\n" + path.read_text()))
    # inside a function it is allowed: only the commands that need it pay for it
    assert violations(path, path.read_text() + "\n\ndef f():\n    import torch\n    return torch\n") == []


def test_remote_and_compress_stay_apart():
    path = PKG / "compress" / "runner.py"
    assert any("(remote)" in v for v in violations(path, "from ..remote import sync\n" + path.read_text()))


def test_the_table_covers_every_module():
    for path in all_modules():
        mod = module_name(path)
        assert mod == "mvc" or layer(mod) in RANK, mod
