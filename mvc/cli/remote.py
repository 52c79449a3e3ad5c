"""Remote commands: remote, push, fetch, pull, clone."""

from __future__ import annotations

import os

import click

from . import render
from .context import default_author, pass_ctx


@click.group()
def remote():
    """Manage remotes (s3:// buckets, file:// directories). In a Git work tree where `mvc git
    install` ran, they pair with Git's remotes and are kept in the committed .mvcconfig."""


def _repo_or_git(c):
    """(the mvc repository, None), or (None, the Git work tree top) where there is no mvc
    repository but a Git one with mvc installed."""
    from ..errors import NotARepositoryError

    try:
        return c.repo(), None
    except NotARepositoryError as e:
        from .git import git_work_tree

        top = git_work_tree(c.directory)
        if top is None:
            raise NotARepositoryError(str(e), hint="run `mvc init`, or `mvc git install` in a Git repository") from e
        return None, top


@remote.command("add")
@click.argument("name")
@click.argument("url")
@click.option("--endpoint-url", default=None, help="S3-compatible endpoint (kept in the config, never a secret).")
@pass_ctx
def remote_add(c, name, url, endpoint_url):
    """Add a remote NAME at URL (in Git: pair it with the Git remote NAME)."""
    from ..remote.sync import add_remote

    repo, top = _repo_or_git(c)
    if repo is not None:
        add_remote(repo, name, url, endpoint_url)
        return
    from ..hooks.git import mvcconfig
    from ..hooks.git.transfer import git_remote_url

    mvcconfig.add(top, name, url, endpoint_url)
    click.echo(f"paired mvc remote {name} ({url}) with Git remote {name}; "
               f"commit {mvcconfig.FILENAME} so that clones find it")
    if git_remote_url(top, name) is None:
        click.echo(f"note: there is no Git remote named {name} yet (`git remote add {name} URL`)", err=True)


@remote.command("remove")
@click.argument("name")
@pass_ctx
def remote_remove(c, name):
    """Remove a remote and its remote-tracking refs (in Git: its .mvcconfig entry)."""
    from ..remote.sync import remove_remote

    repo, top = _repo_or_git(c)
    if repo is not None:
        remove_remote(repo, name)
        return
    from ..hooks.git import mvcconfig

    mvcconfig.remove(top, name)


@remote.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def remote_list(c, as_json):
    """List remotes."""
    from ..remote.sync import remotes

    repo, top = _repo_or_git(c)
    if repo is not None:
        rs = remotes(repo)
    else:
        from ..hooks.git import mvcconfig

        rs = {p.name: {"url": p.url} | ({"endpoint_url": p.endpoint_url} if p.endpoint_url else {})
              for p in mvcconfig.read(top).values()}
    if as_json:
        render.emit_json(rs)
    else:
        for name, entry in rs.items():
            click.echo(f"{name}\t{entry['url']}")


