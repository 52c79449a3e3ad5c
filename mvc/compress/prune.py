"""Unstructured and N:M pruning: magnitude, Wanda and SparseGPT.

Masks keep exact counts: a sparsity S over n candidates prunes floor(S*n) of them (per matrix
for magnitude, per output row for Wanda, per block of columns for SparseGPT, per group of M for
N:M). Calibration methods work one layer at a time, in order, so each layer sees the inputs
that the already-pruned layers before it produce; memory stays near one layer's statistics.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

from ..errors import UsageError
from .calib import LayerInputs, make_calib, windows
from .model import linear_names, open_source
from .runner import Change, Outcome, StepOptions, calib_desc, parse_assignments, waves_of
from .runner import run as run_step

METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass(frozen=True)
class Pattern:
    n: int
    m: int

    @classmethod
    def parse(cls, text: str | None) -> Pattern | None:
        if not text:
            return None
        mt = re.fullmatch(r"(\d+):(\d+)", text.strip())
        if not mt or not 0 < int(mt[1]) < int(mt[2]) <= 64:
            raise UsageError(f"--pattern {text!r} is not N:M with 0 < N < M <= 64", hint="for example 2:4")
        return cls(int(mt[1]), int(mt[2]))

    @property
    def sparsity(self) -> float:
        return 1 - self.n / self.m


def check_sparsity(s: float) -> float:
    if not 0 <= s < 1:
        raise UsageError(f"sparsity {s:g} is outside [0, 1)", hint="for example --sparsity 0.5 for 50 %")
    return s


def _smallest(scores, k: int, dim: int | None = None):
    """A bool mask of the k smallest scores (over everything, or along *dim*), exactly k each."""
    import torch

    mask = torch.zeros(scores.shape, dtype=torch.bool)
    if k <= 0:
        return mask
    if dim is None:
        idx = torch.topk(scores.reshape(-1), k, largest=False, sorted=False).indices
        mask.view(-1)[idx] = True
    else:
        idx = torch.topk(scores, k, dim=dim, largest=False, sorted=False).indices
        mask.scatter_(dim, idx, True)
    return mask


def nm_mask(scores, pattern: Pattern):
    """Prune the M-N smallest of every M consecutive inputs of each row."""
    rows, cols = scores.shape
    if cols % pattern.m:
        raise UsageError(f"a matrix with {cols} inputs cannot take the {pattern.n}:{pattern.m} pattern "
                         f"({cols} is not a multiple of {pattern.m})")
    g = scores.reshape(rows, cols // pattern.m, pattern.m)
    return _smallest(g, pattern.m - pattern.n, dim=2).reshape(rows, cols)


def kmeans_rows(features, k: int, seed: int, iters: int = 25):
    """Cluster rows of *features* (rows, f) into k groups; seeded, deterministic."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    x = (features - features.mean(0)) / features.std(0).clamp_min(1e-12)
    k = min(k, x.shape[0])
    centers = x[torch.randperm(x.shape[0], generator=gen)[:k]].clone()
    labels = torch.zeros(x.shape[0], dtype=torch.long)
    for _ in range(iters):
        labels = torch.cdist(x, centers).argmin(1)
        for c in range(k):
            sel = labels == c
            if sel.any():
                centers[c] = x[sel].mean(0)
    return labels


def _short(x: float | None) -> float | None:
    """6 significant digits for an op record (None for what JSON cannot hold)."""
    return float(f"{x:.6g}") if x is not None and math.isfinite(x) else None


def mask_for(scores, sparsity: float, per: str, pattern: Pattern | None = None, clusters: int = 0, seed: int = 0,
             info: dict | None = None):
    """Which elements to prune. *per*: "matrix" (one threshold) or "row" (one per output row);
    *clusters* > 0 clusters the rows by their score statistics and uses one threshold per cluster
    (then *info*, when given, receives per cluster, by mean score: its rows, mean score and the
    largest score it pruned)."""
    import torch

    if pattern is not None:
        return nm_mask(scores, pattern)
    rows, cols = scores.shape
    if clusters:
        feats = torch.stack([scores.mean(1), scores.std(1), scores.amax(1)], 1).double()
        labels = kmeans_rows(feats, clusters, seed)
        mask = torch.zeros(scores.shape, dtype=torch.bool)
        found = []
        for c in labels.unique().tolist():
            sel = labels == c
            sub = scores[sel]
            m = _smallest(sub, int(sparsity * sub.numel()))
            mask[sel] = m
            cut = float(sub[m].max()) if bool(m.any()) else None
            found.append((float(sub.double().mean()), int(sel.sum()), cut))
        if info is not None:
            found.sort()
            info.update({"rows": [r for _, r, _ in found], "mean_score": [_short(s) for s, _, _ in found],
                         "threshold": [_short(t) for _, _, t in found]})
        return mask
    if per == "row":
        return _smallest(scores, int(sparsity * cols), dim=1)
    return _smallest(scores, int(sparsity * scores.numel()))


