"""Shedding: structured removal of the least important MLP neurons and attention head groups.

Matrices shrink consistently (a neuron's rows of gate/up and its column of down; a head group's
rows of q/k/v and columns of o) and the config follows. transformers' configs hold one MLP width
and one head count for all layers, so every layer sheds the same number of units; which units
go is decided per layer by their scores. Safety: a layer always keeps at least ``min_keep``
units (and never loses all of them).
"""

from __future__ import annotations

import math

from ..errors import UsageError
from .score import head_geometry, layer_units, unit_scores


def check_fraction(what: str, f: float) -> float:
    if not 0 <= f < 1:
        raise UsageError(f"--{what} {f:g} is outside [0, 1)", hint="a fraction, for example 0.25")
    return f


def removable(count: int, fraction: float, min_keep: int) -> tuple[int, int]:
    """(units per layer, units to remove per layer) for shedding *fraction* of *count*, keeping
    at least max(1, min_keep)."""
    remove = math.floor(fraction * count + 1e-9)
    return count, max(0, min(remove, count - max(1, min_keep)))


def _slice_param(module, attr: str, axis: int, index) -> None:
    import torch

    p = getattr(module, attr, None)
    if p is None:
        return
    data = p.data.index_select(axis, index).contiguous()
    setattr(module, attr, torch.nn.Parameter(data, requires_grad=False))


def _shrink(li, axis_out: int, index) -> None:
    """Keep *index* along the (out, in) axis *axis_out* of li's weight (and bias, for rows)."""
    axis = (1 - axis_out) if li.conv1d else axis_out
    _slice_param(li.module, "weight", axis, index)
    if axis_out == 0:
        _slice_param(li.module, "bias", 0, index)


def apply(model, kind: str, remove: int, scores: dict) -> dict:
    """Remove *remove* units of *kind* from every layer in place; returns the new config and which
    units each layer lost: {"config": {...}, "removed": {layer: [unit indices]}}."""
    import torch

    cfg = dict(model.src.config)
    removed = {}
    if remove == 0:
        return {"config": cfg, "removed": removed}
    by_name = {li.name: li for li in model.linears()}
    for layer in range(model.num_layers()):
        units = layer_units(model, layer, kind)
        order = torch.argsort(unit_scores(units, scores), stable=True)
        gone = sorted(order[:remove].tolist())
        keep_units = torch.tensor(sorted(order[remove:].tolist()), dtype=torch.long)
        removed[layer] = gone
        for name, axis, size, offset in units.spans:
            idx = (keep_units[:, None] * size + torch.arange(size)[None, :]).reshape(-1) + offset
            li = by_name[name]
            if offset or any(s[0] == name and s[3] for s in units.spans):  # GPT-2's fused q/k/v
                raise UsageError("shedding heads of a fused q/k/v projection is not supported")
            _shrink(li, axis, idx)
    if kind == "neuron":
        key = model.src.arch.inter_key
        cfg[key] = layer_units(model, 0, "neuron").count
    else:
        heads, kv, hd = head_geometry(cfg)
        group = heads // kv
        cfg["num_key_value_heads"] = kv - remove
        cfg["num_attention_heads"] = (kv - remove) * group
        cfg["head_dim"] = hd
    return {"config": cfg, "removed": {str(k): v for k, v in removed.items()}}
