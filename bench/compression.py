"""The perplexity table of docs/compression.md: every method on the shipped demo model.

    python -m bench --compression

Each row is one real `mvc compress ...` step (through the library, guard off) on a fresh
`mvc init --demo` repository, evaluated with the repository's default evaluation
(perplexity on the held-out eval.txt); "store bytes added" are the stored bytes the step's
commit reaches that the demo model does not (for heal: that its parent, the pruned model, does not).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

ROWS = [
    ("prune", "magnitude", {"sparsity": 0.5}),
    ("prune", "wanda", {"sparsity": 0.5}),
    ("prune", "sparsegpt", {"sparsity": 0.5}),
    ("prune", "magnitude", {"sparsity": 0.5, "clusters": 4}),
    ("prune", "magnitude", {"pattern": "2:4"}),
    ("prune", "wanda", {"pattern": "2:4"}),
    ("prune", "sparsegpt", {"pattern": "2:4"}),
    ("prune", "magnitude", {"sparsity": 0.7}),
    ("prune", "wanda", {"sparsity": 0.7}),
    ("prune", "sparsegpt", {"sparsity": 0.7}),
    ("shed", "magnitude", {"neurons": 0.25}),
    ("shed", "taylor", {"neurons": 0.25}),
    ("shed", "fisher", {"neurons": 0.25}),
    ("shed", "wanda", {"neurons": 0.25}),
    ("shed", "wanda", {"heads": 0.5}),
    ("quantize", "nf4", {}),
    ("quantize", "nf4", {"double_quant": True}),
    ("quantize", "fp4", {}),
    ("quantize", "int8", {}),
    ("quantize", "rtn-int8", {}),
    ("quantize", "rtn-int4", {}),
    ("quantize", "rtn-int4", {"group_size": 64}),
    ("factorize", "svd", {"energy": 0.9, "scope": ["model.layers.*.mlp.*"]}),
    ("factorize", "svd-whitened", {"energy": 0.9, "scope": ["model.layers.*.mlp.*"], "whiten": True}),
    ("heal", "lora", {"after": "prune --method magnitude --sparsity 0.5"}),
    ("heal", "lora", {"after": "prune --method sparsegpt --sparsity 0.5"}),
]


def _reach(repo, commit: str) -> dict:
    """{object id: stored bytes} of everything *commit* reaches."""
    from mvc.graph import closure

    return {oid: len(repo.backend.get(bytes.fromhex(oid))) for oid in closure(repo.odb.get, [(commit, "commit")])}


def _added(repo, base: str, head: str) -> int:
    """Stored bytes that *head* reaches and *base* does not: what the step adds to a store that
    holds the base model (independent of the other rows)."""
    old = _reach(repo, base)
    return sum(n for oid, n in _reach(repo, head).items() if oid not in old)


def run() -> list[dict]:
    from mvc.compress import factorize, heal, prune, quantize, shed
    from mvc.compress.demo_model import init_demo
    from mvc.compress.evaluate import evaluate, make_spec
    from mvc.compress.runner import StepOptions

    os.environ.setdefault("MVC_AUTHOR", "mvc bench <bench@localhost>")
    work = tempfile.mkdtemp(prefix="mvc-bench-compress-")
    try:
        repo = init_demo(os.path.join(work, "repo"))
        repo.cwd = repo.root
        spec = make_spec(repo)
        base = repo.refs.head_commit()
        out = [{"step": "demo model (bf16)", "ppl": evaluate(repo, base, spec)["ppl"], "seconds": 0.0,
                "added_bytes": sum(_reach(repo, base).values())}]
        for op, method, params in ROWS:
            start = base
            t = time.perf_counter()
            opts = StepOptions(spec, max_drop=float("inf"))
            if op == "prune":
                res = prune.run(repo, opts, method, params.get("sparsity", 0.0), pattern=params.get("pattern"),
                                clusters=params.get("clusters", 0))
            elif op == "shed":
                res = shed.run(repo, opts, neurons=params.get("neurons", 0.0), heads=params.get("heads", 0.0),
                               method=method)
            elif op == "quantize":
                res = quantize.run(repo, opts, method, group_size=params.get("group_size", 0),
                                   double_quant=params.get("double_quant", False))
            elif op == "factorize":
                res = factorize.run(repo, opts, energy=params["energy"], scope=params["scope"],
                                    whiten=params.get("whiten", False))
            else:  # heal after a prune
                pm = params["after"].split()[2]
                start = prune.run(repo, opts, pm, 0.5).head
                t = time.perf_counter()
                res = heal.run(repo, opts)
            seconds = time.perf_counter() - t
            flag = {"prune": "--method", "shed": "--score", "quantize": "--method"}.get(op)
            desc = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in params.items()
                            if k not in ("scope", "after", "whiten", "double_quant"))
            desc += " --double-quant" if params.get("double_quant") else ""
            desc += " --whiten" if params.get("whiten") else ""
            desc += " --scope 'model.layers.*.mlp.*'" if params.get("scope") else ""
            name = f"{op} {flag} {method} {desc}" if flag else f"{op} {desc}"
            if op == "heal":
                name = f"heal (after {params['after']})"
            out.append({"step": name.strip(), "ppl": res.waves[-1].metrics["ppl"], "seconds": seconds,
                        "added_bytes": _added(repo, start, res.head)})
            repo.reset(base, hard=True)
        out.append(_bird_bone(repo, base))
        repo.close()
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _bird_bone(repo, base) -> dict:
    """mvc/compress/recipes/bird-bone.yaml end to end, as `mvc compress run` runs it."""
    from mvc.compress import recipe

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "bird-bone.yaml")
    t = time.perf_counter()
    rows, finished = recipe.run(repo, recipe.load(path))
    seconds = time.perf_counter() - t
    size = rows[-1].size
    return {"step": f"recipe bird-bone, all its commits ({'finished' if finished else 'stopped'}; weights "
                    f"{size / 2**20:.2f} MiB)", "ppl": rows[-1].metrics["ppl"], "seconds": seconds,
            "added_bytes": _added(repo, base, repo.refs.head_commit())}


def report(rows: list[dict]) -> str:
    base = rows[0]["ppl"]
    lines = ["| step (`mvc compress ...`) | perplexity | change | time | store bytes added |",
             "|---|---|---|---|---|"]
    for r in rows:
        change = "" if r is rows[0] else f"{(r['ppl'] - base) / base:+.1%}"
        lines.append(f"| {r['step']} | {r['ppl']:.2f} | {change} | {r['seconds']:.1f} s | "
                     f"{r['added_bytes'] / 1024:.0f} KiB |")
    return "\n".join(lines)
