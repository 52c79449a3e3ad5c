"""Recipes: a YAML list of compression steps run in order, each a guarded commit, resumable.

    name: bird-bone
    eval: {ppl: eval.txt, tokens: 8192}     # optional; default: the repository's evaluation
    max_drop: 10%                           # optional default guard for every step
    steps:
      - shed: {neurons: 0.125, score: wanda}
      - prune: {method: sparsegpt, sparsity: 0.5, waves: 3}
      - heal: {steps: 50}
      - quantize: {method: nf4}
      - eval: {}

Each committed step's op record carries ``recipe: {id, name, step}`` (id: the hash of the
recipe's canonical content). Running a recipe again skips the steps whose commits are already
in HEAD's history, so a killed run resumes where it stopped. Paths in a recipe are relative to
the repository root. Every error names the recipe line it comes from.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ..errors import UsageError
from ..store.ids import hash_object
from .runner import RECIPE as CURRENT
from .runner import parse_pct


def _frac(v) -> float:
    return float(v)


def _globs(v) -> list:
    return [v] if isinstance(v, str) else [str(x) for x in v]


_COMMON = {"max_drop": parse_pct, "message": str, "seed": int}
KINDS = {
    "score": {"method": str, "output": str, "calib": str, "scope": _globs},
    "shed": {"neurons": _frac, "heads": _frac, "score": str, "min_keep": int, "waves": int, "spike_z": float,
             "calib": str, **_COMMON},
    "prune": {"method": str, "sparsity": _frac, "pattern": str, "layer_sparsity": _globs, "clusters": int,
              "scope": _globs, "embeddings": bool, "waves": int, "spike_z": float, "calib": str, **_COMMON},
    "heal": {"text": str, "steps": int, "lr": float, "rank": int, "alpha": float, "rounds": int, "targets": int,
             "against": str, "tokens": int, **_COMMON},
    "quantize": {"method": str, "group_size": int, "double_quant": bool, "scope": _globs, "skip": _globs,
                 "bits": dict, "budget_bits": float, **_COMMON},
    "factorize": {"rank": int, "energy": _frac, "whiten": bool, "scope": _globs, "calib": str, **_COMMON},
    "eval": {},
}
TOP = {"name", "description", "eval", "max_drop", "steps"}
EVAL_KEYS = {"ppl", "cmd", "tokens", "seq_len"}



@dataclass
class Step:
    kind: str
    params: dict
    line: int


@dataclass
class Recipe:
    path: str
    name: str
    id: str
    steps: list[Step]
    eval: dict = field(default_factory=dict)
    max_drop: float | None = None


def _err(path: str, line: int, msg: str, hint: str | None = None) -> UsageError:
    return UsageError(f"{path}:{line + 1}: {msg}", hint=hint)


SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")


def shipped() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(SHIPPED) if f.endswith(".yaml"))


def load(path: str) -> Recipe:
    """Parse and validate a recipe (yaml.safe_load semantics: data only, nothing is executed).
    A bare name (``bird-bone``) that is not a file names a recipe shipped with mvc."""
    import yaml

    if not os.path.exists(path) and os.sep not in path and path.removesuffix(".yaml") in shipped():
        path = os.path.join(SHIPPED, path.removesuffix(".yaml") + ".yaml")

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise UsageError(f"cannot read recipe {path}: {e.strerror}",
                         hint=f"shipped recipes: {', '.join(shipped())}") from e
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UsageError(f"{path}:{(mark.line + 1) if mark else '?'}: not valid YAML "
                         f"({getattr(e, 'problem', None) or e})") from e
    if not isinstance(data, dict) or node is None:
        raise UsageError(f"{path}:1: a recipe is a mapping with a `steps:` list")
    lines = {k.value: k.start_mark.line for k, _v in node.value}
    for key in data:
        if key not in TOP:
            raise _err(path, lines.get(key, 0), f"unknown key {key!r}", hint=f"known: {', '.join(sorted(TOP))}")
    steps_node = next((v for k, v in node.value if k.value == "steps"), None)
    if not isinstance(data.get("steps"), list) or not data["steps"]:
        raise _err(path, lines.get("steps", 0), "`steps:` must be a non-empty list")
    ev = data.get("eval") or {}
    if not isinstance(ev, dict) or set(ev) - EVAL_KEYS:
        bad = sorted(set(ev) - EVAL_KEYS) if isinstance(ev, dict) else ["(not a mapping)"]
        raise _err(path, lines.get("eval", 0), f"unknown eval key {bad[0]!r}",
                   hint=f"known: {', '.join(sorted(EVAL_KEYS))}")
    steps = []
    for item, item_node in zip(data["steps"], steps_node.value):
        line = item_node.start_mark.line
        if not isinstance(item, dict) or len(item) != 1:
            raise _err(path, line, "each step is one `kind: {params}` entry", hint=f"kinds: {', '.join(KINDS)}")
        (kind, params), = item.items()
        if kind not in KINDS:
            raise _err(path, line, f"unknown step {kind!r}", hint=f"kinds: {', '.join(KINDS)}")
        params = params or {}
        if not isinstance(params, dict):
            raise _err(path, line, f"the parameters of {kind} must be a mapping")
        pnode = item_node.value[0][1]
        plines = {k.value: k.start_mark.line for k, _v in pnode.value} if hasattr(pnode, "value") and \
            isinstance(pnode.value, list) else {}
        typed = {}
        for key, value in params.items():
            conv = KINDS[kind].get(key)
            if conv is None:
                raise _err(path, plines.get(key, line), f"unknown key {key!r} in the {kind} step",
                           hint=f"known: {', '.join(sorted(KINDS[kind])) or 'none'}")
            try:
                typed[key] = conv(value) if conv is not dict else dict(value)
            except (TypeError, ValueError, UsageError) as e:
                raise _err(path, plines.get(key, line), f"{kind}.{key}: {value!r} is not valid ({e})") from e
        steps.append(Step(kind, typed, line))
    canonical = json.dumps({"steps": [[s.kind, s.params] for s in steps], "eval": ev},
                           sort_keys=True, default=str).encode()
    rid = hash_object("chunk", canonical).hex()[:16]
    md = parse_pct(data["max_drop"], "max_drop") if "max_drop" in data else None
    return Recipe(path, str(data.get("name") or os.path.splitext(os.path.basename(path))[0]), rid, steps, ev, md)


def done_steps(repo, recipe: Recipe) -> tuple[dict[int, list[str]], str | None]:
    """({step index: [commit ids]} of this recipe's steps in HEAD's first-parent history, the
    commit the recipe started from (the parent of its oldest commit; None if it has none))."""
    out: dict[int, list[str]] = {}
    oid, start = repo.refs.head_commit(), None
    while oid:
        c = repo.commit_obj(oid)
        parent = c.parents[0] if c.parents else None
        tag = (c.op or {}).get("recipe") or {}
        if tag.get("id") == recipe.id:
            out.setdefault(int(tag["step"]), []).append(oid)
            start = parent
        oid = parent
    return out, start


@dataclass
class Row:
    index: int
    kind: str
    status: str  # "skipped" (done before), "landed", "stopped", "measured"
    commit: str | None
    metrics: dict | None
    size: int | None  # bytes of the model's weight files in the tree
    added: int | None  # bytes the step added to the store
    detail: str = ""


def _model_bytes(repo, commit: str, model_dir: str = "") -> int:
    prefix = model_dir.strip("/") + "/" if model_dir.strip("/") else ""
    tree = repo.odb.get(repo.commit_obj(commit).tree, "tree")
    return sum(repo.odb.get(e.oid, "file").size for e in tree.entries
               if e.path.startswith(prefix) and "/" not in e.path[len(prefix):] and e.path.endswith(".safetensors"))


#: step parameters that belong to the shared StepOptions rather than to the operation
_SHARED = ("max_drop", "waves", "spike_z", "calib", "seed", "message")


def _kwargs(step: Step, recipe: Recipe) -> dict:
    p = dict(step.params)
    if "max_drop" not in p and recipe.max_drop is not None:
        p["max_drop"] = recipe.max_drop
    if step.kind == "shed" and "score" in p:
        p["method"] = p.pop("score")
    if step.kind == "heal" and "steps" in p:
        p["steps_"] = p.pop("steps")
    if step.kind == "quantize" and "skip" in p:
        p["skip"] = tuple(p["skip"])
    if step.kind == "prune" and "layer_sparsity" in p:
        p["layer_sparsity"] = tuple(p["layer_sparsity"])
    return p


def run(repo, recipe: Recipe, env: dict | None = None, author: str | None = None, on_row=None,
        progress=None) -> tuple[list[Row], bool]:
    """Run the recipe's remaining steps on HEAD; (rows, finished). Stops at the first guard stop."""
    from ..progress import NULL
    from . import factorize, heal, prune, quantize, score, shed
    from .evaluate import evaluate, make_spec
    from .runner import StepOptions

    progress = progress or NULL
    ev = recipe.eval
    try:
        spec = make_spec(repo, ev.get("ppl"), ev.get("cmd"), ev.get("tokens"), ev.get("seq_len"),
                         base_dir=repo.root, env=env)
    except UsageError as e:
        raise UsageError(f"{recipe.path}: eval: {e}", hint=e.hint) from e
    done, start = done_steps(repo, recipe)
    start = start or repo.refs.head_commit()
    rows = []
    for i, step in enumerate(recipe.steps):
        def emit(row):
            rows.append(row)
            if on_row:
                on_row(row)
        if i in done:
            c = done[i][0]
            emit(Row(i, step.kind, "skipped", c, (repo.commit_obj(c).op or {}).get("metrics", {}).get("after"),
                     _model_bytes(repo, c), None, "done before"))
            continue
        head = repo.refs.head_commit()
        if step.kind == "eval":
            m = evaluate(repo, head, spec)
            emit(Row(i, "eval", "measured", head, {k: v for k, v in m.items() if k != "cached"},
                     _model_bytes(repo, head), None))
            continue
        p = _kwargs(step, recipe)
        try:
            if step.kind == "score":
                report, _scores = score.run(repo, "HEAD", p.get("method", "magnitude"), p.get("calib"), p.get("scope"),
                                           elements=False)
                if p.get("output"):
                    with open(os.path.join(repo.root, p["output"]), "w", encoding="utf-8") as f:
                        json.dump(report, f, indent=1)
                emit(Row(i, "score", "measured", head, None, None, None, p.get("output", "")))
                continue
            if step.kind == "heal":
                p.setdefault("against", start)
            before = repo.backend.stats().get("stored_bytes", 0)
            token = CURRENT.set({"id": recipe.id, "name": recipe.name, "step": i})
            try:
                module = {"shed": shed, "prune": prune, "heal": heal, "quantize": quantize,
                          "factorize": factorize}[step.kind]
                opts = StepOptions(spec, author=author, progress=progress,
                                   **{k: p.pop(k) for k in _SHARED if k in p})
                if step.kind == "prune":
                    out = module.run(repo, opts, p.pop("method", "magnitude"), p.pop("sparsity", 0.0), **p)
                else:
                    out = module.run(repo, opts, **p)
            finally:
                CURRENT.reset(token)
        except UsageError as e:
            raise UsageError(f"{recipe.path}:{step.line + 1}: {step.kind}: {e}", hint=e.hint) from e
        added = repo.backend.stats().get("stored_bytes", 0) - before
        last = out.waves[-1] if out.waves else None
        status = "stopped" if out.attempt else "landed"
        emit(Row(i, step.kind, status, out.head, (last.metrics if last and last.accepted else
                                                  (out.landed[-1].metrics if out.landed else out.before)),
                 _model_bytes(repo, out.head), added, last.reason if out.attempt else ""))
        if out.attempt:
            return rows, False
    return rows, True
