"""Compression steps as commits: plan, apply in waves, evaluate, guard, record.

A step runs on HEAD (the model's files unmodified in the work tree). Each wave applies the
operation at a growing strength to the model in memory, writes the changed tensors as a new
tree, evaluates it, and records a commit whose ``op`` says what was done and what it cost.
A wave that drops the metric by more than ``max_drop`` against the step's starting point, or
whose rise is a spike against the earlier waves (z-score of log-metric increments), does not
land: its commit is kept under ``refs/attempts/<branch>/<n>`` and the branch stays at the last
good wave. The work tree and the branch move once, at the end, so an interrupted step leaves
the branch where it was.
"""

from __future__ import annotations

import contextvars
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

from .. import __version__
from ..errors import DirtyWorkTreeError, UsageError
from ..guard import spike  # noqa: F401 - the spike rule, shared with mvc report
from ..progress import NULL, Progress
from ..state import ATTEMPTS
from .evaluate import EvalSpec, drop, evaluate_tree
from .layerwise import source_with_tree
from .model import Model, build_tree, open_source, tree_from_dir, with_files

#: set while a recipe runs ({id, name, step}): run() copies it into every op record
RECIPE = contextvars.ContextVar("mvc_recipe", default=None)


@dataclass
class StepOptions:
    """What every compression step shares; the CLI (and a recipe) builds one per step."""

    spec: EvalSpec  # how the model is evaluated before and after
    max_drop: float = 0.03  # the guard: largest metric drop against the step's start (inf: off)
    waves: int = 1  # split the step into this many guarded commits (prune, shed)
    spike_z: float = 3.0  # stop waves on a metric rise with this z-score (0: off)
    calib: str | None = None  # calibration text (default: the repository's)
    seed: int = 0
    model_dir: str = ""  # the model's directory in the tree
    message: str | None = None  # commit message (default: describes the step)
    author: str | None = None
    progress: Progress = NULL


@dataclass
class Change:
    """What one application of a step did to the model in memory."""

    counts: dict  # tensor -> (elements changed, elements)
    extra: dict = field(default_factory=dict)  # more params for the op record
    config: dict | None = None  # a new config.json (shapes changed)
    out_dir: str | None = None  # the step wrote the model's files here itself (quantization)
    add_files: dict = field(default_factory=dict)  # tree path -> local file to add (an adapter)
    tree: object = None  # the step stored its tensors and made the tree itself (from the store, layer-wise)


def scratch_dir(repo) -> str:
    """A fresh directory under .mvc/tmp for the files one wave writes (removed after the wave)."""
    return tempfile.mkdtemp(dir=repo.tmp_dir(), prefix="wave-")


@dataclass
class Wave:
    strength: float
    commit: str
    metrics: dict
    drop: float
    accepted: bool
    reason: str = ""
    counts: dict = field(default_factory=dict)


@dataclass
class Outcome:
    base: str
    head: str  # where the branch is after the step (== base when nothing landed)
    before: dict
    planned: int = 1
    op: str = ""
    waves: list[Wave] = field(default_factory=list)
    attempt: str | None = None  # the side ref of a rejected wave

    @property
    def landed(self) -> list[Wave]:
        return [w for w in self.waves if w.accepted]


def parse_pct(value, option: str = "--max-drop") -> float:
    """'3%', '3' or 3 (percent) -> 0.03; 'off' (or YAML's false) -> no limit."""
    if value is False or (isinstance(value, str) and value.strip().lower() in ("off", "none", "inf")):
        return float("inf")
    try:
        v = float(value.strip().rstrip("%") if isinstance(value, str) else value)
    except (TypeError, ValueError):
        v = None
    if v is None or value is True:
        raise UsageError(f"{option} {value!r} is not a percentage", hint="for example 3% (or off)")
    if v < 0:
        raise UsageError(f"{option} must not be negative")
    return v / 100


def next_attempt_ref(repo) -> str:
    branch = repo.refs.current_branch() or "detached"
    taken = repo.backend.list_refs(ATTEMPTS + branch + "/")
    n = 1 + max((int(k.rsplit("/", 1)[1]) for k in taken if k.rsplit("/", 1)[1].isdigit()), default=0)
    return f"{ATTEMPTS}{branch}/{n}"


def _value(spec: EvalSpec, metrics: dict) -> float:
    return metrics["ppl"] if spec.kind == "ppl" else (0.0 if metrics.get("pass") else 1.0)


def _clean_metrics(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "cached"}


