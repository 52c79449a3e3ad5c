"""`mvc git ...`: Git integration commands (install, track, the filter process)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import click

from ..errors import MvcError, UsageError

ATTR = "filter=mvc diff=mvc merge=mvc -text"


def _mvc_command() -> str:
    """How Git should start mvc: this installation's console script, quoted for the shell."""
    exe = shutil.which("mvc")
    here = os.path.join(os.path.dirname(sys.executable), "mvc")
    if os.path.exists(here):
        exe = here
    return f"'{exe}'" if exe else f"'{sys.executable}' -m mvc"


def _git(*args: str, cwd: str = ".") -> str:
    try:
        res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise MvcError("git is not installed", hint="apt-get install git") from e
    if res.returncode != 0:
        raise MvcError(f"git {' '.join(args)} failed: {res.stderr.strip()}")
    return res.stdout


@click.group("git")
def git_group():
    """Use mvc as Git's storage for model files (clean/smudge filter)."""


@git_group.command()
@click.option("--global", "scope", flag_value="--global", help="In ~/.gitconfig instead of this repository.")
@click.option("--local", "scope", flag_value="--local", default=True, help="In this repository (default).")
@click.pass_obj
def install(c, scope):
    """Configure the mvc filter for Git (filter.mvc.process, required)."""
    from ..hooks.git.filter import git_dir, open_store

    cwd = c.directory
    cmd = _mvc_command()
    _git("config", scope, "filter.mvc.process", f"{cmd} git filter-process", cwd=cwd)
    _git("config", scope, "filter.mvc.required", "true", cwd=cwd)
    _git("config", scope, "diff.mvc.command", f"{cmd} git diff-driver", cwd=cwd)
    _git("config", scope, "diff.mvc.textconv", f"{cmd} git textconv", cwd=cwd)
    _git("config", scope, "diff.mvc.binary", "true", cwd=cwd)
    _git("config", scope, "merge.mvc.name", "mvc tensor merge", cwd=cwd)
    _git("config", scope, "merge.mvc.driver", f"{cmd} git merge-driver %O %A %B %P", cwd=cwd)
    if scope == "--local":
        gd = git_dir(cwd)
        open_store(gd, create=True)
        _install_pre_push(gd, cmd)
        restored = _smudge_pointer_files(cwd)
        if restored:
            click.echo(f"checked out {restored} model file(s) that were still pointers")
    click.echo(f"mvc filter installed ({scope[2:]}); track files with `mvc git track '*.safetensors'`")


def _smudge_pointer_files(cwd: str) -> int:
    """Files a clone wrote as pointers before the filter was configured: check them out again."""
    from ..hooks.git.pointer import MAX_SIZE, parse

    top = _git("rev-parse", "--show-toplevel", cwd=cwd).strip()
    res = subprocess.run(["git", "ls-files", "-z"], cwd=top, capture_output=True)
    paths = []
    for rel in res.stdout.decode("utf-8", "replace").split("\0"):
        full = os.path.join(top, rel)
        if rel and os.path.isfile(full) and not os.path.islink(full) and os.path.getsize(full) <= MAX_SIZE:
            with open(full, "rb") as f:
                if parse(f.read()) is not None:
                    paths.append(rel)
    if paths:
        # Git skips index-clean files on checkout: move the pointers aside first, restore them on failure
        for rel in paths:
            os.replace(os.path.join(top, rel), os.path.join(top, rel) + ".mvc-pointer")
        try:
            _git("checkout", "--", *paths, cwd=top)
        finally:
            for rel in paths:
                aside = os.path.join(top, rel) + ".mvc-pointer"
                if os.path.exists(os.path.join(top, rel)):
                    os.remove(aside)
                else:
                    os.replace(aside, os.path.join(top, rel))
    return len(paths)


@git_group.command()
@click.option("--global", "scope", flag_value="--global")
@click.option("--local", "scope", flag_value="--local", default=True)
@click.pass_obj
def uninstall(c, scope):
    """Remove the mvc filter from Git's config (objects in .git/mvc stay)."""
    for section in ("filter.mvc", "diff.mvc", "merge.mvc"):
        subprocess.run(["git", "config", scope, "--remove-section", section], cwd=c.directory,
                       capture_output=True)
    click.echo("mvc filter removed")


@git_group.command()
@click.argument("patterns", nargs=-1, required=True)
@click.pass_obj
def track(c, patterns):
    """Route files matching PATTERNS through mvc (.gitattributes)."""
    top = _git("rev-parse", "--show-toplevel", cwd=c.directory).strip()
    path = os.path.join(top, ".gitattributes")
    lines = open(path, encoding="utf-8").read().splitlines() if os.path.exists(path) else []
    for p in patterns:
        if any(ch in p for ch in "\n\r\0") or " " in p:
            raise UsageError(f"pattern {p!r}: no spaces or control characters")
        rule = f"{p} {ATTR}"
        if rule not in lines:
            lines.append(rule)
            click.echo(f"tracking {p}")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def _gitdir() -> str:
    """The repository's .git directory: $GIT_DIR when Git set it (hooks, filters), else discovered."""
    from ..hooks.git.filter import git_dir

    return os.path.abspath(os.environ.get("GIT_DIR") or git_dir("."))


