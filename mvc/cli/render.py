"""Rendering helpers for the CLI (text and JSON)."""

from __future__ import annotations

import json
import time

import click

from ..diff.trees import FileChange
from ..store.objects import Commit


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def commit_json(oid: str, c: Commit) -> dict:
    return {"id": oid, "tree": c.tree, "parents": list(c.parents), "author": c.author, "time": c.time,
            "tz": c.tz, "message": c.message, "op": c.op}


def fmt_date(t: int, tz: int) -> str:
    sign = "+" if tz >= 0 else "-"
    stamp = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(t + tz * 60))
    return f"{stamp} {sign}{abs(tz) // 60:02d}{abs(tz) % 60:02d}"


def decorations(repo) -> dict[str, list[str]]:
    deco: dict[str, list[str]] = {}
    branch = repo.refs.current_branch()
    head = repo.refs.head_commit()
    if head and branch is None:
        deco.setdefault(head, []).append("HEAD")
    for name, oid in repo.refs.branches().items():
        deco.setdefault(oid, []).append(f"HEAD -> {name}" if name == branch else name)
    for name, oid in repo.refs.tags().items():
        deco.setdefault(oid, []).append(f"tag: {name}")
    return deco


def op_lines(op: dict) -> list[str]:
    lines = [f"op: {op.get('op', '?')}" + (f" ({op['method']})" if op.get("method") else "")]
    for key in ("params", "scope", "metrics", "seed", "tool"):
        if key in op:
            lines.append(f"  {key}: {json.dumps(op[key], sort_keys=True)}")
    return lines


def render_commit(oid: str, c: Commit, deco: list[str] | None) -> None:
    d = f" ({', '.join(deco)})" if deco else ""
    click.secho(f"commit {oid}{d}", fg="yellow")
    if len(c.parents) > 1:
        click.echo("Merge: " + " ".join(p[:12] for p in c.parents))
    click.echo(f"Author: {c.author}")
    click.echo(f"Date:   {fmt_date(c.time, c.tz)}")
    if c.op:
        for line in op_lines(c.op):
            click.echo(line)
    click.echo("")
    for line in c.message.rstrip("\n").splitlines():
        click.echo(f"    {line}")
    click.echo("")


def changes_json(changes: list[FileChange]) -> list[dict]:
    out = []
    for fc in changes:
        out.append({
            "path": fc.path, "status": fc.status,
            "old": fc.old.oid if fc.old else None, "new": fc.new.oid if fc.new else None,
            "old_size": fc.old_size, "new_size": fc.new_size,
            "tensors": [{
                "name": t.name, "status": t.status,
                "old": {"dtype": t.old.dtype, "shape": list(t.old.shape), "nbytes": t.old.nbytes} if t.old else None,
                "new": {"dtype": t.new.dtype, "shape": list(t.new.shape), "nbytes": t.new.nbytes} if t.new else None,
                "stats": t.stats,
            } for t in fc.tensors],
        })
    return out


def _shape(t) -> str:
    return t.dtype + str(list(t.shape))


def _stat_desc(t) -> tuple[int, str]:
    """(bytes to scale the bar by, description) of one tensor change."""
    cur = t.new or t.old
    desc = _shape(cur)
    if t.old and t.new and (t.old.dtype, t.old.shape) != (t.new.dtype, t.new.shape):
        return cur.nbytes, f"{_shape(t.old)} -> {desc}"
    s = t.stats or {}
    if t.status == "modified" and "changed" in s:
        itemsize = cur.nbytes // max(1, s["numel"])
        rel = f", rel L2 {s['rel_l2_delta']:.3g}" if s.get("rel_l2_delta") is not None else ""
        return s["changed"] * itemsize, f"{desc} {100 * s['changed_fraction']:.3g}% changed{rel}"
    return cur.nbytes, desc


def render_stat(changes: list[FileChange], width: int = 30) -> None:
    rows = []
    for fc in changes:
        if fc.tensors:
            for t in fc.tensors:
                size, desc = _stat_desc(t)
                mark = {"added": "+", "removed": "-", "modified": "~"}[t.status]
                rows.append((f"{fc.path}:{t.name}", mark, size, desc))
        else:
            mark = {"added": "+", "deleted": "-", "modified": "~", "mode": "m"}[fc.status]
            rows.append((fc.path, mark, max(fc.old_size, fc.new_size), fc.status))
    if not rows:
        return
    top = max(r[2] for r in rows) or 1
    name_w = min(60, max(len(r[0]) for r in rows))
    for name, mark, size, desc in rows:
        bar = mark * max(1, round(width * size / top)) if size else ""
        click.echo(f" {name:<{name_w}} | {human(size):>10} {bar}  {desc}")
    nfiles = len(changes)
    ntensors = sum(len(fc.tensors) for fc in changes)
    click.echo(f" {nfiles} file(s) changed, {ntensors} tensor(s) changed")


