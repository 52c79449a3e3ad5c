"""Importance scores: per element (magnitude, Taylor, Fisher, Wanda), per structure (MLP neuron,
attention head or KV group), and a layer-wise summary.

    magnitude  s_ij = |W_ij|
    taylor     s_ij = |W_ij * dL/dW_ij|              (first-order Taylor, gradient summed over batches)
    fisher     s_ij = 1/2 * W_ij^2 * sum_b g_ij,b^2   (diagonal empirical Fisher, OBD saliency)
    wanda      s_ij = |W_ij| * ||X_j||_2              (X_j: column j of the layer's calibration inputs)

A structure's score is the sum of its elements' scores over every matrix it spans (a neuron:
its rows of gate/up and its column of down; a head group: its rows of q/k/v and columns of o).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UsageError
from .calib import collect_grads, collect_inputs, make_calib, windows
from .model import Model, open_source

METHODS = ("magnitude", "taylor", "fisher", "wanda")


def needs_calib(method: str) -> bool:
    return method != "magnitude"


def element_scores(repo, model, linears, method: str, calib=None) -> dict:
    """{tensor name: (out, in) float32 scores} for *linears* under *method*."""
    if method not in METHODS:
        raise UsageError(f"unknown scoring method {method!r}", hint=f"choose one of {', '.join(METHODS)}")
    if method == "magnitude":
        return {li.name: li.weight().abs().float() for li in linears}
    batches = windows(repo, model, calib)
    if method == "wanda":
        stats = collect_inputs(model, linears, batches)
        return {li.name: li.weight().abs() * stats[li.name].sq.sqrt().float()[None, :] for li in linears}
    g_sum, g_sq = collect_grads(model, linears, batches)
    if method == "taylor":
        return {li.name: (li.weight() * g_sum[li.name]).abs() for li in linears}
    return {li.name: 0.5 * li.weight() ** 2 * g_sq[li.name] for li in linears}


@dataclass
class Units:
    """How many sheddable units a layer has, and which rows/columns of which matrices each spans."""

    kind: str  # "neuron" | "head"
    count: int
    spans: list = field(default_factory=list)  # (tensor name, axis 0=row 1=col, unit size, offset)


def head_geometry(cfg: dict) -> tuple[int, int, int]:
    """(query heads, key/value heads, head_dim) from a config."""
    heads = cfg.get("num_attention_heads") or cfg.get("n_head")
    kv = cfg.get("num_key_value_heads") or heads
    hidden = cfg.get("hidden_size") or cfg.get("n_embd")
    return heads, kv, cfg.get("head_dim") or hidden // heads


def layer_units(model, layer: int, kind: str) -> Units:
    by_role = {li.role: li for li in model.linears() if li.layer == layer}
    if kind == "neuron":
        up = by_role["up"]
        width = up.weight().shape[0]
        spans = [(li.name, 0, 1, 0) for r, li in by_role.items() if r in ("up", "gate")]
        spans.append((by_role["down"].name, 1, 1, 0))
        return Units("neuron", width, spans)
    heads, kv, hd = head_geometry(model.src.config)
    group = heads // kv  # query heads per key/value head: the unit removed together
    if "qkv" in by_role:  # GPT-2: q, k, v stacked in one (3H, H) matrix
        name = by_role["qkv"].name
        h = heads * hd
        spans = [(name, 0, hd, 0), (name, 0, hd, h), (name, 0, hd, 2 * h)]
    else:
        spans = [(by_role["q"].name, 0, hd * group, 0), (by_role["k"].name, 0, hd, 0), (by_role["v"].name, 0, hd, 0)]
    spans.append((by_role["o"].name, 1, hd * group, 0))
    return Units("head", kv, spans)


def unit_scores(units: Units, scores: dict):
    """One score per unit: the sum of its elements' scores over every matrix it spans."""
    import torch

    total = torch.zeros(units.count, dtype=torch.float64)
    for name, axis, size, offset in units.spans:
        s = scores[name].double()
        s = s.sum(1) if axis == 0 else s.sum(0)  # per row, or per column
        total += s[offset:offset + units.count * size].view(units.count, size).sum(1)
    return total


def tensor_summary(name: str, s) -> dict:
    """A tensor's line of the report: shape, mean and (up to 16 M elements) quantiles."""
    flat = s.reshape(-1).double()
    q = flat.quantile(flat.new_tensor([0.1, 0.5, 0.9])) if flat.numel() <= 16_000_000 else None
    return {"name": name, "shape": list(s.shape), "mean": flat.mean().item(),
            "p10": q[0].item() if q is not None else None,
            "median": q[1].item() if q is not None else None,
            "p90": q[2].item() if q is not None else None}


def layer_summary(model, layer: int, linears, scores: dict, kinds=("neuron", "head")) -> dict:
    """A layer's line of the report: its mean score and each unit's (neurons, heads). *model*
    only lends shapes (its weights may be on the meta device)."""
    row: dict = {"layer": layer}
    names = [li.name for li in linears if li.layer == layer and li.name in scores]
    row["mean"] = sum(scores[n].double().mean().item() for n in names) / max(1, len(names))
    for kind in kinds:
        try:
            u = layer_units(model, layer, kind)
            if not all(sp[0] in scores for sp in u.spans):
                continue
        except KeyError:
            continue
        row[kind + "s"] = [round(v, 9) for v in unit_scores(u, scores).tolist()]
    return row


def summarize(model, scores: dict, kinds=("neuron", "head")) -> dict:
    """The report `mvc compress score` writes: per tensor, per layer, per structure."""
    out: dict = {"tensors": [tensor_summary(name, s) for name, s in scores.items()], "layers": []}
    linears = model.linears()
    for layer in sorted({li.layer for li in linears if li.layer >= 0}):
        out["layers"].append(layer_summary(model, layer, linears, scores, kinds))
    return out


def to_csv(report: dict) -> str:
    """One line per structure: kind, layer, index, score."""
    lines = ["kind,layer,index,score"]
    for row in report["layers"]:
        for kind in ("neuron", "head"):
            for i, v in enumerate(row.get(kind + "s", [])):
                lines.append(f"{kind},{row['layer']},{i},{v!r}")
    return "\n".join(lines) + "\n"


def run(repo, rev: str, method: str, calib: str | None = None, scope=None, model_dir: str = "",
        elements: bool = True, device: str | None = None, progress=None) -> tuple:
    """(report, element scores) for *rev* under *method* (nothing is written to the repository).
    Magnitude and Wanda scores of a causal model are made layer by layer from the store
    (layerwise.score: one decoder layer in memory, on *device*); they keep every element's score
    only when *elements* asks for them. Taylor and Fisher need the whole model's gradients."""
    from . import layerwise

    if method not in METHODS:
        raise UsageError(f"unknown scoring method {method!r}", hint=f"choose one of {', '.join(METHODS)}")
    cal = make_calib(repo, calib) if needs_calib(method) else None
    src = open_source(repo, rev, model_dir)
    if method in ("magnitude", "wanda") and src.arch.model_type in layerwise.TAIL:
        report, scores = layerwise.score(repo, src, method, cal, scope, elements, device, progress)
    else:
        model = Model(repo, src)
        scores = element_scores(repo, model, model.linears(scope), method, cal)
        report = summarize(model, scores)
    report["method"] = method
    report["rev"] = src.commit
    return report, scores
