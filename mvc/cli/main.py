"""Click commands. Each parses, calls one library function, and renders the result."""

from __future__ import annotations

import os
import sys
from gc import freeze as _freeze_startup_objects

import click

from .. import __version__
from ..errors import MvcError, UsageError
from . import render
from .context import Ctx, PathsCommand, default_author, pass_ctx
from .errors import exit_code


class MvcGroup(click.Group):
    """Turns MvcError into one line on stderr and an exit code; never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MvcError as e:
            hint = f" (hint: {e.hint})" if e.hint else ""
            click.secho(f"error: {e}{hint}", fg="red", err=True)
            sys.exit(exit_code(e))
        except ModuleNotFoundError as e:  # a heavy import deep inside a command: the extra is missing
            from ..compress import EXTRA

            if (e.name or "").split(".")[0] not in EXTRA:
                raise
            click.secho(f"error: this command needs the 'compress' extra ({e.name} is not installed) "
                        "(hint: pip install 'mvc[compress]')", fg="red", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:
            sys.stderr.close()
            sys.exit(141)


@click.group(cls=MvcGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-C", "directory", default=".", metavar="DIR", help="Run as if started in DIR.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.version_option(__version__, prog_name="mvc")
@click.pass_context
def cli(ctx, directory, quiet):
    """mvc: version control for model weights, one tensor at a time."""
    if not os.path.isdir(directory):
        raise MvcError(f"-C {directory}: no such directory")
    ctx.obj = Ctx(directory, quiet)


# -- setup -------------------------------------------------------------------------
@cli.command()
@click.argument("directory", default=".")
@click.option("-b", "--initial-branch", default="main", show_default=True)
@click.option("--demo", is_flag=True, help="Commit mvc's shipped demo model (a tiny Llama) as the first commit.")
@pass_ctx
def init(c, directory, initial_branch, demo):
    """Create an empty repository in DIRECTORY (with --demo: holding the demo model)."""
    from ..repo import Repo

    path = os.path.join(c.directory, directory)
    if demo:
        from ..compress.demo_model import init_demo

        repo = init_demo(path, branch=initial_branch, author=default_author())
        click.echo(f"Initialized mvc repository in {repo.root}/.mvc with the demo model "
                   f"({repo.refs.head_commit()[:12]}); default evaluation: perplexity on eval.txt")
        return
    os.makedirs(path, exist_ok=True)
    repo = Repo.init(path, branch=initial_branch)
    click.echo(f"Initialized empty mvc repository in {repo.root}/.mvc")


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--no-repo", is_flag=True, help="Check only the environment.")
@pass_ctx
def doctor(c, as_json, no_repo):
    """Check the environment and the repository, with fixes."""
    from ..doctor import environment_checks, repository_checks

    checks = environment_checks() + ([] if no_repo else repository_checks(c.directory))
    if as_json:
        render.emit_json([vars(ch) for ch in checks])
    else:
        marks = {"ok": ("ok  ", "green"), "warn": ("warn", "yellow"), "fail": ("FAIL", "red")}
        for ch in checks:
            mark, color = marks[ch.status]
            click.echo(click.style(mark, fg=color) + f"  {ch.name}: {ch.detail}")
            if ch.fix:
                click.echo(f"      fix: {ch.fix}")
    if any(ch.status == "fail" for ch in checks):
        sys.exit(1)


# -- snapshots ---------------------------------------------------------------------
@cli.command()
@click.option("-m", "--message", required=True)
@click.option("--author", default=None, help='"Name <email>"')
@click.option("--allow-empty", is_flag=True, help="Record a commit even if nothing changed.")
@click.option("--delta-base", metavar="REV", default=None,
              help="Store changed tensors as deltas against REV's first (default: the parent and its ancestors).")
@click.option("--json", "as_json", is_flag=True)
@click.argument("paths", nargs=-1, type=click.Path())
@pass_ctx
def commit(c, message, author, allow_empty, delta_base, as_json, paths):
    """Record a snapshot of the work tree (or only PATHS)."""
    repo = c.repo()
    before = repo.backend.stats()
    oid = repo.commit(message, paths=list(paths) or None, author=author or default_author(),
                      allow_empty=allow_empty, progress=c.progress(), delta_base=delta_base)
    after = repo.backend.stats()
    added = after["stored_bytes"] - before["stored_bytes"]
    if as_json:
        render.emit_json({"id": oid, "stored_bytes_added": added,
                          "objects_added": after["objects"] - before["objects"]})
    else:
        branch = repo.refs.current_branch() or "detached HEAD"
        click.echo(f"[{branch} {oid[:12]}] {message.strip().splitlines()[0]}")
        click.echo(f" {render.human(added)} added to the store")


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("-s", "--short", is_flag=True)
@click.argument("paths", nargs=-1, type=click.Path())
@pass_ctx
def status(c, as_json, short, paths):
    """Show what changed in the work tree since HEAD."""
    repo = c.repo()
    st = repo.status(list(paths) or None, progress=c.progress())
    if as_json:
        from ..merge import session as mergeops

        ms = mergeops.state(repo)
        render.emit_json({"branch": st.branch, "head": st.head, "modified": st.modified,
                          "added": st.added, "deleted": st.deleted, "clean": st.clean,
                          "merge": None if ms is None else {"theirs": ms["theirs"], "conflicts": ms["conflicts"]}})
        return
    if short:
        for code, items in (("M", st.modified), ("A", st.added), ("D", st.deleted)):
            for p in items:
                click.echo(f"{code} {p}")
        return
    click.echo(f"On branch {st.branch}" if st.branch else f"HEAD detached at {st.head[:12] if st.head else '?'}")
    if st.head is None:
        click.echo("No commits yet")
    from ..merge import session as mergeops

    ms = mergeops.state(repo)
    if ms is not None:
        what = ms.get("kind", "merge")
        click.echo(f"{what} of {ms['op'].get('of') or ms['theirs'] or '?'}: {len(ms['conflicts'])} conflict(s) left"
                   + (f" (run `mvc {what} --continue`)" if not ms["conflicts"] else ""))
        for cf in ms["conflicts"]:
            where = f"{cf['path']}:{cf['tensor']}" if cf["tensor"] else cf["path"]
            n = f", {cf['elements']} elements" if cf["elements"] else ""
            click.secho(f"  conflict: {where} ({cf['reason']}{n})", fg="red")
    if st.clean:
        click.echo("nothing to commit, working tree clean")
        return
    click.echo("Changes not committed:")
    for label, items, color in (("modified:", st.modified, "red"), ("new file:", st.added, "green"),
                                ("deleted: ", st.deleted, "red")):
        for p in items:
            click.secho(f"  {label} {p}", fg=color)


@cli.command()
@click.option("--oneline", is_flag=True)
@click.option("--graph", is_flag=True, help="Draw the history as a graph (one line per commit).")
@click.option("-n", "--max-count", type=int, default=None)
@click.option("--stat", is_flag=True, help="With each commit, what it added to the store.")
@click.option("--json", "as_json", is_flag=True)
@click.argument("rev", default="HEAD")
@pass_ctx
def log(c, oneline, graph, max_count, stat, as_json, rev):
    """Show commit history."""
    from ..graph import added_by

    repo = c.repo()
    entries = repo.log(rev, max_count)
    if as_json:
        render.emit_json([render.commit_json(e.oid, e.commit) | ({"store": added_by(repo, e.oid)} if stat else {})
                          for e in entries])
        return
    deco = render.decorations(repo)
    if graph:
        for prefix, i in render.graph_lines(entries):
            if i < 0:
                click.echo(prefix)
                continue
            e = entries[i]
            d = f" ({', '.join(deco[e.oid])})" if e.oid in deco else ""
            click.echo(f"{prefix} " + click.style(e.oid[:12], fg="yellow") + d + " "
                       + e.commit.message.splitlines()[0])
        return
    for e in entries:
        if oneline:
            d = f" ({', '.join(deco[e.oid])})" if e.oid in deco else ""
            op = f" [{e.commit.op.get('op')}]" if e.commit.op else ""
            click.echo(click.style(e.oid[:12], fg="yellow") + d + op + " " + e.commit.message.splitlines()[0])
        else:
            render.render_commit(e.oid, e.commit, deco.get(e.oid))
        if stat:
            click.echo(render.store_line(added_by(repo, e.oid)) + ("" if oneline else "\n"))


@cli.command()
@click.option("--stat", is_flag=True, help="One line per changed tensor or file, with sizes, instead of each "
              "changed tensor's statistics.")
@click.option("--json", "as_json", is_flag=True)
@click.argument("rev", default="HEAD")
@pass_ctx
def show(c, stat, as_json, rev):
    """Show a commit: metadata, op record, what it changed and what it added to the store."""
    from ..graph import added_by

    repo = c.repo()
    oid = repo.resolve(rev)
    cm = repo.commit_obj(oid)
    changes = repo.diff(cm.parents[0], oid, stats=True) if cm.parents else \
        repo.diff_root(oid)
    store = added_by(repo, oid)
    if as_json:
        render.emit_json({**render.commit_json(oid, cm), "changes": render.changes_json(changes), "store": store})
        return
    render.render_commit(oid, cm, render.decorations(repo).get(oid))
    if stat:
        render.render_stat(changes)
    else:
        render.render_full(changes)
    click.echo(render.store_line(store))


@cli.command(cls=PathsCommand)
@click.argument("revs", nargs=-1)
@click.option("--stat", is_flag=True, help="One line per changed tensor or file, with sizes.")
@click.option("--name-only", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--binary", is_flag=True, help="Write a binary patch from A to B (needs -o).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Where --binary writes.")
@click.option("--html", "html_out", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Write per-layer heatmaps of the change A -> B to FILE (as in `mvc report`).")
@pass_ctx
def diff(c, revs, stat, name_only, as_json, binary, output, html_out):
    """Changes between HEAD and the work tree, or between revisions: diff [A [B]] [-- PATHS]."""
    repo = c.repo()
    paths = click.get_current_context().meta["paths"]
    if len(revs) > 2:
        raise UsageError("diff takes at most two revisions")
    if html_out:
        from ..report import write_diff

        if len(revs) != 2 or paths:
            raise UsageError("usage: mvc diff A B --html FILE (two revisions, no paths)")
        write_diff(repo, revs[0], revs[1], html_out, c.progress())
        if not c.quiet:
            click.echo(f"wrote {html_out}")
        return
    if binary:
        from ..diff.patch import write_patch

        if len(revs) != 2 or not output:
            raise UsageError("usage: mvc diff --binary A B -o PATCH")
        tmp = output + ".mvc-tmp"
        try:
            with open(tmp, "wb") as f:
                summary = write_patch(repo, revs[0], revs[1], f)
            os.replace(tmp, output)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        click.echo(f"wrote {output}: {summary['objects']} objects ({summary['xor']} as XOR deltas), "
                   f"{render.human(os.path.getsize(output))}")
        return
    a = revs[0] if revs else None
    b = revs[1] if len(revs) == 2 else None
    changes = repo.diff(a, b, paths or None, stats=not name_only, progress=c.progress())
    if as_json:
        render.emit_json(render.changes_json(changes))
    elif stat:
        render.render_stat(changes)
    elif name_only:
        for fc in changes:
            if fc.tensors:
                for t in fc.tensors:
                    click.echo(f"{fc.path}:{t.name}")
            else:
                click.echo(fc.path)
    else:
        render.render_full(changes)


# -- moving around -----------------------------------------------------------------
@cli.command(cls=PathsCommand)
@click.argument("args", nargs=-1)
@click.option("-f", "--force", is_flag=True, help="Discard local changes.")
@click.option("--ours", "side", flag_value="ours", help="During a merge: resolve -- PATH:TENSOR with ours.")
@click.option("--theirs", "side", flag_value="theirs", help="During a merge: resolve -- PATH:TENSOR with theirs.")
@pass_ctx
def checkout(c, args, force, side):
    """Check out a revision (moves HEAD), or restore files: checkout REV -- PATHS."""
    repo = c.repo()
    args = list(args)
    paths = click.get_current_context().meta["paths"]
    if side:
        from ..merge import session as mergeops

        for spec in (paths or []) + args:
            mergeops.resolve(repo, spec, side)
            click.echo(f"resolved {spec} with {side}", err=True)
        return
    if paths is not None and not args:
        args = ["HEAD"]
    if len(args) != 1:
        raise UsageError("usage: mvc checkout REV [-- PATHS...]")
    oid = repo.checkout(args[0], paths=paths, force=force, progress=c.progress())
    if paths is None:
        branch = repo.refs.current_branch()
        click.echo(f"Switched to branch {branch!r}" if branch else f"HEAD is now at {oid[:12]}", err=True)
    else:
        click.echo(f"Restored {len(paths)} path(s) from {args[0]}", err=True)


@cli.command()
@click.argument("branch")
@click.argument("start", required=False)
@click.option("-c", "--create", is_flag=True, help="Create BRANCH (at START or HEAD) first.")
@click.option("-f", "--force", is_flag=True)
@pass_ctx
def switch(c, branch, start, create, force):
    """Switch to a branch."""
    repo = c.repo()
    repo.switch(branch, create=create, start=start, force=force, progress=c.progress())
    click.echo(f"Switched to {'a new ' if create else ''}branch {branch!r}", err=True)


def _ref_command(kind: str, rev: str, force: click.Option, create, delete, listing, doc: str):
    """`mvc branch` and `mvc tag`: list (optionally --json), create NAME [REV], delete -d NAME."""

    @cli.command(kind, help=doc)
    @click.argument("name", required=False)
    @click.argument(rev, required=False, default="HEAD")
    @click.option("-d", "--delete", "delete_", is_flag=True)
    @force
    @click.option("--json", "as_json", is_flag=True)
    @pass_ctx
    def command(c, name, delete_, as_json, force, **kw):
        repo = c.repo()
        if delete_ or (force and kind == "branch"):
            if not name:
                raise UsageError(f"{kind} -d needs a NAME")
            click.echo(f"Deleted {kind} {name} (was {delete(repo, name, force)[:12]})")
        elif name:
            create(repo, name, kw[rev], force)
        else:
            listing(repo, as_json)

    return command


def _list_branches(repo, as_json: bool) -> None:
    cur = repo.refs.current_branch()
    branches = repo.refs.branches()
    if as_json:
        render.emit_json({"current": cur, "branches": branches})
        return
    for b, oid in branches.items():
        click.echo(("* " if b == cur else "  ") + f"{b}  {oid[:12]}")


def _list_tags(repo, as_json: bool) -> None:
    tags = repo.refs.tags()
    if as_json:
        render.emit_json(tags)
        return
    for t in tags:
        click.echo(t)


branch = _ref_command(
    "branch", "start", click.option("-D", "force", is_flag=True, help="Delete even if not merged into HEAD."),
    create=lambda repo, name, start, _f: repo.create_branch(name, start),
    delete=lambda repo, name, force: repo.delete_branch(name, force=force),
    listing=_list_branches, doc="List, create (branch NAME [START]) or delete (-d NAME, -D unmerged) branches.")
tag = _ref_command(
    "tag", "rev", click.option("-f", "--force", is_flag=True, help="Move an existing tag."),
    create=lambda repo, name, rev, force: repo.create_tag(name, rev, force=force),
    delete=lambda repo, name, _f: repo.delete_tag(name),
    listing=_list_tags, doc="List, create (tag NAME [REV]) or delete (-d NAME) tags.")


@cli.command()
@click.argument("rev", default="HEAD")
@click.option("--hard", is_flag=True, help="Also make the work tree match REV (discards changes).")
@click.option("--soft", is_flag=True, help="Only move the branch (the default: mvc has no index).")
@pass_ctx
def reset(c, rev, hard, soft):
    """Move the current branch to REV."""
    repo = c.repo()
    oid = repo.reset(rev, hard=hard, progress=c.progress())
    click.echo(f"HEAD is now at {oid[:12]} {repo.commit_obj(oid).message.splitlines()[0]}")


# -- plumbing ----------------------------------------------------------------------
@cli.command("rev-parse")
@click.argument("rev")
@click.option("--short", is_flag=True)
@pass_ctx
def rev_parse(c, rev, short):
    """Print the commit id a revision names."""
    oid = c.repo().resolve(rev)
    click.echo(oid[:12] if short else oid)


@cli.command("ls-tree")
@click.argument("rev", default="HEAD")
@click.option("--tensors", is_flag=True, help="Also list the tensors of safetensors files.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def ls_tree(c, rev, tensors, as_json):
    """List the files (and tensors) of a revision."""
    repo = c.repo()
    tree = repo.tree_of(rev)
    rows = []
    for e in tree.entries:
        f = repo.odb.get(e.oid, "file")
        row = {"path": e.path, "mode": f"{e.mode:o}", "id": e.oid, "size": f.size, "format": f.format}
        if tensors and f.format == "safetensors":
            row["tensors"] = []
            for name, tid in f.tensors:
                t = repo.odb.get(tid, "tensor")
                row["tensors"].append({"name": name, "id": tid, "dtype": t.dtype, "shape": list(t.shape)})
        rows.append(row)
    if as_json:
        render.emit_json(rows)
        return
    for r in rows:
        click.echo(f"{r['mode']} {r['format']:<11} {r['id'][:12]} {r['size']:>12}  {r['path']}")
        for t in r.get("tensors", []):
            click.echo(f"    {t['id'][:12]} {t['dtype']:<6} {str(t['shape']):<20} {t['name']}")


@cli.command("cat-object")
@click.argument("oid")
@click.option("-t", "show_type", is_flag=True, help="Print the object's type.")
@click.option("-s", "show_size", is_flag=True,
              help="Print its size, stored size and encoding: SIZE STORED ENCODING [BASE DEPTH].")
@click.option("--json", "as_json", is_flag=True, help="Type, sizes and encoding as JSON.")
@pass_ctx
def cat_object(c, oid, show_type, show_size, as_json):
    """Print an object: pretty JSON for metadata, raw bytes for chunks."""
    import json

    from ..store import codec

    repo = c.repo()
    matches = repo.odb.resolve_prefix(oid) if len(oid) >= 4 else []
    if len(matches) != 1:
        raise UsageError(f"{oid}: {'no' if not matches else 'more than one'} object matches")
    kind, content = repo.odb.read(matches[0])
    stored = repo.odb.stored(matches[0])
    link = codec.delta_base(stored)
    info = {"id": matches[0], "type": kind, "size": len(content), "stored_size": len(stored),
            "encoding": codec.NAMES.get(stored[1], "?"), "base": link[0].hex() if link else None,
            "depth": link[1] if link else 0}
    if as_json:
        render.emit_json(info)
    elif show_type:
        click.echo(kind)
    elif show_size:
        click.echo(f"{info['size']} {info['stored_size']} {info['encoding']}"
                   + (f" {info['base']} {info['depth']}" if link else ""))
    elif kind == "chunk":
        sys.stdout.buffer.write(bytes(content))
    else:
        click.echo(json.dumps(json.loads(bytes(content)), indent=2, sort_keys=True))


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def fsck(c, as_json):
    """Verify every object and that every ref reaches complete history."""
    from ..maintenance import fsck as run_fsck

    repo = c.repo()
    prog = c.progress()
    prog.start("verifying", repo.backend.stats()["stored_bytes"])
    rep = run_fsck(repo, prog)
    prog.finish()
    render.render_fsck(rep, "objects", as_json)
    if not rep.ok:
        sys.exit(1)


@cli.command()
@click.option("--max-depth", type=click.IntRange(0, 255), default=None,
              help="Longest delta chain (default: the repository's delta.max_depth, 10).")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def repack(c, max_depth, as_json):
    """Choose delta bases and encodings anew for every reachable chunk (crash-safe)."""
    from ..maintenance import repack as run_repack

    repo = c.repo()
    prog = c.progress()
    prog.start("repacking", repo.backend.stats()["stored_bytes"])
    rep = run_repack(repo, max_depth, prog)
    prog.finish()
    if as_json:
        render.emit_json(vars(rep))
    else:
        click.echo(f"repacked {rep.chunks} chunks ({rep.rewritten} re-encoded, {rep.tips_whole} of the branch "
                   f"heads made whole): {render.human(rep.before)} -> {render.human(rep.after)}"
                   + _packs_line(rep))


@cli.command()
@click.option("-n", "--dry-run", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def gc(c, dry_run, as_json):
    """Delete objects that no ref, HEAD or reflog reaches."""
    from ..maintenance import gc as run_gc

    rep = run_gc(c.repo(), dry_run=dry_run)
    if as_json:
        render.emit_json(vars(rep) | {"dry_run": dry_run})
    else:
        verb = "would remove" if dry_run else "removed"
        click.echo(f"{verb} {rep.removed} objects ({render.human(rep.freed_bytes)}), kept {rep.kept}"
                   + _packs_line(rep))


def _packs_line(rep) -> str:
    if not (rep.packs_rewritten or rep.disk_freed):
        return ""
    return f"; {rep.packs_rewritten} pack(s) rewritten, {render.human(rep.disk_freed)} of disk given back"


def _tune_malloc() -> None:
    """Keep glibc from mmap/munmap-ing every multi-MiB chunk buffer (measured: half the page faults)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


