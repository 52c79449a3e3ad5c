"""`mvc report`: parse, call mvc.report, say where the file is."""

from __future__ import annotations

import json
import os
import webbrowser

import click

from .context import pass_ctx


@click.command("report")
@click.argument("rev_range", required=False, metavar="[REV | A..B]")
@click.option("-o", "--output", default="report.html", show_default=True, type=click.Path(dir_okay=False),
              help="Where to write the HTML file.")
@click.option("--scores", type=click.Path(dir_okay=False), default=None,
              help="Importance scores to chart: the .json of `mvc compress score -o FILE.json`.")
@click.option("--open", "open_", is_flag=True, help="Open the file in the browser afterwards.")
@click.option("--no-tensor-stats", "quick", is_flag=True,
              help="Read no tensor values (no sparsity, elements changed or L2): quick on a big model.")
@click.option("--json", "as_json", is_flag=True, help="Print the report's data as JSON instead of writing HTML.")
@pass_ctx
def report(c, rev_range, output, scores, open_, quick, as_json):
    """One self-contained HTML file of the history: compression timeline, per-layer heatmaps,
    importance, waves, storage, commits. Default: the current branch's history."""
    repo = c.repo()
    if as_json:
        from ..report import build

        data = build(repo, rev_range, scores, progress=c.progress(), read_tensors=not quick)
        click.echo(json.dumps(data.to_json(), indent=1, sort_keys=True))
        return
    rep = repo.report(rev_range, output, scores, c.progress(), read_tensors=not quick)
    n = sum(1 for x in rep.commits if x.status == "history")
    if not c.quiet:
        click.echo(f"wrote {output} ({n} commits, {os.path.getsize(output) / 2**20:.1f} MiB)")
    if open_:
        webbrowser.open("file://" + os.path.abspath(output))


COMMANDS: list[click.Command] = [report]
