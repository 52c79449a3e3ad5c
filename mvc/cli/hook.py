"""`mvc hook ...`: hooks for other tools (the pre-commit weight-hash manifest)."""

from __future__ import annotations

import os
import subprocess
import sys

import click

from ..errors import MvcError


@click.group("hook")
def hook_group():
    """Hooks for other tools (pre-commit)."""


def _git_root_and_dir(start: str) -> tuple[str, str | None]:
    res = subprocess.run(["git", "rev-parse", "--show-toplevel", "--absolute-git-dir"], cwd=start,
                         capture_output=True, text=True)
    if res.returncode != 0:
        return os.path.abspath(start), None
    top, gitdir = res.stdout.splitlines()[:2]
    return top, gitdir


@hook_group.command("weight-hash")
@click.option("--update", is_flag=True, help="Write the manifest instead of checking it.")
@click.option("--check", "check_only", is_flag=True, help="Check only (the default).")
@click.argument("files", nargs=-1, type=click.Path())
@click.pass_obj
def weight_hash(c, update, check_only, files):
    """Check (or --update) .weight_hashes.json for FILES (default: every tracked weight file)."""
    from ..hooks import weighthash as W

    if update and check_only:
        raise MvcError("--update and --check exclude each other")
    root, gitdir = _git_root_and_dir(c.directory)
    if files:
        rels = [os.path.relpath(os.path.abspath(os.path.join(c.directory, f)), root) for f in files]
    else:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True).stdout if gitdir else b""
        rels = [p for p in listed.decode().split("\0") if p.endswith(W.SUFFIXES)]
        rels += list(W.load_manifest(root))
    cache = W.StatCache(os.path.join(gitdir, "mvc", "weight-hash-cache.json") if gitdir else None)
    reports, hashed = W.run(root, rels, update, cache)
    for r in reports:
        click.echo(f"{r.path}: {r.status}")
        for line in r.lines:
            click.echo(line)
    if update:
        click.echo(f"updated {W.MANIFEST} ({len(reports)} file(s) changed, {hashed} hashed)")
    elif reports:
        click.echo(f"{len(reports)} weight file(s) differ from {W.MANIFEST}; run `mvc hook weight-hash --update` "
                   f"and stage {W.MANIFEST}", err=True)
        sys.exit(1)
