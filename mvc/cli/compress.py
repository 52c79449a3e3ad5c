"""`mvc eval` and `mvc compress score|prune|shed|quantize|heal|factorize|run`: parse, call mvc.compress, render."""

from __future__ import annotations

import json
import os
import sys

import click

from ..errors import UsageError
from ..state import CFG_CALIB, CFG_EVAL
from . import render
from .context import default_author, options, pass_ctx

_MAX_DROP = click.option("--max-drop", default="3%", show_default=True, metavar="PCT",
                         help="Largest allowed metric drop against the start of the step ('off' to disable).")
_RECORD = (click.option("--seed", type=int, default=0, show_default=True),
           click.option("-m", "--message", default=None, help="Commit message (default: describes the step)."),
           click.option("--json", "as_json", is_flag=True))

_eval_options = options(
    click.option("--ppl", "ppl", metavar="TEXTFILE", default=None,
                 help="Perplexity on this text (default: the repository's evaluation)."),
    click.option("--cmd", "cmd", metavar="CMD", default=None,
                 help="A command run in a checkout: exit 0 good, 1-124 bad, 125 skip."),
    click.option("--tokens", type=int, default=None, help="Token budget of the evaluation text."),
    click.option("--seq-len", type=int, default=None, help="Window length for perplexity."),
    click.option("--model", "model_dir", default="", metavar="DIR", help="The model's directory in the tree."),
    click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
                 help="Where layer-by-layer work runs (prune, eval); auto: CUDA when available."),
    click.option("--max-memory", default=None, metavar="SIZE",
                 help="Refuse to start when the step's planned peak memory exceeds SIZE (e.g. 8GiB)."))

#: steps that can run in waves (prune, shed)
_wave_step_options = options(
    _MAX_DROP,
    click.option("--waves", type=int, default=1, show_default=True, help="Split the step into N commits."),
    click.option("--spike-z", type=float, default=3.0, show_default=True,
                 help="Stop waves when a metric rise has this z-score against the earlier ones (0: off)."),
    click.option("--calib", metavar="TEXTFILE", default=None,
                 help="Calibration text (default: the repository's calib text)."),
    click.option("--dry-run", is_flag=True, help="Print what would change; write nothing."),
    *_RECORD)

#: steps that are one commit (quantize, factorize, heal)
_single_step_options = options(_MAX_DROP, *_RECORD)


def _spec(c, repo, ppl, cmd, tokens, seq_len, device=None, max_memory=None):
    from ..compress.device import parse_size
    from ..compress.evaluate import make_spec

    return make_spec(repo, ppl, cmd, tokens, seq_len, env=dict(os.environ), device=device,
                     max_memory=parse_size(max_memory))


def _stepoptions(c, repo, common: dict, whole_model: bool = True):
    """The one place a step's shared options (evaluation, guard, waves, calibration, record) are built.
    *whole_model* steps (all but prune) hold the whole model in memory on the CPU: --device cuda is
    refused for them, and auto means the CPU."""
    from ..compress.device import resolve
    from ..compress.runner import StepOptions, parse_pct

    device = common["device"]
    if whole_model:
        resolve(device, whole_model=True)
        device = "cpu"
    spec = _spec(c, repo, common["ppl"], common["cmd"], common["tokens"], common["seq_len"], device,
                 common["max_memory"])
    return StepOptions(spec, max_drop=parse_pct(common["max_drop"]), waves=common.get("waves", 1),
                       spike_z=common.get("spike_z", 3.0), calib=common.get("calib"), seed=common["seed"],
                       model_dir=common["model_dir"], message=common["message"], author=default_author(),
                       progress=c.progress())


def _metric_text(spec, m: dict) -> str:
    if spec.kind == "ppl":
        return f"ppl {m['ppl']:.3f}"
    return ("pass" if m.get("pass") else f"fail (exit {m.get('exit')})") + \
        (f", score {m['score']:g}" if "score" in m else "")