def _num(x, fmt=".4g") -> str:
    return "-" if x is None else format(x, fmt)


def render_full(changes: list[FileChange]) -> None:
    """Every changed file, and for each changed tensor its statistics."""
    for fc in changes:
        old = fc.old.oid[:12] if fc.old else "-"
        new = fc.new.oid[:12] if fc.new else "-"
        click.secho(f"{fc.status} {fc.path} ({old} -> {new}, {human(fc.old_size)} -> {human(fc.new_size)})",
                    bold=True)
        for t in fc.tensors:
            s = t.stats or {}
            if t.status != "modified" or "changed" not in s:
                sides = [f"{side}: sparsity {s['sparsity_' + side]:.4f} L2 {_num(s['l2_' + side])}"
                         for side in ("old", "new") if "l2_" + side in s]
                click.echo(f"  {t.status:<8} {t.name}  {_stat_desc(t)[1]}  " + "; ".join(sides))
                continue
            click.echo(f"  modified {t.name}  {_shape(t.new)}")
            click.echo(f"           changed {s['changed']}/{s['numel']} ({100 * s['changed_fraction']:.3g}%)"
                       f"  sparsity {s['sparsity_old']:.4f} -> {s['sparsity_new']:.4f}")
            click.echo(f"           |delta| {_num(s['l2_delta'])} (rel {_num(s['rel_l2_delta'])})"
                       f"  max|delta| {_num(s['max_abs_delta'])}  cosine {_num(s['cosine'], '.6f')}")


def graph_lines(entries) -> list[tuple[str, int]]:
    """ASCII history graph as (prefix, entry index) rows; index -1 marks a connector row.

    One column per line of descent: ``*`` is the commit, ``|`` a line passing by, ``\\``
    a merge opening a column for its second parent, ``/`` two columns joining.
    """
    cols: list[str] = []
    rows: list[tuple[str, int]] = []
    for i, e in enumerate(entries):
        if e.oid not in cols:
            cols.append(e.oid)
        col = cols.index(e.oid)
        rows.append((" ".join("*" if j == col else "|" for j in range(len(cols))), i))
        parents = list(e.commit.parents)
        nxt = cols[:col] + parents[:1] + cols[col + 1:]
        opened = 0
        for p in parents[1:]:
            if p not in nxt:
                nxt.insert(col + 1 + opened, p)
                opened += 1
        if opened:
            rows.append((" ".join("|" if j <= col else "\\" for j in range(col + 1 + opened)), -1))
        while True:  # a commit now expected in two columns: join them
            dup = next((j for j, c in enumerate(nxt) if c in nxt[:j]), None)
            if dup is None:
                break
            rows.append((" ".join("|" for _ in range(dup - 1)) + (" " if dup > 1 else "") + "|/", -1))
            del nxt[dup]
        cols = nxt
    return rows


def render_fsck(rep, noun: str, as_json: bool) -> None:
    """An fsck report (mvc's objects or Git's pointers), as JSON or one line per problem."""
    if as_json:
        emit_json({"ok": rep.ok, noun: rep.objects, "corrupt": rep.corrupt, "missing": rep.missing,
                   "bad_refs": rep.bad_refs})
        return
    for oid, why in rep.corrupt.items():
        click.echo(f"corrupt {oid}: {why}")
    for oid, who in rep.missing.items():
        click.echo(f"missing {oid} (named by {who})")
    for name, why in rep.bad_refs.items():
        click.echo(f"bad ref {name}: {why}")
    click.echo(f"checked {rep.objects} {noun}: " + ("ok" if rep.ok else "PROBLEMS FOUND"), err=True)


def store_line(store: dict) -> str:
    """' 12.3 MiB added to the store for 40.0 MiB of new chunks (0.31; 10 diff, 2 planes)'."""
    enc = ", ".join(f"{n} {k}" for k, n in sorted(store["encodings"].items()))
    ratio = f"{store['stored'] / store['raw']:.2f}; " if store["raw"] else ""
    return (f" {human(store['stored'])} added to the store for {human(store['raw'])} of new chunks"
            + (f" ({ratio}{enc})" if enc else ""))