#: commands that run models or other programs: their BLAS threads are torch's and the user's to set
_OWN_THREADS = frozenset({"compress", "eval", "bisect"})


def _one_blas_thread(argv: list[str]) -> None:
    """numpy's OpenBLAS starts a thread per core when numpy is imported, and each spins a while
    waiting for work that the store's commands never give it (they do no linear algebra): the spin
    only takes a core from the codec workers (measured with perf: 2-5 % of a commit's or a checkout's
    CPU). Those commands get one thread, unless the user set OPENBLAS_NUM_THREADS."""
    command, args = None, iter(argv)
    for a in args:
        if a == "-C":
            next(args, None)  # its directory
        elif not a.startswith("-"):
            command = a
            break
    if command is not None and command not in _OWN_THREADS:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def main() -> None:
    _tune_malloc()
    _one_blas_thread(sys.argv[1:])
    # what start-up made lives as long as the process: keep it out of the collector's full passes
    # (measured with perf: its traversals were 2-3 % of a checkout's CPU)
    _freeze_startup_objects()
    if os.environ.get("MVC_NO_NATIVE"):  # force the numpy path of the codec kernels (benchmarks, debugging)
        from ..store import kernels

        kernels.use_native(False)
    cli(prog_name="mvc")


@cli.command()
@click.argument("patch", type=click.Path(exists=True, dir_okay=False))
@pass_ctx
def apply(c, patch):
    """Apply a binary patch (from `mvc diff --binary`) to a work tree at its base commit."""
    from ..diff.patch import apply_patch

    with open(patch, "rb") as f:
        data = f.read()
    res = apply_patch(c.repo(), data, progress=c.progress())
    click.echo(f"applied: the work tree now holds {res['target'][:12]}'s tree ({res['objects']} objects); "
               "review with `mvc status`, then commit")


from .compress import COMMANDS as COMPRESS  # noqa: E402 - registered last, after the commands above
from .git import git_group  # noqa: E402
from .history import COMMANDS as HISTORY  # noqa: E402
from .hook import hook_group  # noqa: E402
from .remote import COMMANDS as REMOTE  # noqa: E402
from .report import COMMANDS as REPORT  # noqa: E402

for _cmd in (*HISTORY, *REMOTE, *COMPRESS, *REPORT, git_group, hook_group):
    cli.add_command(_cmd)