def _render_outcome(c, out, opts, as_json: bool) -> None:
    spec = opts.spec
    repo = c.repo()
    branch = repo.refs.current_branch() or "HEAD"
    if as_json:
        render.emit_json({"base": out.base, "head": out.head, "before": out.before, "attempt": out.attempt,
                          "planned_waves": out.planned,
                          "waves": [{"strength": w.strength, "commit": w.commit, "metrics": w.metrics,
                                     "drop": w.drop, "accepted": w.accepted, "reason": w.reason or None}
                                    for w in out.waves]})
    else:
        click.echo(f"before: {_metric_text(spec, out.before)}  ({spec.describe()})")
        n = out.planned
        for i, w in enumerate(out.waves, 1):
            changed = sum(ch for ch, _ in w.counts.values())
            total = sum(t for _, t in w.counts.values())
            state = "landed" if w.accepted else click.style(f"rejected: {w.reason}", fg="red")
            wave = f"wave {i}/{n}  " if n > 1 else ""
            strength = f"sparsity {w.strength:.1%}  " if out.op == "prune" else ""
            click.echo(f"{wave}{strength}{changed}/{total} elements  "
                       f"{_metric_text(spec, w.metrics)} ({w.drop:+.1%})  "
                       + click.style(w.commit[:12], fg="yellow") + f"  {state}")
        if out.attempt:
            click.echo(f"the rejected commit is kept as {out.attempt} (inspect with `mvc show {out.attempt}`)")
        if out.head != out.base:
            click.echo(f"{branch} is now at {out.head[:12]} ({len(out.landed)} commit(s))")
        else:
            click.echo(f"nothing landed: {branch} stays at {out.base[:12]}")
    if out.attempt:
        sys.exit(1)


@click.command("eval")
@click.argument("rev", default="HEAD")
@_eval_options
@click.option("--work-tree", is_flag=True, help="Evaluate the work tree as it is (uncommitted changes too).")
@click.option("--no-cache", is_flag=True, help="Evaluate again even if a result is cached.")
@click.option("--set-default", is_flag=True, help="Make this evaluation the repository's default.")
@click.option("--value", "value_only", is_flag=True,
              help="Print only the number (for scripts and `mvc bisect run --metric`).")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def eval_cmd(c, rev, ppl, cmd, tokens, seq_len, model_dir, device, max_memory, work_tree, no_cache, set_default,
             value_only, as_json):
    """Evaluate REV: perplexity on a text, or a command (cached per tree and evaluation)."""
    from ..compress import require

    require("mvc eval")
    from ..compress.evaluate import evaluate, spec_config

    repo = c.repo()
    spec = _spec(c, repo, ppl, cmd, tokens, seq_len, device, max_memory)
    if work_tree:
        if rev != "HEAD":
            raise UsageError("pass REV or --work-tree, not both")
        rev = repo.snapshot(progress=c.progress())
    if set_default:
        repo.update_config(lambda cfg: cfg.update(eval=spec_config(spec, repo.root)))
    progress = c.progress()
    res = evaluate(repo, rev, spec, model_dir=model_dir, use_cache=not no_cache, progress=progress)
    progress.finish()
    if as_json:
        render.emit_json({"rev": repo.resolve(rev), "eval": spec.describe(), **res})
        return
    if value_only:
        click.echo(f"{res['ppl']!r}" if spec.kind == "ppl" else str(res.get("score", int(bool(res.get("pass"))))))
        return
    click.echo(f"{_metric_text(spec, res)}  ({spec.describe()}{', cached' if res.get('cached') else ''})")
    if spec.kind == "cmd" and not res.get("pass"):
        sys.exit(1)


@click.group("compress")
def compress_group():
    """Compression steps, each a guarded commit with its op record."""
    from ..compress import require

    require("mvc compress")


@compress_group.command("score")
@click.argument("rev", default="HEAD")
@click.option("--method", type=click.Choice(["magnitude", "taylor", "fisher", "wanda"]), default="magnitude",
              show_default=True)
