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
    from ..hooks.gitfilter import git_dir, open_store

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
        open_store(git_dir(cwd), create=True)
    click.echo(f"mvc filter installed ({scope[2:]}); track files with `mvc git track '*.safetensors'`")


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
    from ..hooks.gitfilter import Filter, git_dir, open_store, serve

    gd = os.path.abspath(os.environ.get("GIT_DIR") or git_dir("."))
    filt = Filter(open_store(gd), os.path.join(gd, "mvc", "tmp"), fallback_store=_origin_store())

    def log(msg: str) -> None:
        sys.stderr.write(msg + "\n")
        sys.stderr.flush()

    serve(sys.stdin.buffer, sys.stdout.buffer, filt, log)


def _store():
    from ..hooks.gitfilter import git_dir, open_store

    return open_store(os.path.abspath(os.environ.get("GIT_DIR") or git_dir(".")))


@git_group.command("diff-driver", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def diff_driver(args):
    """Git's external diff for tracked models: PATH OLD OLD-HEX OLD-MODE NEW NEW-HEX NEW-MODE."""
    from ..hooks.gitdrivers import diff_files
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
    from ..hooks.gitdrivers import textconv_lines

    for line in textconv_lines(_store(), path, path):
        click.echo(line)


@git_group.command("merge-driver")
@click.argument("base")
@click.argument("ours")
@click.argument("theirs")
@click.argument("name")
def merge_driver(base, ours, theirs, name):
    """Git's merge driver: a three-way tensor merge of three pointers, the result written to OURS."""
    from ..hooks.gitdrivers import StoreRepo, merge_pointers

    def read(p):
        with open(p, "rb") as f:
            return f.read()

    merged, conflicts = merge_pointers(StoreRepo(_store()), name, read(base), read(ours), read(theirs))
    if merged is None:
        where = ", ".join(f"{c.tensor or c.path} ({c.elements} elements)" if c.elements else (c.tensor or c.path)
                          for c in conflicts[:5])
        raise MvcError(f"{name}: tensor conflict in {where}",
                       hint="pick a side with `git checkout --ours/--theirs`, or merge with mvc's strategies")
    with open(ours, "wb") as f:
        f.write(merged)
