"""What `mvc report` shows, as plain data: the commits of a range with their op records, metrics,
sizes and store bytes; per-layer statistics of the model's matrices; waves; scores.

Nothing here draws: html.py turns this data into charts and tables, and `mvc report --json`
prints it as it is.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field

from ..errors import UsageError
from ..progress import NULL, Progress

#: a decoder layer's index in a tensor name: model.layers.3.…, transformer.h.3.…, encoder.layer.3.…
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.(.+)$")
#: the part of a matrix's name (after its layer) -> its role, in the order the heatmaps show them
_ROLES = (
    ("self_attn.q_proj", "q"), ("self_attn.k_proj", "k"), ("self_attn.v_proj", "v"),
    ("attention.self.query", "q"), ("attention.self.key", "k"), ("attention.self.value", "v"),
    ("attn.c_attn", "qkv"), ("self_attn.o_proj", "o"), ("attention.output.dense", "o"), ("attn.c_proj", "o"),
    ("mlp.gate_proj", "gate"), ("mlp.up_proj", "up"), ("intermediate.dense", "up"), ("mlp.c_fc", "up"),
    ("mlp.down_proj", "down"), ("output.dense", "down"), ("mlp.c_proj", "down"),
)
ROLE_ORDER = ("q", "k", "v", "qkv", "o", "gate", "up", "down")
#: auxiliary tensors of a quantized matrix X: (suffix, method)
_AUX = ((".weight.quant_state.bitsandbytes__nf4", "nf4"), (".weight.quant_state.bitsandbytes__fp4", "fp4"),
        (".weight.absmax", None), (".weight.quant_map", None), (".weight.nested_absmax", None),
        (".weight.nested_quant_map", None), (".weight.quant_state", None), (".SCB", "int8"),
        (".weight_format", None), (".weight.scales", None))
_BITS = {"BOOL": 1, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "U16": 16, "I16": 16,
         "F16": 16, "BF16": 16, "U32": 32, "I32": 32, "F32": 32, "U64": 64, "I64": 64, "F64": 64, "C64": 64}
MAX_SCORES_BYTES = 64 << 20
PACKED = ("nf4", "fp4", "rtn-int4")  # values packed below a byte: no elements to count or compare


def layer_role(name: str) -> tuple[int, str] | None:
    """(layer, role) of a decoder matrix's weight name; None for anything else (norms, embeddings)."""
    if name.endswith(".weight.qweight"):
        name = name[:-len(".qweight")]
    if not name.endswith(".weight"):
        return None
    m = _LAYER.search(name[:-len(".weight")])
    if m is None:
        return None
    rest = m.group(2)
    role = next((r for key, r in _ROLES if rest == key or rest.endswith("." + key)), None)
    return (int(m.group(1)), role) if role else None


@dataclass
class Matrix:
    """One decoder matrix of a tree, however it is stored."""

    name: str  # its weight's name (X.weight)
    layer: int
    role: str
    tensor: str  # id of the tensor holding its values (X.weight or X.weight.qweight)
    dtype: str
    shape: list
    bits: float  # bits per stored element of its values
    method: str  # "bf16", "nf4", "rtn-int8", …


@dataclass
class CommitInfo:
    id: str
    message: str
    time: int
    parents: list
    op: dict | None
    status: str  # "history" | "attempt"
    ref: str | None = None  # refs/attempts/… for a rejected attempt
    metric: float | None = None
    weights_bytes: int = 0
    store: dict = field(default_factory=dict)  # mvc.graph.added_by


@dataclass
class Report:
    range: str
    head: str | None
    metric: str  # "ppl" or "score"
    commits: list  # CommitInfo, oldest first (attempts after the commit they branched from)
    layers: dict = field(default_factory=dict)
    waves: list = field(default_factory=list)
    storage: dict = field(default_factory=dict)
    scores: dict | None = None
    clusters: dict | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        return d


