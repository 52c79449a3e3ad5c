"""History commands: merge, revert, cherry-pick, bisect."""

from __future__ import annotations

import os

import click

from ..errors import MvcError, UsageError
from . import render
from .context import default_author, pass_ctx


# -- bisect ------------------------------------------------------------------------
@click.group()
def bisect():
    """Find the commit that introduced a regression (binary search over history)."""


def _bisect_report(repo, step) -> None:
    if step.first_bad:
        oid = step.first_bad
        cm = repo.commit_obj(oid)
        click.secho(f"{oid} is the first bad commit", bold=True)
        render.render_commit(oid, cm, None)
        changes = repo.diff(cm.parents[0], oid, stats=True) if cm.parents else repo.diff_root(oid)
        render.render_stat(changes)
    elif step.maybe:
        click.echo("only skipped commits are left; the first bad commit is one of:")
        for oid in step.maybe:
            click.echo(f"  {oid[:12]} {repo.commit_obj(oid).message.splitlines()[0]}")
    elif step.candidate:
        left = step.remaining - 1
        click.echo(f"Bisecting: {left} revision(s) left to test after this (roughly {step.steps_left} step(s))")
        click.echo(f"[{step.candidate[:12]}] {repo.commit_obj(step.candidate).message.splitlines()[0]}")
    else:
        click.echo("waiting for both a good and a bad commit")


@bisect.command("start")
@click.argument("bad", required=False)
@click.argument("good", nargs=-1)
@pass_ctx
def bisect_start(c, bad, good):
    """Start bisecting; optionally name the BAD commit and GOOD ones."""
    from .. import bisect as B

    repo = c.repo()
    _bisect_report(repo, B.start(repo, bad, list(good)))


def _mark_command(term):
    @click.argument("rev", required=False)
    @pass_ctx
    def cmd(c, rev):
        from .. import bisect as B

        repo = c.repo()
        _bisect_report(repo, B.mark(repo, term, rev))

    cmd.__doc__ = f"Mark REV (default: the checked-out candidate) as {term}."
    return bisect.command(term)(cmd)


for _term in ("good", "bad", "skip"):
    _mark_command(_term)


@bisect.command("reset")
@pass_ctx
def bisect_reset(c):
    """End the bisect and return to where it started."""
    from .. import bisect as B

    B.reset(c.repo())
    click.echo("bisect ended", err=True)


@bisect.command("log")
@pass_ctx
def bisect_log(c):
    """Print the marks made so far (replayable commands)."""
    from .. import bisect as B

    st = B.load_state(c.repo())
    if st is None:
        raise UsageError("not bisecting")
    for line in st.log:
        click.echo(f"mvc {line}")


