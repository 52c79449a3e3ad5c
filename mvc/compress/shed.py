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
from . import score as score_mod
from .calib import make_calib
from .model import Model, linear_names, open_source
from .runner import Change, Outcome, StepOptions, calib_desc, waves_of
from .runner import run as run_step
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


def plan(repo, rev: str, neurons: float, heads: float, min_keep: int, model_dir: str = "") -> dict:
    """What shedding would remove, per layer, from the metadata alone (no weights read)."""
    src = open_source(repo, rev, model_dir)
    out = {"layers": 0, "neurons": None, "heads": None}
    names = linear_names(src)
    out["layers"] = max(layer for _n, _r, layer in names) + 1
    if neurons:
        check_fraction("neurons", neurons)
        up = next(n for n, r, layer in names if r == "up" and layer == 0)
        shape = src.tensor_meta(up).shape
        width = shape[1] if src.arch.conv1d else shape[0]
        out["neurons"] = removable(width, neurons, min_keep)
    if heads:
        check_fraction("heads", heads)
        if not src.arch.heads_sheddable:
            raise UsageError(f"{src.arch.model_type} configs cannot express fewer heads; shed --neurons instead")
        h, kv, _hd = head_geometry(src.config)
        have, remove = removable(kv, heads, min_keep)
        hidden = src.config.get("hidden_size")
        group = h // kv
        ok = remove
        while ok > 0 and hidden % ((kv - ok) * group):  # transformers checks hidden % heads == 0
            ok -= 1
        if ok == 0 and remove > 0:
            valid = [r for r in range(1, kv) if not hidden % ((kv - r) * group)]
            raise UsageError(f"--heads {heads:g} would leave {(kv - remove) * group} heads, which a "
                             f"{src.arch.model_type} config with hidden size {hidden} cannot express",
                             hint=f"valid fractions: {', '.join(f'{r / kv:g}' for r in valid) or 'none'}")
        out["heads"] = (have, ok)
    return out


def run(repo, opts: StepOptions, neurons: float = 0.0, heads: float = 0.0, method: str = "wanda",
        min_keep: int = 1) -> Outcome:
    """Remove *neurons* / *heads* (fractions per layer), the least important by *method* first."""
    if not neurons and not heads:
        raise UsageError("nothing to shed", hint="pass --neurons FRACTION and/or --heads FRACTION")
    if min_keep < 1:
        raise UsageError("--min-keep must be at least 1: a layer never loses all its units")
    planned = plan(repo, "HEAD", neurons, heads, min_keep, opts.model_dir)
    cal = make_calib(repo, opts.calib) if score_mod.needs_calib(method) else None
    if method not in score_mod.METHODS:
        raise UsageError(f"unknown scoring method {method!r}", hint=f"choose one of {', '.join(score_mod.METHODS)}")
    done = {"neuron": 0, "head": 0}
    total = {"neuron": planned["neurons"][1] if planned["neurons"] else 0,
             "head": planned["heads"][1] if planned["heads"] else 0}
    params = {"neurons": neurons or None, "heads": heads or None, "score": method, "min_keep": min_keep,
              "calib": calib_desc(cal)}
    params = {k: v for k, v in params.items() if v is not None}

    def apply_wave(model: Model, strength: float, scratch: str):
        extra, counts = {"removed": {}}, {}
        for kind in ("neuron", "head"):
            want = math.floor(total[kind] * strength + 1e-9)
            remove = want - done[kind]
            if remove <= 0:
                continue
            lin = model.linears()
            before = {li.name: li.weight().numel() for li in lin}
            scores = score_mod.element_scores(repo, model, lin, method, cal)
            res = apply(model, kind, remove, scores)
            model.src.config = res["config"]
            extra["removed"][kind + "s"] = res["removed"]
            done[kind] = want
            for li in model.linears():
                counts[li.name] = (before[li.name] - li.weight().numel() + counts.get(li.name, (0, 0))[0],
                                   before[li.name])
        return Change(counts, extra, dict(model.src.config))

    strengths = waves_of(1.0, opts.waves)
    return run_step(repo, opts, op="shed", method=method, params=params, strengths=strengths, apply=apply_wave)