# -- commits -------------------------------------------------------------------
def commit_range(repo, spec: str | None) -> list[str]:
    """The commits of *spec*, oldest first: REV (its history; default HEAD) or A..B (B's history
    without A's)."""
    spec = spec or "HEAD"
    if ".." in spec:
        a, _, b = spec.partition("..")
        exclude = repo.ancestors(repo.resolve(a or "HEAD"))
        return [e.oid for e in reversed(repo.log(b or "HEAD")) if e.oid not in exclude]
    return [e.oid for e in reversed(repo.log(spec))]


def _attempts(repo, commits: set[str]) -> list[tuple[str, str]]:
    """(ref, commit) of every rejected attempt (refs/attempts/…) whose parent is in *commits*."""
    from ..state import ATTEMPTS

    out = []
    for ref, oid in sorted(repo.backend.list_refs(ATTEMPTS).items(), key=lambda kv: _natural(kv[0])):
        c = repo.commit_obj(oid)
        if c.parents and c.parents[0] in commits:
            out.append((ref, oid))
    return out


def clean_op(op) -> dict | None:
    """An op record as the report reads it: records come from other repositories too, so every
    field it uses is given its type (a wrong one becomes empty); the rest is kept as it is."""
    if not isinstance(op, dict):
        return None
    d = dict(op)
    for key in ("op", "method"):
        if not isinstance(d.get(key), str):
            d[key] = None
    for key in ("params", "metrics", "guard"):
        if not isinstance(d.get(key), dict):
            d[key] = {}
    d["metrics"] = {**d["metrics"], **{k: v if isinstance(v := d["metrics"].get(k), dict) else {}
                                       for k in ("before", "after")}}
    return d


def _natural(s: str):
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", s)]


def _metric_name(ops: list[dict]) -> str:
    for op in ops:
        after = (op.get("metrics") or {}).get("after") or {}
        if "ppl" in after:
            return "ppl"
        if "score" in after:
            return "score"
    return "ppl"


def _number(v) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


def file_bytes(repo, tree_id: str, suffix: str = "") -> int:
    """Bytes of the tree's files (only those ending in *suffix*)."""
    tree = repo.odb.get(tree_id, "tree")
    return sum(repo.odb.get(e.oid, "file").size for e in tree.entries if e.path.endswith(suffix))


def collect_commits(repo, spec: str | None) -> tuple[list[CommitInfo], str]:
    from ..graph import added_by

    ids = commit_range(repo, spec)
    if not ids:
        raise UsageError(f"no commits in {spec or 'HEAD'}", hint="commit something first, or name another range")
    infos: list[CommitInfo] = []
    order = [(oid, "history", None) for oid in ids]
    for ref, oid in _attempts(repo, set(ids)):
        order.append((oid, "attempt", ref))
    for oid, status, ref in order:
        c = repo.commit_obj(oid)
        op = clean_op(c.op)
        infos.append(CommitInfo(oid, c.message, c.time, list(c.parents), op, status, ref,
                                weights_bytes=file_bytes(repo, c.tree, ".safetensors"), store=added_by(repo, oid)))
    metric = _metric_name([i.op for i in infos if i.op])
    by_id = {i.id: i for i in infos}
    for i in infos:
        if i.op:
            i.metric = _number(((i.op.get("metrics") or {}).get("after") or {}).get(metric))
    for i in infos:  # a step's starting point: its first wave's "before"
        if i.op and i.parents and i.parents[0] in by_id and by_id[i.parents[0]].metric is None:
            by_id[i.parents[0]].metric = _number(((i.op.get("metrics") or {}).get("before") or {}).get(metric))
    # attempts right after the commit they branched from, so tables read in order
    history = [i for i in infos if i.status == "history"]
    for a in (i for i in infos if i.status == "attempt"):
        at = next(k for k, h in enumerate(history) if h.id == a.parents[0])
        while at + 1 < len(history) and history[at + 1].status == "attempt":
            at += 1
        history.insert(at + 1, a)
    return history, metric