@click.option("--calib", metavar="TEXTFILE", default=None)
@click.option("--scope", multiple=True, metavar="GLOB", help="Only these tensors (globs over names).")
@click.option("--model", "model_dir", default="", metavar="DIR")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Write the report: .json or .csv (per structure).")
@click.option("--elements", type=click.Path(dir_okay=False), default=None,
              help="Also write every element's score as a .safetensors file.")
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
              help="Where magnitude and Wanda scores are computed, layer by layer.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def score_cmd(c, rev, method, calib, scope, model_dir, output, elements, device, as_json):
    """Importance scores per element, MLP neuron and attention head, with a layer-wise summary."""
    from ..compress import score as score_mod

    repo = c.repo()
    from ..compress.device import resolve

    resolve(device, whole_model=method not in ("magnitude", "wanda"))
    report, scores = score_mod.run(repo, rev, method, calib, list(scope) or None, model_dir,
                                   elements=bool(elements), device=device, progress=c.progress())
    if output:
        with open(output, "w", encoding="utf-8") as f:
            if output.endswith(".csv"):
                f.write(score_mod.to_csv(report))
            else:
                json.dump(report, f, indent=1)
                f.write("\n")
    if elements:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in scores.items()}, elements, metadata={"method": method})
    if as_json:
        render.emit_json(report)
        return
    click.echo(f"{method} scores of {report['rev'][:12]}")
    click.echo(f"{'layer':>5}  {'mean score':>12}  {'weakest neuron':>16}  {'weakest head':>14}")
    for row in report["layers"]:
        neu = row.get("neurons") or []
        hd = row.get("heads") or []
        wn = f"{min(range(len(neu)), key=neu.__getitem__)} ({min(neu):.3g})" if neu else "-"
        wh = f"{min(range(len(hd)), key=hd.__getitem__)} ({min(hd):.3g})" if hd else "-"
        click.echo(f"{row['layer']:>5}  {row['mean']:>12.4g}  {wn:>16}  {wh:>14}")
    if output:
        click.echo(f"wrote {output}")


@compress_group.command("prune")
@click.option("--method", type=click.Choice(["magnitude", "wanda", "sparsegpt"]), default="magnitude",
              show_default=True)
@click.option("--sparsity", type=float, default=None, help="Fraction of weights to zero, in [0, 1).")
@click.option("--pattern", default=None, metavar="N:M", help="Semi-structured: keep N of every M (2:4, 4:8).")
@click.option("--layer-sparsity", multiple=True, metavar="GLOB=S", help="Per-tensor sparsity (repeatable).")
@click.option("--clusters", type=int, default=0, help="Cluster-adaptive thresholds: k-means over rows, K clusters.")
@click.option("--scope", multiple=True, metavar="GLOB", help="Only these tensors (globs over names).")
@click.option("--embeddings", is_flag=True, help="Also prune embeddings and the LM head (magnitude only).")
@_eval_options
@_wave_step_options
@pass_ctx
def prune_cmd(c, method, sparsity, pattern, layer_sparsity, clusters, scope, embeddings, dry_run, as_json,
              **common):
    """Zero weights by magnitude, Wanda or SparseGPT; unstructured or N:M."""
    from ..compress import prune

    if sparsity is None and not pattern:
        raise UsageError("pass --sparsity S (or --pattern N:M)")
    repo = c.repo()
    if dry_run:
        from ..compress.calib import make_calib

        rows = prune.plan(repo, "HEAD", sparsity or 0.0, pattern, list(scope) or None, embeddings,
                          layer_sparsity, common["model_dir"])
        # the calibration text, when there is one (the dry run itself does not need it)
        known = common["calib"] or repo.config.get(CFG_CALIB)
        cal = make_calib(repo, common["calib"]) if method != "magnitude" and known else None
        spec = None  # the evaluation after the prune, if there is one
        if common["ppl"] or common["cmd"] or repo.config.get(CFG_EVAL):
            spec = _spec(c, repo, common["ppl"], common["cmd"], common["tokens"], common["seq_len"])
        memory = prune.memory_plan(repo, "HEAD", method, cal, common["model_dir"], spec)
        _render_plan(rows, as_json, memory)
        return
    opts = _stepoptions(c, repo, common, whole_model=False)
    out = prune.run(repo, opts, method, sparsity if sparsity is not None else 0.0, pattern=pattern,
                    scope=list(scope) or None, embeddings=embeddings, layer_sparsity=layer_sparsity,
                    clusters=clusters)
    _render_outcome(c, out, opts, as_json)