def sparsegpt(weight, gram, n: int, sparsity: float, pattern: Pattern | None = None,
              block: int = 128, damp: float = 0.01, release: bool = False):
    """Prune *weight* (out, in) in place by SparseGPT: OBS updates with the upper Cholesky factor of
    the inverse calibration Hessian H = 2/n X^T X (+ damp * mean diag), block by block of columns.
    *gram*: X^T X, or the calib.InputStats holding it; with *release* (the last matrix reading
    it), the InputStats lets go of it as soon as H is made."""
    import torch

    # the algorithm works on float32 weights in place: the model's own, when they already are
    W = weight if weight.dtype == torch.float32 and weight.is_contiguous() else weight.float().contiguous().clone()
    # one float64 (in, in) matrix, factored and inverted in place: a 14k-wide MLP's is 1.5 GB, and
    # the 5632-wide one of a 0.8 B Llama held three at once before (H, the damping's identity, its
    # product). LAPACK works in place on column-major storage; H is symmetric, so its transpose
    # view is the same matrix in that order, and torch writes through out= without a copy.
    holder = None if torch.is_tensor(gram) else gram
    H = (gram if holder is None else holder.gram).double()
    if holder is not None and release:
        holder.gram = None
    H.mul_(2.0 / max(1, n))
    diag = H.diagonal()
    dead = diag == 0
    diag[dead] = 1
    W[:, dead] = 0
    diag.add_(damp * diag.mean())
    Ht = H.mT
    torch.linalg.cholesky(Ht, upper=True, out=Ht)  # H = U^T U
    torch.cholesky_inverse(Ht, upper=True, out=Ht)  # H^-1
    torch.linalg.cholesky(Ht, out=Ht)  # H^-1 = L L^T: H (row-major) holds L^T, the upper factor
    del Ht, diag
    rows, cols = W.shape
    mask_all = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        Hrows = H[i1:i2].float()  # the block's rows of the factor in float32, not a float32 copy of all of it
        Hi = Hrows[:, i1:i2]
        d = torch.diag(Hi)
        err = torch.zeros_like(W1)
        if pattern is None:
            mask1 = _smallest(W1 ** 2 / d[None, :] ** 2, int(sparsity * W1.numel()))
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if pattern is not None and i % pattern.m == 0:
                cand = W1[:, i:i + pattern.m] ** 2 / d[None, i:i + pattern.m] ** 2
                mask1[:, i:i + pattern.m] = _smallest(cand, pattern.m - pattern.n, dim=1)
            w = W1[:, i]
            q = w.clone()
            q[mask1[:, i]] = 0
            e = (w - q) / d[i]
            W1[:, i:] -= e[:, None] * Hi[i, i:][None, :]
            W1[:, i] = q
            err[:, i] = e
        W[:, i1:i2] = W1
        W[:, i2:] -= err @ Hrows[:, i2:]
        mask_all[:, i1:i2] = mask1
    W[mask_all] = 0
    if W is not weight:
        weight.copy_(W.to(weight.dtype))
    return mask_all


def apply_masks(repo, model, linears, method: str, sparsity_of, pattern: Pattern | None = None,
          clusters: int = 0, seed: int = 0, calib=None, progress=None, cluster_info: dict | None = None) -> dict:
    """Prune *linears* in place; returns {name: (pruned, total)}. *sparsity_of(name)* gives each
    matrix's target. Calibration methods go layer by layer, feeding pruned outputs forward.
    With *clusters*, *cluster_info* receives each matrix's clusters (mask_for's *info*)."""
    if method not in METHODS:
        raise UsageError(f"unknown pruning method {method!r}", hint=f"choose one of {', '.join(METHODS)}")
    counts = {}
    if method == "magnitude":
        groups = [linears]
        batches = None
    else:
        if any(li.role == "embedding" for li in linears):
            raise UsageError(f"embeddings can only be pruned by magnitude, not {method}")
        batches = windows(repo, model, calib)
        layers = sorted({li.layer for li in linears})
        groups = [[li for li in linears if li.layer == layer] for layer in layers]
    inputs = LayerInputs(model, batches) if batches is not None else None
    for group in groups:
        stats = inputs.stats(group, gram=method == "sparsegpt") if inputs is not None else {}
        for li in group:
            counts[li.name] = prune_matrix(li, method, stats, sparsity_of(li.name), pattern, clusters, seed,
                                           cluster_info)
            model.round_to_stored(li)
            if progress is not None:
                progress.advance(nbytes=li.weight().numel() * 4, tensors=1)  # float32 in memory
    return counts


def prune_matrix(li, method: str, stats: dict, s: float, pattern: Pattern | None, clusters: int, seed: int,
                 cluster_info: dict | None, last_use: bool = False) -> tuple[int, int]:
    """Prune one linear in place to sparsity *s* by *method* (*stats*: its layer's input
    statistics; *last_use*: no later matrix reads this one's, so SparseGPT may free its X^T X
    early); returns (pruned, total) elements."""
    w = li.weight()
    if method == "sparsegpt":
        st = stats[li.name]
        mask = sparsegpt(w, st, st.n, s, pattern, release=last_use)
    else:
        score = w.abs().float()
        if method == "wanda":
            score = score * stats[li.name].sq.sqrt().float()[None, :]
        info: dict = {}
        mask = mask_for(score, s, "row" if method == "wanda" else "matrix", pattern, clusters, seed, info)
        if info and cluster_info is not None:
            cluster_info[li.name] = info
        w[mask] = 0
    return int(mask.sum()), w.numel()