# -- waves ---------------------------------------------------------------------
def waves(commits: list[CommitInfo], metric: str) -> list[dict]:
    """Each multi-wave step: its waves in order (rejected last), metric, drop against the step's
    start, and the spike z-score of each wave as the runner computes it."""
    from ..guard import spike

    steps: list[dict] = []
    by_id = {c.id: c for c in commits}
    for c in commits:
        op = c.op or {}
        wave = (op.get("params") or {}).get("wave")
        if not (isinstance(wave, list) and len(wave) == 2 and all(isinstance(x, int) for x in wave)):
            continue
        k, n = wave
        parent = by_id.get(c.parents[0]) if c.parents else None
        prev_wave = ((parent.op or {}).get("params") or {}).get("wave") if parent else None
        if k == 1 or not steps or not (isinstance(prev_wave, list) and prev_wave[0] == k - 1):
            before = _number(((op.get("metrics") or {}).get("before") or {}).get(metric))
            guard = op.get("guard") or {}
            steps.append({"op": op.get("op"), "method": op.get("method"), "of": n,
                          "start": c.parents[0] if c.parents else None, "before": before,
                          "max_drop": _number(guard.get("max_drop")), "spike_z": _number(guard.get("spike_z")),
                          "waves": []})
        step = steps[-1]
        step["waves"].append({"commit": c.id, "wave": k, "status": c.status, "metric": c.metric,
                              "strength": _number((op.get("params") or {}).get("strength"))})
    for step in steps:
        values = [step["before"]]
        for w in step["waves"]:
            values.append(w["metric"])
            ok = all(v is not None for v in values)
            w["drop"] = (w["metric"] - step["before"]) / step["before"] if ok and step["before"] else None
            w["z"] = spike(values, 1.0) if ok else None  # z_max only switches the rule on
    return steps


# -- per-layer statistics ----------------------------------------------------------
def matrices(repo, tree_id: str) -> dict[str, Matrix]:
    """The decoder matrices of a tree by weight name (first file wins on a duplicate name)."""
    tree = repo.odb.get(tree_id, "tree")
    names: dict[str, str] = {}
    for e in tree.entries:
        if e.path.endswith(".safetensors"):
            for name, tid in repo.odb.get(e.oid, "file").tensors:
                names.setdefault(name, tid)
    out: dict[str, Matrix] = {}
    ids = list(names.values())
    tensors = dict(zip(ids, repo.odb.get_many(ids, "tensor")))
    for name, tid in names.items():
        lr = layer_role(name)
        if lr is None:
            continue
        weight = name[:-len(".qweight")] if name.endswith(".qweight") else name
        t = tensors[tid]
        bits, method = float(_BITS.get(t.dtype, 0)), t.dtype.lower()
        base = weight[:-len(".weight")]
        if name.endswith(".qweight"):
            method, bits = ("rtn-int4", 4.0) if t.dtype == "U8" else ("rtn-int8", 8.0)
        else:
            for suffix, m in _AUX:
                if m and (base + suffix in names):
                    method = m
                    bits = 4.0 if m in ("nf4", "fp4") else 8.0
                    break
        out[weight] = Matrix(weight, lr[0], lr[1], tid, t.dtype, list(t.shape), bits, method)
    return out


def _columns(keys) -> list[str]:
    roles = sorted({r for _, r in keys}, key=lambda r: (ROLE_ORDER.index(r) if r in ROLE_ORDER else 99, r))
    return roles


