"""Revision syntax: HEAD, @, branch and tag names, refs/..., (short) ids, ~N, ^N."""

from __future__ import annotations

import re

from .errors import AmbiguousRevisionError, UnknownRevisionError
from .refs import Refs
from .state import HEADS, REMOTES, TAGS
from .store.odb import ObjectDB

_SUFFIX = re.compile(r"(~\d*|\^\d*)$")
_HEX = re.compile(r"^[0-9a-fA-F]{4,64}$")


def resolve_base(refs: Refs, odb: ObjectDB, name: str) -> str:
    if name in ("HEAD", "@"):
        oid = refs.head_commit()
        if oid is None:
            raise UnknownRevisionError("HEAD has no commits yet")
        return oid
    for full in (name, TAGS + name, HEADS + name, REMOTES + name):
        if full.startswith("refs/"):
            oid = refs.get(full)
            if oid is not None:
                return oid
    if _HEX.match(name):
        hits = odb.resolve_prefix(name)
        commits = [h for h in hits if odb.kind_of(h) == "commit"]
        if len(commits) == 1:
            return commits[0]
        if len(commits) > 1:
            raise AmbiguousRevisionError(f"short id {name} is ambiguous ({len(commits)} commits match)")
    raise UnknownRevisionError(f"unknown revision {name!r}")


def resolve(refs: Refs, odb: ObjectDB, rev: str) -> str:
    """The commit id that *rev* names."""
    ops = []
    base = rev.strip()
    while True:
        m = _SUFFIX.search(base)
        if not m or m.start() == 0:
            break
        ops.append(m.group(0))
        base = base[: m.start()]
    oid = resolve_base(refs, odb, base)
    for op in reversed(ops):
        n = int(op[1:]) if len(op) > 1 else 1
        if op[0] == "~":
            for _ in range(n):
                parents = odb.get(oid, "commit").parents
                if not parents:
                    raise UnknownRevisionError(f"{rev}: goes past the first commit")
                oid = parents[0]
        elif n:
            parents = odb.get(oid, "commit").parents
            if n > len(parents):
                raise UnknownRevisionError(f"{rev}: commit {oid[:12]} has no parent {n}")
            oid = parents[n - 1]
    return oid

