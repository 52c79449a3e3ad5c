"""What every CLI module shares: the per-invocation context, the -- PATHS command class, the author."""

from __future__ import annotations

import os

import click

from .progress import make_progress


class Ctx:
    def __init__(self, directory: str, quiet: bool):
        self.directory = directory
        self.quiet = quiet
        self._repo = None

    def repo(self):
        from ..repo import Repo

        if self._repo is None:
            self._repo = Repo(self.directory)
            self._repo.cwd = os.path.abspath(self.directory)
        return self._repo

    def progress(self):
        return make_progress(self.quiet)


pass_ctx = click.make_pass_decorator(Ctx)


class PathsCommand(click.Command):
    """A command taking `-- PATHS...` after its arguments, as Git does (kept in ctx.meta["paths"])."""

    def parse_args(self, ctx, args):
        if "--" in args:
            i = args.index("--")
            ctx.meta["paths"] = args[i + 1:]
            args = args[:i]
        else:
            ctx.meta["paths"] = None
        return super().parse_args(ctx, args)


def options(*opts):
    """One decorator applying click options in the order written."""
    def deco(f):
        for opt in reversed(opts):
            f = opt(f)
        return f
    return deco


def default_author() -> str:
    """--author default: MVC_AUTHOR, then Git's author variables and config."""
    if os.environ.get("MVC_AUTHOR"):
        return os.environ["MVC_AUTHOR"]
    name, email = os.environ.get("GIT_AUTHOR_NAME"), os.environ.get("GIT_AUTHOR_EMAIL")
    if not (name and email):
        cfg_name, cfg_email = _git_identity()
        name, email = name or cfg_name, email or cfg_email
    if name and email:
        return f"{name} <{email}>"
    from ..repo import DEFAULT_AUTHOR

    return DEFAULT_AUTHOR


def _git_identity() -> tuple[str | None, str | None]:
    """user.name and user.email of Git's global configuration: asked of the git command where it
    is installed (a few milliseconds), else read by pygit2 (whose import alone takes 60 ms)."""
    import shutil
    import subprocess

    git = shutil.which("git")
    if git is not None:
        try:
            out = subprocess.run([git, "config", "--global", "-z", "--get-regexp", r"^user\.(name|email)$"],
                                 capture_output=True, timeout=30, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            out = b""
        found = dict(item.split(b"\n", 1) for item in out.split(b"\0") if b"\n" in item)
        name, email = found.get(b"user.name"), found.get(b"user.email")
        return (name.decode("utf-8", "replace") if name else None,
                email.decode("utf-8", "replace") if email else None)
    try:
        import pygit2

        cfg = pygit2.Config.get_global_config()
        return cfg["user.name"], cfg["user.email"]
    except Exception:  # no global config, or a key is unset
        return None, None