@remote.command("fsck")
@click.argument("name", default="origin")
@click.option("--repair", is_flag=True, help="Rewrite packs holding damaged objects, from this repository's copies.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def remote_fsck(c, name, repair, as_json):
    """Verify every object a remote holds (downloads all of it)."""
    from ..remote.sync import open_named
    from ..remote.sync import remote_fsck as run

    repo = c.repo()
    prog = c.progress()
    rep = run(repo, open_named(repo, name), name, repair, prog)
    if as_json:
        render.emit_json({"ok": rep.ok, "packs": rep.packs, "objects": rep.objects, "bad": rep.bad,
                          "repaired": rep.repaired, "unrepaired": rep.unrepaired})
    else:
        for oid, why in sorted(rep.bad.items()):
            click.echo(f"bad {oid}: {why}")
        for pack in rep.repaired:
            click.echo(f"repaired {pack}")
        for pack, why in sorted(rep.unrepaired.items()):
            click.echo(f"not repaired {pack}: {why}")
        verdict = "ok" if not rep.bad else ("repaired" if rep.ok else "damaged")
        click.echo(f"checked {rep.objects} objects in {rep.packs} packs of {name}: {verdict}")
        if rep.bad and not repair:
            click.echo(f"hint: `mvc remote fsck {name} --repair` rewrites them from this repository's copies", err=True)
    if not rep.ok:
        raise SystemExit(1)


@click.command()
@click.argument("name", default="origin")
@click.argument("branch", required=False)
@click.option("-f", "--force", is_flag=True, help="Allow a non-fast-forward update of the remote branch.")
@pass_ctx
def push(c, name, branch, force):
    """Upload what the remote lacks, then move its branch (compare-and-swap)."""
    from ..errors import UsageError
    from ..remote.sync import open_named
    from ..remote.sync import push as do_push

    repo = c.repo()
    branch = branch or repo.refs.current_branch()
    if not branch:
        raise UsageError("HEAD is detached: name the branch to push")
    res = do_push(repo, open_named(repo, name), name, branch, force, c.progress())
    if res.up_to_date:
        click.echo("Everything up to date")
    else:
        old = res.old[:12] if res.old else "(new branch)"
        click.echo(f"{name} {branch}: {old} -> {res.new[:12]} ({res.objects} objects, "
                   f"{render.human(res.bytes_sent)} sent)")


@click.command()
@click.argument("name", default="origin")
@pass_ctx
def fetch(c, name):
    """Download the remote's branches as NAME/BRANCH (verified before they are stored)."""
    from ..remote.sync import fetch as do_fetch
    from ..remote.sync import open_named

    repo = c.repo()
    for branch, tip in do_fetch(repo, open_named(repo, name), name, c.progress()).items():
        click.echo(f"{name}/{branch} {tip[:12]}")


@click.command()
@click.argument("name", default="origin")
@click.argument("branch", required=False)
@pass_ctx
def pull(c, name, branch):
    """fetch, then fast-forward or merge NAME/BRANCH into the current branch."""
    from ..errors import UsageError
    from ..merge import session as mergeops
    from ..remote.sync import fetch as do_fetch
    from ..remote.sync import open_named

    repo = c.repo()
    branch = branch or repo.refs.current_branch()
    if not branch:
        raise UsageError("HEAD is detached: name the branch to pull")
    tips = do_fetch(repo, open_named(repo, name), name, c.progress())
    if branch not in tips:
        raise UsageError(f"the remote {name} has no branch {branch!r}")
    if repo.refs.head_commit() is None:
        repo.refs.set_ref(f"refs/heads/{branch}", tips[branch], None, f"pull from {name}")
        repo.checkout(branch, force=True, progress=c.progress())
        click.echo(f"checked out {name}/{branch}")
        return
    out = mergeops.merge(repo, f"{name}/{branch}", None, None, None, default_author(), progress=c.progress())
    click.echo({"up-to-date": "Already up to date.", "fast-forward": f"Fast-forward to {(out.commit or '')[:12]}",
                "merged": f"Merge made: {(out.commit or '')[:12]}"}.get(out.kind, "conflicts: see `mvc status`"))


@click.command()
@click.argument("url")
@click.argument("directory", required=False)
@click.option("--endpoint-url", default=None, help="S3-compatible endpoint (kept in the new repo's config).")
@click.option("--filter", "filter_", type=click.Choice(["lazy"]), default=None,
              help="lazy: download commits and metadata only; tensors come when read (nothing is checked out).")
@pass_ctx
def clone(c, url, directory, endpoint_url, filter_):
    """Copy a remote into a new repository and check out its default branch."""
    from ..remote.sync import clone as do_clone

    dest = directory or os.path.basename(url.rstrip("/")) or "model"
    repo = do_clone(url, os.path.join(c.directory, dest), c.progress(), endpoint_url=endpoint_url,
                    lazy=filter_ == "lazy")
    click.echo(f"cloned into {repo.root}")


COMMANDS = [remote, push, fetch, pull, clone]
