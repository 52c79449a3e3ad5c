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


def _git(*args: str, cwd: str = ".", env: dict | None = None) -> str:
    try:
        res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env=env)
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
        if not _skip_smudge():
            try:
                restored = _smudge_pointer_files(gd, c.progress())
            except MvcError as e:
                raise MvcError(f"mvc filter installed, but model files stay pointers: {e}", hint=e.hint) from e
            if restored:
                click.echo(f"checked out {restored} model file(s) that were still pointers")
    click.echo(f"mvc filter installed ({scope[2:]}); track files with `mvc git track '*.safetensors'`")


def git_work_tree(directory: str) -> str | None:
    """The top of the Git work tree containing *directory* where `mvc git install` ran, else None."""
    import pygit2

    from ..hooks.git.transfer import workdir_of

    found = pygit2.discover_repository(os.path.abspath(directory))
    if not found or not os.path.isdir(os.path.join(found, "mvc")):
        return None
    return workdir_of(found)


def _skip_smudge() -> bool:
    return os.environ.get("MVC_SKIP_SMUDGE", "") not in ("", "0")


def _sources(gd: str, git_remote: str | None = None):
    from ..hooks.git.filter import open_store
    from ..hooks.git.transfer import Sources, workdir_of

    return Sources(open_store(gd), gd, workdir_of(gd), git_remote)


def _smudge_pointer_files(gd: str, progress, git_remote: str | None = None, sources=None) -> int:
    """Work-tree files that are still pointers (a clone made before the filter was configured, or
    with MVC_SKIP_SMUDGE): fetch their objects (in parallel, verified), then check them out again."""
    from ..hooks.git.pointer import MAX_SIZE, parse
    from ..hooks.git.transfer import workdir_of

    top = workdir_of(gd)
    if top is None:
        return 0
    res = subprocess.run(["git", "ls-files", "-z"], cwd=top, capture_output=True)
    paths, oids = [], []
    for rel in res.stdout.decode("utf-8", "surrogateescape").split("\0"):
        full = os.path.join(top, rel)
        if rel and os.path.isfile(full) and not os.path.islink(full) and os.path.getsize(full) <= MAX_SIZE:
            with open(full, "rb") as f:
                ptr = parse(f.read())
            if ptr is not None:
                paths.append(rel)
                oids.append(ptr.oid)
    if paths:
        own = sources is None
        sources = _sources(gd, git_remote) if own else sources
        try:
            sources.fetch(oids, progress)  # before any file moves: a missing object changes nothing
        finally:
            if own:
                sources.close()
        # Git skips index-clean files on checkout: move the pointers aside first, restore them on failure
        for rel in paths:
            os.replace(os.path.join(top, rel), os.path.join(top, rel) + ".mvc-pointer")
        try:
            env = {k: v for k, v in os.environ.items() if k != "MVC_SKIP_SMUDGE"}
            _git("checkout", "--", *paths, cwd=top, env=env)
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
    if scope == "--local":
        from ..hooks.git.filter import git_dir

        hook = os.path.join(git_dir(c.directory), "hooks", "pre-push")
        if os.path.isfile(hook) and "mvc git install" in open(hook, encoding="utf-8", errors="replace").read():
            os.remove(hook)
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


@git_group.command("filter-process")
def filter_process():
    """Git's long-running filter (started by Git, speaks pkt-lines on stdin/stdout)."""
    from ..hooks.git.filter import Filter, open_store, serve
    from ..hooks.git.history import store_lock
    from ..hooks.git.transfer import Sources, workdir_of

    gd = _gitdir()
    odb = open_store(gd)
    filt = Filter(odb, os.path.join(gd, "mvc", "tmp"), Sources(odb, gd, workdir_of(gd)), _skip_smudge())

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
@click.argument("remote_name")
@click.argument("remote_url", required=False)
@click.pass_obj
def pre_push(c, remote_name, remote_url):
    """Git's pre-push hook: upload the model objects of the commits being pushed that the paired
    mvc remote lacks (or, for a Git remote on this machine, copy them into its store)."""
    from ..hooks.git import mvcconfig
    from ..hooks.git.history import pointers_to_push, store_lock
    from ..hooks.git.transfer import (
        MAX_UPDATES,
        local_git_store,
        parse_push_updates,
        upload,
        upload_to_store,
        workdir_of,
    )
    from . import render

    gd = _gitdir()
    updates = parse_push_updates(sys.stdin.buffer.read(MAX_UPDATES + 1))
    pointers = pointers_to_push(gd, remote_name, updates)
    if not pointers:
        return
    wd = workdir_of(gd) or os.getcwd()
    paired = mvcconfig.resolve(wd, remote_name)
    with store_lock(gd, exclusive=False):
        if paired is not None:
            t = upload(_store(), paired, pointers, c.progress())
        else:
            store = local_git_store(remote_url or remote_name)
            if store is None:
                raise MvcError(f"Git remote {remote_name!r} has no paired mvc remote to upload "
                               f"{len(pointers)} model file(s) to",
                               hint=f"pair one: `mvc remote add {remote_name} s3://BUCKET/PREFIX` (or file:///PATH) "
                                    "and commit .mvcconfig; or push without the models: `git push --no-verify`")
            t = upload_to_store(_store(), store, pointers)
    if t.objects and not c.quiet:
        click.echo(f"mvc: uploaded {t.objects} objects ({render.human(t.nbytes)}) for {t.files} model file(s) "
                   f"to {t.where}", err=True)


@git_group.command("fetch")
@click.argument("revs", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Every commit reachable from a ref, and the index.")
@click.option("--remote", "git_remote", metavar="NAME",
              help="Git remote whose paired mvc remote to use (default: the branch's upstream, else origin).")
@click.pass_obj
def git_fetch(c, revs, all_, git_remote):
    """Download the model objects that REVS (default HEAD) need, like `git lfs fetch`."""
    from ..hooks.git.history import pointers_at, reachable_pointers
    from . import render

    gd = _gitdir()
    if all_ and revs:
        raise UsageError("give revisions or --all, not both")
    pointers = reachable_pointers(gd) if all_ else pointers_at(gd, list(revs) or ["HEAD"])
    sources = _sources(gd, git_remote)
    try:
        t = sources.fetch(list(pointers), c.progress())
    finally:
        sources.close()
    if t.objects:
        click.echo(f"fetched {t.objects} objects ({render.human(t.nbytes)}) for {len(pointers)} model file(s) "
                   f"from {t.where}")
    else:
        click.echo(f"all {len(pointers)} model file(s) are here already")


@git_group.command("pull")
@click.option("--remote", "git_remote", metavar="NAME",
              help="Git remote whose paired mvc remote to use (default: the branch's upstream, else origin).")
@click.pass_obj
def git_pull(c, git_remote):
    """Download what HEAD's model files need and replace the pointers in the work tree with them,
    like `git lfs pull` (after a clone with MVC_SKIP_SMUDGE=1, for instance)."""
    from ..hooks.git.history import pointers_at

    gd = _gitdir()
    sources = _sources(gd, git_remote)
    try:
        sources.fetch(list(pointers_at(gd, ["HEAD"])), c.progress())
        n = _smudge_pointer_files(gd, c.progress(), sources=sources)  # the remote and its index, opened once
    finally:
        sources.close()
    click.echo(f"checked out {n} model file(s)" if n else "every model file is checked out")


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