@bisect.command("run", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--metric", is_flag=True, help="CMD prints a number; compare it with --threshold.")
@click.option("--threshold", type=float, default=None)
@click.option("--higher-is-better", is_flag=True, help="With --metric: values >= threshold are good.")
@click.argument("argv", nargs=-1, required=False, type=click.UNPROCESSED)
@pass_ctx
def bisect_run(c, metric, threshold, higher_is_better, argv):
    """Run CMD on each candidate: exit 0 good, 125 skip, 1-127 bad, else abort. MVC_BISECT_REV names it.

    Without CMD, the repository's default evaluation decides (`mvc eval`): its command, or its
    perplexity compared with --threshold (lower is better unless --higher-is-better).
    """
    import shlex

    from .. import bisect as B

    repo = c.repo()
    evaluator = None
    if not argv:
        from ..compress.evaluate import evaluate, make_spec

        spec = make_spec(repo, env=dict(os.environ))
        if spec.kind == "cmd":
            argv = tuple(shlex.split(spec.cmd))
        else:
            if threshold is None:
                raise UsageError("bisect run with the default perplexity evaluation needs --threshold PPL")

            def evaluator(oid):
                ppl = evaluate(repo, oid, spec)["ppl"]
                ok = ppl >= threshold if higher_is_better else ppl <= threshold
                return ("good" if ok else "bad"), f"ppl {ppl:.3f} ({'>=' if higher_is_better else '<='} " \
                    f"{threshold:g}: {ok})"

    def on_step(oid, verdict, detail):
        click.echo(f"{oid[:12]} {verdict:<5} ({detail}) {repo.commit_obj(oid).message.splitlines()[0]}")

    step = B.run(repo, list(argv), dict(os.environ), metric=metric, threshold=threshold,
                 higher_is_better=higher_is_better, on_step=on_step, evaluator=evaluator)
    click.echo(f"{step.evaluations} evaluation(s)")
    _bisect_report(repo, step)


# -- merge -------------------------------------------------------------------------
def _weights(text):
    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError as e:
        raise UsageError(f"--weights {text!r}: expected two numbers like 0.7,0.3") from e


@click.command()
@click.argument("rev", required=False)
@click.option("-m", "--message", default=None)
@click.option("-s", "--strategy", type=click.Choice(["ours", "theirs", "average", "task-arithmetic", "ties"]),
              default=None, help="How to settle elements changed on both sides (docs/merge.md).")
@click.option("--weights", default=None, metavar="W1,W2",
              help="average: FedAvg weights; task-arithmetic and ties: scale of each side's task vector.")
@click.option("--density", type=float, default=0.2, show_default=True,
              help="ties: fraction of each task vector's largest deltas kept.")
@click.option("--continue", "cont", is_flag=True, help="Commit a merge whose conflicts are resolved.")
@click.option("--abort", is_flag=True, help="Give up a conflicted merge and restore HEAD.")
@click.option("--author", default=None)
@pass_ctx
def merge(c, rev, message, strategy, weights, density, cont, abort, author):
    """Merge REV into the current branch: tensor by tensor, element by element."""
    from ..merge import session as mergeops

    repo = c.repo()
    if _continue_or_abort(repo, "merge", rev, cont, abort, author):
        return
    out = mergeops.merge(repo, rev, message, strategy, _weights(weights), author or default_author(),
                         progress=c.progress(), density=density)
    if out.kind == "up-to-date":
        click.echo("Already up to date.")
    elif out.kind == "fast-forward":
        click.echo(f"Fast-forward to {out.commit[:12]}")
    elif out.kind == "merged":
        click.echo(f"Merge made: {out.commit[:12]} (base {out.base[:12] if out.base else 'none'})")
    else:
        _report_conflicts(out.conflicts, "merge")


def _continue_or_abort(repo, kind: str, rev, cont: bool, abort: bool, author) -> bool:
    """Handle --continue / --abort of a merge, revert or cherry-pick; True when one was given."""
    from ..merge import session as mergeops

    if abort:
        mergeops.abort(repo)
        click.echo(f"{kind} aborted", err=True)
        return True
    if cont:
        oid = mergeops.continue_(repo, author=author or default_author())
        click.echo(f"[{repo.refs.current_branch() or 'detached HEAD'} {oid[:12]}] {kind} committed")
        return True
    if not rev:
        raise UsageError(f"{kind} needs a revision (or --continue / --abort)")
    return False


def _report_conflicts(conflicts, kind: str) -> None:
    for cf in conflicts:
        where = f"{cf.path}:{cf.tensor}" if cf.tensor else cf.path
        n = f", {cf.elements} elements" if cf.elements else ""
        click.echo(f"CONFLICT {where} ({cf.reason}{n})")
    raise MvcError(f"{len(conflicts)} conflict(s); the work tree holds ours' values where they clash",
                   hint=f"resolve with `mvc checkout --ours|--theirs -- PATH:TENSOR`, then `mvc {kind} --continue`")


def _pick_command(kind: str, doc: str):
    @click.argument("rev", required=False)
    @click.option("-m", "--message", default=None)
    @click.option("-s", "--strategy", type=click.Choice(["ours", "theirs", "average", "task-arithmetic"]),
                  default=None, help="How to settle elements that a later commit also changed.")
    @click.option("--continue", "cont", is_flag=True, help="Commit once every conflict is resolved.")
    @click.option("--abort", is_flag=True, help="Give up and restore HEAD.")
    @click.option("--author", default=None)
    @pass_ctx
    def cmd(c, rev, message, strategy, cont, abort, author):
        from ..merge import session as mergeops

        repo = c.repo()
        if _continue_or_abort(repo, kind, rev, cont, abort, author):
            return
        out = mergeops.pick(repo, rev, kind, message, strategy, author or default_author(), c.progress())
        if out.kind == "up-to-date":
            click.echo("nothing to do: the result equals HEAD")
        elif out.kind == "merged":
            click.echo(f"[{repo.refs.current_branch() or 'detached HEAD'} {out.commit[:12]}] "
                       + repo.commit_obj(out.commit).message.splitlines()[0])
        else:
            _report_conflicts(out.conflicts, kind)

    cmd.__doc__ = doc
    return click.command(kind)(cmd)


_revert = _pick_command("revert", "Make a commit that undoes REV, tensor by tensor (element-level when needed).")
_cherry_pick = _pick_command("cherry-pick", "Apply the change REV made onto HEAD as a new commit.")


#: registered on the `mvc` group by cli/main.py
COMMANDS: list[click.Command] = [bisect, merge, _revert, _cherry_pick]