def run(repo, opts: StepOptions, *, op: str, method: str, params: dict, strengths: list[float], apply,
        scope: list | None = None, streamed: bool = False) -> Outcome:
    """Run one compression step. *apply(model, strength, scratch)* changes the model in place and
    returns a Change; files it writes go into the directory *scratch*, removed after the wave.
    *streamed*: no model is held in memory; *apply(source, strength, scratch)* reads the wave's
    starting point from the store and returns a Change with the tree it stored, and evaluations
    read each tree from the store a layer at a time."""
    spec, max_drop, spike_z, seed = opts.spec, opts.max_drop, opts.spike_z, opts.seed
    model_dir, message, author, progress = opts.model_dir, opts.message, opts.author, opts.progress
    if max_drop < 0:
        raise UsageError("--max-drop must not be negative")
    with repo.lock():
        base = repo.refs.head_commit()
        if base is None:
            raise UsageError("nothing committed yet", hint="commit a model first")
        src = open_source(repo, base, model_dir)
        st = repo.status()
        touched = {*src.files, src.prefix + "config.json"}
        dirty = sorted(p for p in (*st.modified, *st.deleted) if p in touched)
        if dirty:  # the step rewrites these from HEAD: local edits would be lost
            raise DirtyWorkTreeError(f"{dirty[0]} has uncommitted changes",
                                     hint="commit or discard them first (`mvc status`)")
        model = None if streamed else Model(repo, src)
        base_tree = repo.commit_obj(base).tree
        before = _clean_metrics(evaluate_tree(repo, base_tree, spec, base, model=model, progress=opts.progress))
        opts.progress.finish()
        out = Outcome(base, base, before, len(strengths), op)
        values = [_value(spec, before)]
        parent, parent_metrics, config = base, before, None
        current = src  # streamed: where the next wave starts
        for k, strength in enumerate(strengths, 1):
            t0 = time.time()
            scratch = scratch_dir(repo)
            try:
                ch = apply(current if streamed else model, strength, scratch)
                if ch.tree is not None:
                    tree = ch.tree
                elif ch.out_dir is not None:  # the step wrote the model's files itself (quantization)
                    tree = tree_from_dir(repo, src, ch.out_dir)
                else:
                    if ch.config is not None:
                        config = ch.config
                        model.rebuild(config)
                    tree = build_tree(repo, src, model.state(), model.originals, scratch, config, model.added)
                if ch.add_files:
                    tree = with_files(repo, tree, ch.add_files)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            extra, counts = ch.extra, ch.counts
            tree_oid = repo.odb.encode_meta(tree)
            if streamed:
                current = source_with_tree(repo, src, tree)
            after = _clean_metrics(evaluate_tree(repo, tree_oid[0].hex(), spec, None, model=model, tree=tree,
                                                 src=current if streamed else None, progress=opts.progress))
            opts.progress.finish()
            values.append(_value(spec, after))
            d = drop(spec, before, after)
            z = spike(values, spike_z)
            record = {"op": op, "method": method, "params": {**params, **extra, "strength": strength},
                      "scope": scope or ["*"], "seed": seed,
                      "metrics": {"before": parent_metrics, "after": after, "eval": spec.describe()},
                      "elements": {"changed": sum(c for c, _ in counts.values()),
                                   "total": sum(t for _, t in counts.values())},
                      "guard": {"max_drop": max_drop if math.isfinite(max_drop) else None,
                                "spike_z": spike_z or None},
                      "wall_s": round(time.time() - t0, 3), "tool": f"mvc {__version__}"}
            if len(strengths) > 1:
                record["params"]["wave"] = [k, len(strengths)]
            if (tag := RECIPE.get()) is not None:
                record["recipe"] = tag
            msg = message or _message(op, method, params, strength, k, len(strengths))
            commit = repo.write_commit(tree, (parent,), msg, author, record)
            reason = ""
            if d > max_drop:
                reason = (f"{spec.metric} dropped {d:.1%} (> --max-drop {max_drop:.1%})" if spec.kind == "ppl"
                          else "the evaluation command failed")
            elif z is not None and z > spike_z:
                reason = f"loss spike: z-score {z:.1f} > {spike_z:g} against the earlier waves"
            wave = Wave(strength, commit, after, d, not reason, reason, counts)
            out.waves.append(wave)
            if reason:
                out.attempt = next_attempt_ref(repo)
                repo.refs.set_ref(out.attempt, commit, None, f"attempt: {msg.splitlines()[0]} ({reason})")
                break
            parent, parent_metrics = commit, after
        if parent != base:
            repo.land(parent, base, f"{op}: {(message or _message(op, method, params, None, 0, 0)).splitlines()[0]}",
                      progress)
        out.head = parent
        return out


def _message(op: str, method: str, params: dict, strength, k: int, n: int) -> str:
    what = f"{op}: {method}"
    if strength is not None and op == "prune":
        what += f" {strength:.0%}"
    elif strength is not None and op == "shed":
        parts = [f"{params[k] * strength:.1%} of {label}" for k, label in (("neurons", "MLP neurons"),
                                                                             ("heads", "heads")) if params.get(k)]
        what += " " + " and ".join(parts)
    if params.get("pattern"):
        what += f" {params['pattern']}"
    if n > 1:
        what += f" (wave {k}/{n})"
    return what


def parse_assignments(items, option: str, convert, example: str) -> list[tuple[str, object]]:
    """Repeatable GLOB=VALUE options (the first matching glob wins)."""
    out = []
    for item in items or []:
        glob, sep, value = item.rpartition("=")
        try:
            v = convert(value)
        except ValueError:
            v = None
        if not sep or not glob or v is None:
            raise UsageError(f"{option} {item!r} is not GLOB=VALUE", hint=f"for example {example!r}")
        out.append((glob, v))
    return out


def waves_of(target: float, waves: int) -> list[float]:
    if waves < 1:
        raise UsageError("--waves must be at least 1")
    return [target * k / waves for k in range(1, waves + 1)]


def calib_desc(cal) -> dict | None:
    if cal is None:
        return None

    return {"text": os.path.basename(cal.text), "tokens": cal.tokens, "seq_len": cal.seq_len}