class LayerStats:
    """Per-tensor statistics, each tensor read once (tensors shared by commits are not read again)."""

    def __init__(self, repo, progress: Progress = NULL, read: bool = True):
        from ..pipeline import Materializer

        self.repo = repo
        self.progress = progress
        #: False: nothing that needs a tensor's values (sparsity, elements changed, L2) is measured
        self.read = read
        self._mat = Materializer(repo.odb)
        self._sparsity: dict[str, float | None] = {}
        self._matrices: dict[str, dict[str, Matrix]] = {}
        self._pairs: dict[tuple[str, str], dict] = {}

    def close(self):
        self._mat.close()

    def matrices(self, tree_id: str) -> dict[str, Matrix]:
        """matrices() of a tree, each tree read once (the range, its steps and their parents share trees)."""
        if tree_id not in self._matrices:
            self._matrices[tree_id] = matrices(self.repo, tree_id)
        return self._matrices[tree_id]

    def _read(self, chunks):
        return self._mat.chunks(chunks)

    def sparsity(self, m: Matrix) -> float | None:
        """Fraction of zero elements; None for packed low-bit values (no elements to count)."""
        if m.method in PACKED or not self.read:
            return None
        if m.tensor not in self._sparsity:
            from ..diff.stats import _one_side

            t = self.repo.odb.get(m.tensor, "tensor")
            self._sparsity[m.tensor] = _one_side(t.dtype, self._read(t.chunks))["sparsity"]
            self.progress.advance(nbytes=t.nbytes, tensors=1)
        return self._sparsity[m.tensor]

    def change(self, old: Matrix | None, new: Matrix | None) -> dict:
        """{"changed": fraction of elements changed, "rel_l2": |new - old| / |old|, "note"}."""
        if old is None or new is None:
            return {"changed": 1.0, "rel_l2": None, "note": "added" if old is None else "removed"}
        if old.tensor == new.tensor:
            return {"changed": 0.0, "rel_l2": 0.0, "note": ""}
        a = self.repo.odb.get(old.tensor, "tensor")
        b = self.repo.odb.get(new.tensor, "tensor")
        if (a.dtype, a.shape, a.chunk_size) != (b.dtype, b.shape, b.chunk_size):
            note = "re-encoded" if a.dtype != b.dtype or old.method != new.method else "reshaped"
            return {"changed": 1.0, "rel_l2": None, "note": note}
        if not self.read:
            return {"changed": None, "rel_l2": None, "note": ""}
        key = (old.tensor, new.tensor)
        if key not in self._pairs:
            from ..diff.stats import tensor_stats

            s = tensor_stats(self._read, a, b)
            self.progress.advance(nbytes=a.nbytes + b.nbytes, tensors=2)
            self._pairs[key] = {"changed": s["changed_fraction"], "rel_l2": s["rel_l2_delta"], "note": ""}
        return self._pairs[key]


def grid(ms: dict[str, Matrix], value) -> dict:
    """A heatmap's data: layers (rows), roles (columns), values[row][col] (None: no such matrix)."""
    layers = sorted({m.layer for m in ms.values()})
    roles = _columns((m.layer, m.role) for m in ms.values())
    cell = {(m.layer, m.role): m for m in ms.values()}
    values = [[value(cell[(li, r)]) if (li, r) in cell else None for r in roles] for li in layers]
    return {"layers": layers, "roles": roles, "values": values}


def layer_heatmaps(stats: LayerStats, new_tree: str, old_tree: str | None = None,
                   sparsity_tree: str | None = None) -> dict:
    """Per layer x role: bits and method of *new_tree*'s matrices, sparsity of *sparsity_tree*'s
    (default the same), and for the change *old_tree* -> *new_tree* the fraction of elements
    changed and the relative L2 of the change."""
    new = stats.matrices(new_tree)
    out = {
        "bits": grid(new, lambda m: m.bits),
        "method": grid(new, lambda m: m.method),
        "sparsity": grid(stats.matrices(sparsity_tree) if sparsity_tree else new, stats.sparsity),
    }
    if old_tree:
        old = stats.matrices(old_tree)
        change = {m.name: stats.change(old.get(m.name), m) for m in new.values()}
        for key in ("changed", "rel_l2", "note"):
            out[key] = grid(new, lambda m, key=key: change[m.name][key])
    return out


def _comparable(a: dict[str, Matrix], b: dict[str, Matrix]) -> bool:
    """Whether every matrix of *b* is stored as in *a* (same dtype and method; a shape may differ,
    a shed one: its cells say "reshaped")."""
    return all(m.name in a and (a[m.name].dtype, a[m.name].method) == (m.dtype, m.method) for m in b.values())


