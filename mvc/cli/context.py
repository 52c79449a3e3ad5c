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
        try:
            import pygit2

            cfg = pygit2.Config.get_global_config()
            name = name or cfg["user.name"]
            email = email or cfg["user.email"]
        except Exception:  # no global config, or the key is unset
            pass
    if name and email:
        return f"{name} <{email}>"
    from ..repo import DEFAULT_AUTHOR

    return DEFAULT_AUTHOR