def _origin_store() -> str | None:
    """The mvc store of a local origin (a path or file:// URL), where missing objects can come from."""
    res = subprocess.run(["git", "config", "--get", "remote.origin.url"], capture_output=True, text=True)
    url = res.stdout.strip()
    if not url:
        return None
    if url.startswith("file://"):
        url = url[len("file://"):]
    elif "://" in url or (":" in url.split("/")[0] and not os.path.exists(url)):
        return None  # a network remote: objects come from the mvc remote instead
    path = os.path.abspath(url)
    gitdir = os.path.join(path, ".git") if os.path.isdir(os.path.join(path, ".git")) else path
    return os.path.join(gitdir, "mvc", "store")


@git_group.command("filter-process")
def filter_process():
    """Git's long-running filter (started by Git, speaks pkt-lines on stdin/stdout)."""
    from ..hooks.git.filter import Filter, open_store, serve
    from ..hooks.git.history import store_lock

    gd = _gitdir()
    filt = Filter(open_store(gd), os.path.join(gd, "mvc", "tmp"), fallback_store=_origin_store())

    def log(msg: str) -> None:
        sys.stderr.write(msg + "\n")
        sys.stderr.flush()

    with store_lock(gd, exclusive=False):
        serve(sys.stdin.buffer, sys.stdout.buffer, filt, log)


def _store():
    from ..hooks.git.filter import open_store

    return open_store(_gitdir())


@git_group.command("diff-driver", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def diff_driver(args):
    """Git's external diff for tracked models: PATH OLD OLD-HEX OLD-MODE NEW NEW-HEX NEW-MODE."""
    from ..hooks.git.drivers import diff_files
    from . import render

    if len(args) < 7:
        raise UsageError("diff-driver is started by Git with 7 arguments")
    name, old, new = args[0], args[1], args[4]
    fc = diff_files(_store(), name, old, new)
    click.echo(f"mvc diff {name}")
    render.render_full([fc])


@git_group.command("textconv")
@click.argument("path")
def textconv(path):
    """Git's textconv for tracked models: one line per tensor (for `git log -p`)."""
    from ..hooks.git.drivers import textconv_lines

    for line in textconv_lines(_store(), path, path):
        click.echo(line)


@git_group.command("merge-driver")
@click.argument("base")
@click.argument("ours")
@click.argument("theirs")
@click.argument("name")
def merge_driver(base, ours, theirs, name):
    """Git's merge driver: a three-way tensor merge of three pointers, the result written to OURS."""
    from ..graph import StoreView
    from ..hooks.git.drivers import merge_pointers

    def read(p):
        with open(p, "rb") as f:
            return f.read()

    merged, conflicts = merge_pointers(StoreView(_store()), name, read(base), read(ours), read(theirs))
    if merged is None:
        where = ", ".join(f"{c.tensor or c.path} ({c.elements} elements)" if c.elements else (c.tensor or c.path)
                          for c in conflicts[:5])
        raise MvcError(f"{name}: tensor conflict in {where}",
                       hint="pick a side with `git checkout --ours/--theirs`, or merge with mvc's strategies")
    with open(ours, "wb") as f:
        f.write(merged)


PRE_PUSH = """#!/bin/sh
# installed by `mvc git install`: push the mvc objects that pushed commits need
exec {cmd} git pre-push "$@"
"""


def _install_pre_push(gitdir: str, cmd: str) -> None:
    path = os.path.join(gitdir, "hooks", "pre-push")
    if os.path.exists(path) and "mvc git install" not in open(path, encoding="utf-8", errors="replace").read():
        click.echo(f"note: {path} exists and is not mvc's; not replaced", err=True)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(PRE_PUSH.format(cmd=cmd))
    os.chmod(path, 0o755)


@git_group.command("pre-push", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def pre_push(args):
    """Git's pre-push hook. It says where the model objects are (uploading them is not wired to Git yet)."""
    click.echo("mvc: model objects stay in .git/mvc/store (uploading them to an mvc remote from `git push` "
               "is not wired yet); a clone of this repository on this machine fetches them from here", err=True)


@git_group.command("fsck")
@click.option("--json", "as_json", is_flag=True)
def git_fsck_cmd(as_json):
    """Check that every pointer reachable in Git's history has all its objects, intact."""
    from ..hooks.git.history import git_fsck
    from . import render

    gd = _gitdir()
    rep = git_fsck(_store(), gd)
    render.render_fsck(rep, "pointers", as_json)
    if not rep.ok:
        sys.exit(1)


@git_group.command("gc")
@click.option("-n", "--dry-run", is_flag=True)
def git_gc_cmd(dry_run):
    """Delete mvc objects that no pointer in Git's history or index needs."""
    from ..hooks.git.history import git_gc
    from . import render

    gd = _gitdir()
    kept, removed, freed = git_gc(_store(), gd, dry_run)
    click.echo(f"{'would remove' if dry_run else 'removed'} {removed} objects ({render.human(freed)}), kept {kept}")