def range_layers(repo, stats: LayerStats, history: list[CommitInfo]) -> dict:
    """The heatmaps of a range: the head's matrices; sparsity at the newest commit whose values are
    not packed; the change from the range's first commit to the newest commit whose matrices
    compare with it element by element (a quantized head does not)."""
    trees = [(c.id, repo.commit_obj(c.id).tree) for c in history]
    ms = {cid: stats.matrices(t) for cid, t in trees}
    head, head_tree = trees[-1]
    at_sparsity = next(((cid, t) for cid, t in reversed(trees)
                        if ms[cid] and not any(m.method in PACKED for m in ms[cid].values())), (head, head_tree))
    first, first_tree = trees[0]
    to = next(((cid, t) for cid, t in reversed(trees[1:]) if _comparable(ms[first], ms[cid])), None)
    out = {"at": head, "sparsity_at": at_sparsity[0], "from": None, "to": None,
           "range": layer_heatmaps(stats, head_tree, None, at_sparsity[1])}
    if to is not None:
        change = layer_heatmaps(stats, to[1], first_tree)
        out["range"].update({k: change[k] for k in ("changed", "rel_l2", "note")})
        out["from"], out["to"] = first, to[0]
    return out


def _matrix_order(m: Matrix):
    return m.layer, ROLE_ORDER.index(m.role) if m.role in ROLE_ORDER else 99, m.role


def step_matrix(repo, stats: LayerStats, commits: list[CommitInfo]) -> dict:
    """For each op commit (rows), what it changed in each matrix (columns: layer.role) against
    its first parent: the fraction of elements, and the relative L2 of the change."""
    rows, columns = [], []
    col_index: dict[str, int] = {}
    per_row = []
    for c in commits:
        if not c.op or not c.parents:
            continue
        new = stats.matrices(repo.commit_obj(c.id).tree)
        old = stats.matrices(repo.commit_obj(c.parents[0]).tree)
        row = {}
        for m in sorted(new.values(), key=_matrix_order):
            key = f"{m.layer}.{m.role}"
            if key not in col_index:
                col_index[key] = len(columns)
                columns.append(key)
            row[key] = stats.change(old.get(m.name), m)
        rows.append({"commit": c.id, "label": f"{c.id[:8]} {c.op.get('op', '?')}", "status": c.status})
        per_row.append(row)
    return {"rows": rows, "columns": columns,
            "changed": [[r[k]["changed"] if k in r else None for k in columns] for r in per_row],
            "rel_l2": [[r[k]["rel_l2"] if k in r else None for k in columns] for r in per_row]}


# -- storage -------------------------------------------------------------------------
def storage(repo, commits: list[CommitInfo], head_tree: str, top: int = 40) -> dict:
    """Per commit: stored bytes added, raw bytes of its new chunks, the tree's tensor bytes (what
    dedup kept from being stored again). Per tensor of the head: raw and stored bytes."""
    per_commit = []
    for c in commits:
        tree_raw = file_bytes(repo, repo.commit_obj(c.id).tree)
        per_commit.append({"commit": c.id, "status": c.status, "stored": c.store.get("stored", 0),
                           "raw_new": c.store.get("raw", 0), "tree_raw": tree_raw,
                           "encodings": c.store.get("encodings", {})})
    tensors = []
    tree = repo.odb.get(head_tree, "tree")
    for e in tree.entries:
        if not e.path.endswith(".safetensors"):
            continue
        f = repo.odb.get(e.oid, "file")
        ids = [tid for _, tid in f.tensors]
        for (name, _), t in zip(f.tensors, repo.odb.get_many(ids, "tensor")):
            stored = sum(repo.backend.stored_size(bytes.fromhex(ch)) or 0 for ch in t.chunks)
            tensors.append({"path": e.path, "name": name, "raw": t.nbytes, "stored": stored, "dtype": t.dtype})
    tensors.sort(key=lambda x: -x["raw"])
    return {"commits": per_commit, "tensors": tensors[:top], "tensor_count": len(tensors),
            "store": repo.backend.stats()}