def _render_plan(rows, as_json: bool, memory=None) -> None:
    if as_json:
        out = [{"tensor": r.tensor, "shape": list(r.shape), "elements": r.elements, "prune": r.change} for r in rows]
        render.emit_json({"tensors": out, "memory": memory.as_dict()} if memory is not None else out)
        return
    for r in rows:
        click.echo(f"{r.tensor}  {list(r.shape)}  {r.change}/{r.elements} to zero")
    if memory is not None:
        click.echo(f"{memory.describe()}; one of {memory.layers} layers in memory at a time")
    tot, ch = sum(r.elements for r in rows), sum(r.change for r in rows)
    click.echo(f"dry run: {len(rows)} tensors, {ch}/{tot} elements ({ch / max(1, tot):.1%}) would be zeroed; "
               "nothing written")


@compress_group.command("shed")
@click.option("--neurons", type=float, default=0.0, help="Fraction of MLP neurons to remove per layer.")
@click.option("--heads", type=float, default=0.0, help="Fraction of attention heads (KV groups) per layer.")
@click.option("--score", "method", type=click.Choice(["magnitude", "taylor", "fisher", "wanda"]), default="wanda",
              show_default=True, help="Importance that decides which units go.")
@click.option("--min-keep", type=int, default=1, show_default=True, help="Units every layer keeps at least.")
@_eval_options
@_wave_step_options
@pass_ctx
def shed_cmd(c, neurons, heads, method, min_keep, dry_run, as_json, **common):
    """Remove the least important MLP neurons and attention heads; shapes and config shrink."""
    from ..compress import shed

    repo = c.repo()
    if dry_run:
        plan = shed.plan(repo, "HEAD", neurons, heads, min_keep, common["model_dir"])
        if as_json:
            render.emit_json(plan)
            return
        for kind in ("neurons", "heads"):
            if plan[kind]:
                have, gone = plan[kind]
                click.echo(f"{kind}: {have} per layer, {gone} removed from each of {plan['layers']} layers "
                           f"-> {have - gone}")
        click.echo("dry run: nothing written")
        return
    opts = _stepoptions(c, repo, common)
    out = shed.run(repo, opts, neurons=neurons, heads=heads, method=method, min_keep=min_keep)
    _render_outcome(c, out, opts, as_json)


COMMANDS = (eval_cmd, compress_group)



@compress_group.command("quantize")
@click.option("--method", type=click.Choice(["nf4", "fp4", "int8", "rtn-int8", "rtn-int4", "fp16", "bf16"]),
              required=True, help="bitsandbytes nf4/fp4/int8, mvc's round-to-nearest, or a cast.")
@click.option("--group-size", type=int, default=0, help="rtn: one scale per G inputs (default: one per row).")
@click.option("--double-quant", is_flag=True, help="nf4/fp4: quantize the block scales too.")
@click.option("--scope", multiple=True, metavar="GLOB", help="Only these tensors (globs over names).")
@click.option("--skip", multiple=True, metavar="GLOB", help="Keep these tensors in full precision.")
@click.option("--bits", multiple=True, metavar="GLOB=4|8", help="rtn: per-tensor bit width (mixed precision).")
@click.option("--budget-bits", type=float, default=None, metavar="B",
              help="rtn: choose 4 or 8 bits per layer by a sensitivity scan, averaging at most B bits.")
@_eval_options
@_single_step_options
@pass_ctx
def quantize_cmd(c, method, group_size, double_quant, scope, skip, bits, budget_bits, as_json, **common):
    """Store the linear layers in low-bit form (packed integers + scales); loadable again."""
    from ..compress import quantize
    from ..compress.runner import parse_assignments

    repo = c.repo()
    opts = _stepoptions(c, repo, common)
    out = quantize.run(repo, opts, method, group_size=group_size, double_quant=double_quant,
                       scope=list(scope) or None, skip=tuple(skip),
                       bits=dict(parse_assignments(bits, "--bits", int, "model.layers.0.*=8")) or None,
                       budget_bits=budget_bits)
    _render_outcome(c, out, opts, as_json)