@dataclass
class PlanRow:
    tensor: str
    shape: tuple
    elements: int
    change: int  # elements pruned, or removed by shedding


def parse_layer_sparsity(items) -> list[tuple[str, float]]:
    """--layer-sparsity GLOB=S: per-tensor targets."""
    return [(g, check_sparsity(s))
            for g, s in parse_assignments(items, "--layer-sparsity", float, "model.layers.0.*=0.3")]


def _sparsity_of(default: float, overrides: list[tuple[str, float]], scale: float = 1.0):
    def of(name: str) -> float:
        for glob, s in overrides:
            if fnmatchcase(name, glob):
                return s * scale
        return default * scale
    return of


def plan(repo, rev: str, sparsity: float, pattern: str | None, scope, embeddings: bool,
               layer_sparsity=(), model_dir: str = "") -> list[PlanRow]:
    pat = Pattern.parse(pattern)
    check_sparsity(sparsity)
    src = open_source(repo, rev, model_dir)
    of = _sparsity_of(pat.sparsity if pat else sparsity, parse_layer_sparsity(list(layer_sparsity)))
    rows = []
    for name, _role, _layer in linear_names(src, scope, embeddings):
        meta = src.tensor_meta(name)
        n = math.prod(meta.shape)
        if pat:
            if meta.shape[-1 if not src.arch.conv1d else 0] % pat.m:
                raise UsageError(f"{name} has {meta.shape} and cannot take the {pattern} pattern")
            k = n // pat.m * (pat.m - pat.n)
        else:
            k = int(of(name) * n)
        rows.append(PlanRow(name, tuple(meta.shape), n, k))
    return rows


def memory_plan(repo, rev: str, method: str, calib=None, model_dir: str = "", spec=None):
    """The layer-by-layer prune's memory plan (compress.device.plan) on the model in *rev*: the
    calibration tokens of *calib* and, with a perplexity *spec*, the evaluation after each wave."""
    from .device import plan as device_plan

    src = open_source(repo, rev, model_dir)
    cal_tokens, cal_seq = (calib.tokens, calib.seq_len) if calib is not None and method != "magnitude" else (0, 128)
    ev = spec if spec is not None and spec.kind == "ppl" else None
    return device_plan(src, "prune", method, cal_tokens, cal_seq, ev.tokens if ev else 0, ev.seq_len if ev else 256)


def run(repo, opts: StepOptions, method: str, sparsity: float, pattern: str | None = None, scope=None,
        embeddings: bool = False, layer_sparsity=(), clusters: int = 0) -> Outcome:
    """Zero weights by *method* (magnitude, wanda, sparsegpt) to *sparsity*, or to an N:M *pattern*."""
    if method not in METHODS:
        raise UsageError(f"unknown pruning method {method!r}", hint=f"choose one of {', '.join(METHODS)}")
    pat = Pattern.parse(pattern)
    check_sparsity(sparsity)
    overrides = parse_layer_sparsity(list(layer_sparsity))
    if pat and opts.waves > 1:
        raise UsageError("an N:M pattern is one step; it cannot be split into --waves")
    if clusters < 0:
        raise UsageError("--clusters must be 0 (off) or more")
    cal = make_calib(repo, opts.calib) if method != "magnitude" else None
    plan(repo, "HEAD", sparsity, pattern, scope, embeddings, layer_sparsity, opts.model_dir)  # checks shapes
    from . import device as dev

    dev.check(memory_plan(repo, "HEAD", method, cal, opts.model_dir, opts.spec), dev.resolve(opts.spec.device),
              opts.spec.max_memory)  # before anything runs, the evaluation of the start included
    target = pat.sparsity if pat else sparsity
    strengths = waves_of(target, opts.waves)
    params = {"sparsity": target, "pattern": pattern, "clusters": clusters or None,
              "layer_sparsity": dict(overrides) or None, "calib": calib_desc(cal)}
    params = {k: v for k, v in params.items() if v is not None}

    def apply(source, strength: float, scratch: str):
        """One wave from the store, a decoder layer at a time (layerwise.prune)."""
        from .layerwise import prune as prune_streamed

        of = _sparsity_of(strength, overrides, strength / target if target else 0.0) if overrides else \
            _sparsity_of(strength, [])
        lin = linear_names(source, scope, embeddings)
        elements = sum(math.prod(source.tensor_meta(n).shape) for n, _r, _l in lin)
        opts.progress.start(f"pruning ({method})", elements * 4, len(lin))
        found: dict = {}
        tree, counts = prune_streamed(repo, source, method, of, pat, clusters, opts.seed, cal, scope, embeddings,
                                      opts.progress, found, device=opts.spec.device)
        opts.progress.finish()
        return Change(counts, extra={"cluster_detail": found} if found else {}, tree=tree)

    return run_step(repo, opts, op="prune", method=method, params=params, strengths=strengths, apply=apply,
                    scope=scope, streamed=True)