# -- scores --------------------------------------------------------------------------
def read_scores(path: str) -> dict:
    """A report written by `mvc compress score -o FILE.json`, checked: per layer, the neuron and
    head scores (lists of numbers)."""
    try:
        size = os.path.getsize(path)
        if size > MAX_SCORES_BYTES:
            raise UsageError(f"{path}: {size} bytes is over the {MAX_SCORES_BYTES}-byte limit of a scores file")
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from e
    except (ValueError, RecursionError) as e:
        raise UsageError(f"{path} is not JSON ({str(e)[:80]})",
                         hint="pass the .json report of `mvc compress score -o FILE.json`") from e
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, list):
        raise UsageError(f"{path} has no \"layers\" list",
                         hint="pass the .json report of `mvc compress score -o FILE.json`")
    out = []
    for row in layers:
        if not (isinstance(row, dict) and type(row.get("layer")) is int):
            raise UsageError(f"{path}: a layer entry without an integer \"layer\"")
        item = {"layer": row["layer"], "mean": _number(row.get("mean"))}
        for kind in ("neurons", "heads"):
            v = row.get(kind, [])
            if not (isinstance(v, list) and all(_number(x) is not None for x in v)):
                raise UsageError(f"{path}: layer {row['layer']}: {kind} must be a list of numbers")
            item[kind] = [float(x) for x in v]
        out.append(item)
    method = data.get("method") if isinstance(data.get("method"), str) else "?"
    rev = data.get("rev") if isinstance(data.get("rev"), str) else None
    return {"method": method[:40], "rev": rev[:64] if rev else None, "layers": out}


def clusters(commits: list[CommitInfo]) -> dict | None:
    """The clusters of the newest cluster-adaptive prune in *commits* (its op record's
    ``params.cluster_detail``), per matrix; None when there is none. Malformed entries are skipped."""
    for c in reversed(commits):
        detail = ((c.op or {}).get("params") or {}).get("cluster_detail")
        if not isinstance(detail, dict):
            continue
        out = []
        for name, d in sorted(detail.items()):
            lr = layer_role(name) if isinstance(name, str) else None
            if lr is None or not isinstance(d, dict):
                continue
            rows, mean, cut = d.get("rows"), d.get("mean_score"), d.get("threshold")
            if not (isinstance(rows, list) and isinstance(mean, list) and isinstance(cut, list)
                    and len(rows) == len(mean) == len(cut) and all(type(r) is int and r >= 0 for r in rows)):
                continue
            out.append({"name": name, "layer": lr[0], "role": lr[1], "rows": rows,
                        "mean_score": [_number(x) for x in mean], "threshold": [_number(x) for x in cut]})
        if out:
            out.sort(key=lambda m: (m["layer"], ROLE_ORDER.index(m["role"]) if m["role"] in ROLE_ORDER else 99))
            return {"commit": c.id, "k": max(len(m["rows"]) for m in out), "matrices": out}
    return None


# -- all together ----------------------------------------------------------------------
def build(repo, spec: str | None = None, scores: str | None = None, layers: bool = True,
          progress: Progress = NULL, read_tensors: bool = True) -> Report:
    """The report's data. Per-layer statistics read the tensors they compare (each once; with
    *read_tensors* False, none: bits and methods only); the rest is metadata."""
    commits, metric = collect_commits(repo, spec)
    history = [c for c in commits if c.status == "history"]
    head = history[-1].id
    rep = Report(spec or "HEAD", head, metric, commits)
    rep.waves = waves(commits, metric)
    head_tree = repo.commit_obj(head).tree
    rep.storage = storage(repo, commits, head_tree)
    if scores:
        rep.scores = read_scores(scores)
    rep.clusters = clusters([c for c in commits if c.status == "history"])
    if layers:
        stats = LayerStats(repo, progress, read_tensors)
        progress.start("reading tensors", 0)
        try:
            rep.layers = range_layers(repo, stats, history)
            rep.layers["steps"] = step_matrix(repo, stats, commits)
        finally:
            progress.finish()
            stats.close()
    return rep


def build_diff(repo, a: str, b: str, progress: Progress = NULL) -> dict:
    """The heatmaps of one change A -> B (mvc diff A B --html)."""
    stats = LayerStats(repo, progress)
    try:
        ca, cb = repo.resolve(a), repo.resolve(b)
        ta, tb = repo.commit_obj(ca).tree, repo.commit_obj(cb).tree
        # the sparsity of B, or of A where B's values are packed (a quantizing step)
        packed = any(m.method in PACKED for m in stats.matrices(tb).values())
        sp, sp_tree = (ca, ta) if packed else (cb, tb)
        return {"at": cb, "sparsity_at": sp, "from": ca, "to": cb,
                "range": layer_heatmaps(stats, tb, ta, sp_tree)}
    finally:
        stats.close()