@compress_group.command("heal")
@click.option("--text", metavar="TEXTFILE", default=None, help="Training text (default: the repository's calib text).")
@click.option("--steps", "steps_", type=int, default=50, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--rank", type=int, default=16, show_default=True, help="LoRA rank.")
@click.option("--alpha", type=float, default=16.0, show_default=True, help="LoRA alpha (scale = alpha / rank).")
@click.option("--rounds", type=int, default=2, show_default=True,
              help="Train-and-merge rounds (later rounds learn within the sparsity mask).")
@click.option("--targets", type=int, default=None, help="Heal only the K most damaged layers (default: all).")
@click.option("--against", default=None, metavar="REV",
              help="Damage is measured against this revision (default: the last one before prune/shed steps).")
@_eval_options
@_single_step_options
@pass_ctx
def heal_cmd(c, text, steps_, lr, rank, alpha, rounds, targets, against, as_json, **common):
    """LoRA-heal the most damaged layers (peft); pruned weights stay exactly zero."""
    from ..compress import heal

    repo = c.repo()
    opts = _stepoptions(c, repo, common)
    out = heal.run(repo, opts, text=text, steps_=steps_, lr=lr, rank=rank, alpha=alpha, rounds=rounds,
                   targets=targets, against=against)
    _render_outcome(c, out, opts, as_json)


@compress_group.command("factorize")
@click.option("--rank", type=int, default=None, help="Keep this many singular values.")
@click.option("--energy", type=float, default=None, help="Keep the smallest rank carrying this share of σ².")
@click.option("--whiten", is_flag=True, help="Activation-aware (ASVD-style scaling by calibration inputs).")
@click.option("--scope", multiple=True, metavar="GLOB", help="Only these tensors (globs over names).")
@click.option("--calib", metavar="TEXTFILE", default=None)
@_eval_options
@_single_step_options
@pass_ctx
def factorize_cmd(c, rank, energy, whiten, scope, as_json, **common):
    """Replace linear layers by two low-rank factors (truncated SVD)."""
    from ..compress import factorize

    repo = c.repo()
    opts = _stepoptions(c, repo, common)
    out = factorize.run(repo, opts, rank=rank, energy=energy, scope=list(scope) or None, whiten=whiten)
    _render_outcome(c, out, opts, as_json)


@compress_group.command("run")
@click.argument("recipe_path", metavar="RECIPE.yaml", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def run_cmd(c, recipe_path, as_json):
    """Run a recipe: each step a guarded commit; a second run resumes after the finished steps."""
    from ..compress import recipe as R
    from .render import human

    repo = c.repo()
    rec = R.load(recipe_path)

    def metric(m):
        if not m:
            return "-"
        return f"{m['ppl']:.2f}" if "ppl" in m else ("pass" if m.get("pass") else "fail")

    def on_row(r):
        if not as_json:
            click.echo(f"step {r.index + 1}/{len(rec.steps)} {r.kind:<9} {r.status:<8} "
                       f"{(r.commit or '')[:12]:<12}  {metric(r.metrics):>8}  {r.detail}")

    rows, finished = R.run(repo, rec, env=dict(os.environ), author=default_author(), on_row=on_row,
                           progress=c.progress())
    if as_json:
        render.emit_json({"recipe": rec.name, "id": rec.id, "finished": finished,
                          "steps": [vars(r) for r in rows]})
    else:
        click.echo("")
        click.echo("| step | kind | status | commit | metric | weights | store added |")
        click.echo("|---|---|---|---|---|---|---|")
        for r in rows:
            click.echo(f"| {r.index + 1} | {r.kind} | {r.status} | {(r.commit or '')[:12]} | {metric(r.metrics)} | "
                       f"{human(r.size) if r.size is not None else '-'} | "
                       f"{human(r.added) if r.added is not None else '-'} |")
        click.echo(f"recipe {rec.name}: " + ("finished" if finished else "stopped by a guard (see above); "
                                              "fix the recipe and run it again to go on"))
    if not finished:
        sys.exit(1)
