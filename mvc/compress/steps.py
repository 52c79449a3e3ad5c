"""The library calls behind `mvc compress score|shed|prune`: plan (free, --dry-run) and run."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fnmatch import fnmatchcase

from ..errors import UsageError
from ..progress import NULL, Progress
from . import ops
from . import prune as prune_mod
from . import score as score_mod
from . import shed as shed_mod
from .calib import make_calib
from .model import Model, linear_names, open_source


@dataclass
class PlanRow:
    tensor: str
    shape: tuple
    elements: int
    change: int  # elements pruned, or removed by shedding


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


def parse_layer_sparsity(items) -> list[tuple[str, float]]:
    """--layer-sparsity GLOB=S: per-tensor targets."""
    return [(g, prune_mod.check_sparsity(s))
            for g, s in parse_assignments(items, "--layer-sparsity", float, "model.layers.0.*=0.3")]


def _sparsity_of(default: float, overrides: list[tuple[str, float]], scale: float = 1.0):
    def of(name: str) -> float:
        for glob, s in overrides:
            if fnmatchcase(name, glob):
                return s * scale
        return default * scale
    return of


def waves_of(target: float, waves: int) -> list[float]:
    if waves < 1:
        raise UsageError("--waves must be at least 1")
    return [target * k / waves for k in range(1, waves + 1)]


def prune_plan(repo, rev: str, sparsity: float, pattern: str | None, scope, embeddings: bool,
               layer_sparsity=(), model_dir: str = "") -> list[PlanRow]:
    pat = prune_mod.Pattern.parse(pattern)
    prune_mod.check_sparsity(sparsity)
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


def prune(repo, method: str, sparsity: float, spec, pattern: str | None = None, scope=None,
          embeddings: bool = False, layer_sparsity=(), clusters: int = 0, waves: int = 1,
          max_drop: float = 0.03, spike_z: float = 3.0, calib: str | None = None, seed: int = 0,
          model_dir: str = "", message: str | None = None, author: str | None = None,
          progress: Progress = NULL) -> ops.Outcome:
    if method not in prune_mod.METHODS:
        raise UsageError(f"unknown pruning method {method!r}", hint=f"choose one of {', '.join(prune_mod.METHODS)}")
    pat = prune_mod.Pattern.parse(pattern)
    prune_mod.check_sparsity(sparsity)
    overrides = parse_layer_sparsity(list(layer_sparsity))
    if pat and waves > 1:
        raise UsageError("an N:M pattern is one step; it cannot be split into --waves")
    if clusters < 0:
        raise UsageError("--clusters must be 0 (off) or more")
    cal = make_calib(repo, calib) if method != "magnitude" else None
    prune_plan(repo, "HEAD", sparsity, pattern, scope, embeddings, layer_sparsity, model_dir)  # checks shapes
    target = pat.sparsity if pat else sparsity
    strengths = waves_of(target, waves)
    params = {"sparsity": target, "pattern": pattern, "clusters": clusters or None,
              "layer_sparsity": dict(overrides) or None, "calib": _calib_desc(cal)}
    params = {k: v for k, v in params.items() if v is not None}

    def apply(model: Model, strength: float, scratch: str):
        lin = model.linears(scope, embeddings)
        progress.start(f"pruning ({method})", sum(li.weight().numel() * 4 for li in lin), len(lin))
        counts = prune_mod.apply(repo, model, lin, method, _sparsity_of(strength, overrides, strength / target
                                                                       if target else 0.0)
                                 if overrides else _sparsity_of(strength, []),
                                 pat, clusters, seed, cal, progress)
        progress.finish()
        return ops.Change(counts)

    return ops.run(repo, op="prune", method=method, params=params, strengths=strengths, apply=apply, spec=spec,
                   max_drop=max_drop, spike_z=spike_z, scope=scope, seed=seed, model_dir=model_dir,
                   message=message, author=author, progress=progress)


def _calib_desc(cal) -> dict | None:
    if cal is None:
        return None
    import os

    return {"text": os.path.basename(cal.text), "tokens": cal.tokens, "seq_len": cal.seq_len}


def shed_plan(repo, rev: str, neurons: float, heads: float, min_keep: int, model_dir: str = "") -> dict:
    """What shedding would remove, per layer, from the metadata alone (no weights read)."""
    src = open_source(repo, rev, model_dir)
    out = {"layers": 0, "neurons": None, "heads": None}
    names = linear_names(src)
    out["layers"] = max(layer for _n, _r, layer in names) + 1
    if neurons:
        shed_mod.check_fraction("neurons", neurons)
        up = next(n for n, r, layer in names if r == "up" and layer == 0)
        shape = src.tensor_meta(up).shape
        width = shape[1] if src.arch.conv1d else shape[0]
        out["neurons"] = shed_mod.removable(width, neurons, min_keep)
    if heads:
        shed_mod.check_fraction("heads", heads)
        if not src.arch.heads_sheddable:
            raise UsageError(f"{src.arch.model_type} configs cannot express fewer heads; shed --neurons instead")
        h, kv, _hd = score_mod.head_geometry(src.config)
        have, remove = shed_mod.removable(kv, heads, min_keep)
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



def shed(repo, spec, neurons: float = 0.0, heads: float = 0.0, method: str = "wanda", min_keep: int = 1,
         waves: int = 1, max_drop: float = 0.03, spike_z: float = 3.0, calib: str | None = None,
         seed: int = 0, model_dir: str = "", message: str | None = None, author: str | None = None,
         progress: Progress = NULL) -> ops.Outcome:
    if not neurons and not heads:
        raise UsageError("nothing to shed", hint="pass --neurons FRACTION and/or --heads FRACTION")
    if min_keep < 1:
        raise UsageError("--min-keep must be at least 1: a layer never loses all its units")
    plan = shed_plan(repo, "HEAD", neurons, heads, min_keep, model_dir)
    cal = make_calib(repo, calib) if score_mod.needs_calib(method) else None
    if method not in score_mod.METHODS:
        raise UsageError(f"unknown scoring method {method!r}", hint=f"choose one of {', '.join(score_mod.METHODS)}")
    done = {"neuron": 0, "head": 0}
    total = {"neuron": plan["neurons"][1] if plan["neurons"] else 0,
             "head": plan["heads"][1] if plan["heads"] else 0}
    params = {"neurons": neurons or None, "heads": heads or None, "score": method, "min_keep": min_keep,
              "calib": _calib_desc(cal)}
    params = {k: v for k, v in params.items() if v is not None}

    def apply(model: Model, strength: float, scratch: str):
        extra, counts = {"removed": {}}, {}
        for kind in ("neuron", "head"):
            want = math.floor(total[kind] * strength + 1e-9)
            remove = want - done[kind]
            if remove <= 0:
                continue
            lin = model.linears()
            before = {li.name: li.weight().numel() for li in lin}
            scores = score_mod.element_scores(repo, model, lin, method, cal)
            res = shed_mod.apply(model, kind, remove, scores)
            model.src.config = res["config"]
            extra["removed"][kind + "s"] = res["removed"]
            done[kind] = want
            for li in model.linears():
                counts[li.name] = (before[li.name] - li.weight().numel() + counts.get(li.name, (0, 0))[0],
                                   before[li.name])
        return ops.Change(counts, extra, dict(model.src.config))

    strengths = waves_of(1.0, waves)
    return ops.run(repo, op="shed", method=method, params=params, strengths=strengths, apply=apply, spec=spec,
                   max_drop=max_drop, spike_z=spike_z, seed=seed, model_dir=model_dir, message=message,
                   author=author, progress=progress)


def score(repo, rev: str, method: str, calib: str | None = None, scope=None, model_dir: str = "") -> tuple:
    """(report, element scores) for *rev* under *method* (nothing is written to the repository)."""
    if method not in score_mod.METHODS:
        raise UsageError(f"unknown scoring method {method!r}", hint=f"choose one of {', '.join(score_mod.METHODS)}")
    cal = make_calib(repo, calib) if score_mod.needs_calib(method) else None
    model = Model(repo, open_source(repo, rev, model_dir))
    lin = model.linears(scope)
    scores = score_mod.element_scores(repo, model, lin, method, cal)
    report = score_mod.summarize(model, scores)
    report["method"] = method
    report["rev"] = model.src.commit
    return report, scores


def sensitivity_bits(repo, model: Model, lin, spec, group_size: int, budget: float) -> tuple[dict, dict]:
    """Mixed precision from a sensitivity scan: quantize one layer at a time to int4, measure the
    metric, then give 8 bits to the layers whose int4 costs most per weight while the average
    width stays within *budget* bits. Returns ({tensor: bits}, {tensor: metric rise})."""
    import torch

    from ..formats.quantized import rtn_dequantize, rtn_quantize
    from .evaluate import perplexity, text_windows

    if spec.kind != "ppl":
        raise UsageError("--budget-bits needs a perplexity evaluation (--ppl or the default)")
    if not 4 <= budget <= 8:
        raise UsageError(f"--budget-bits {budget:g} is outside [4, 8]")
    win = text_windows(repo, model.src, spec.text, spec.tokens, spec.seq_len)
    base = perplexity(model.model, win)
    rise = {}
    for li in lin:
        w = li.weight()
        keep = w.clone()
        q, sc = rtn_quantize(w, 4, group_size)
        with torch.no_grad():
            w.copy_(rtn_dequantize(q, sc, {"bits": 4, "group_size": group_size, "shape": list(w.shape)}))
            rise[li.name] = perplexity(model.model, win) - base
            w.copy_(keep)
    sizes = {li.name: li.weight().numel() for li in lin}
    total = sum(sizes.values())
    bits = {n: 4 for n in sizes}
    used = 4 * total
    for name in sorted(sizes, key=lambda n: -rise[n] / sizes[n]):
        if used + 4 * sizes[name] <= budget * total:
            bits[name] = 8
            used += 4 * sizes[name]
    return bits, rise


def quantize(repo, spec, method: str, group_size: int = 0, double_quant: bool = False, scope=None,
             skip=(), max_drop: float = 0.03, seed: int = 0, model_dir: str = "", message: str | None = None,
             author: str | None = None, bits: dict | None = None, budget_bits: float | None = None,
             progress: Progress = NULL) -> ops.Outcome:
    """Quantize the model's linear layers (or cast it, for fp16/bf16). *skip*: globs of tensors kept
    in full precision; *bits*: {glob: 4|8} per-layer widths for the rtn methods; *budget_bits*:
    choose those widths by a sensitivity scan, within this average width."""
    import os

    from . import quant

    quant.check(method, group_size, double_quant)
    if (bits or budget_bits is not None) and method not in quant.RTN:
        raise UsageError(f"--bits and --budget-bits (per-layer widths) apply to rtn-int8/rtn-int4, not {method}")
    if bits and budget_bits is not None:
        raise UsageError("pass --bits or --budget-bits, not both")
    if bad := [f"{g}={b}" for g, b in (bits or {}).items() if b not in (4, 8)]:
        raise UsageError(f"--bits {bad[0]!r} is not GLOB=4 or GLOB=8 (rtn stores 4 or 8 bits per weight)",
                         hint="for example 'model.layers.0.*=8'")
    src = open_source(repo, "HEAD", model_dir)
    linear_names(src, scope)  # the scope matches something
    params = {"group_size": group_size or None, "double_quant": double_quant or None,
              "skip": list(skip) or None, "bits": bits or None, "budget_bits": budget_bits}
    params = {k: v for k, v in params.items() if v is not None}

    def apply(model: Model, strength: float, scratch: str):
        if method in quant.CASTS:
            return ops.Change(quant.cast(model, method))
        lin = [li for li in model.linears(scope) if not any(fnmatchcase(li.name, g) for g in skip)]
        if not lin:
            raise UsageError("every layer in scope is skipped: nothing to quantize")
        extra: dict = {}
        out_dir = os.path.join(scratch, "model")
        os.makedirs(out_dir)
        if method in quant.BNB:
            chosen = {li.name for li in lin}
            keep = sorted(li.name[:-len(".weight")] for li in model.linears() if li.name not in chosen)
            # an explicit skip list replaces transformers' default one, which keeps the LM head
            quant.bnb_quantize(model, method, double_quant, keep + ["lm_head"] if keep else [], out_dir)
            counts = {li.name: (li.weight().numel(), li.weight().numel()) for li in lin}
        else:
            width = quant.RTN[method]
            chosen_bits = bits
            if budget_bits is not None:
                chosen_bits, rise = sensitivity_bits(repo, model, lin, spec, group_size, budget_bits)
                extra["bits"] = chosen_bits
                extra["sensitivity"] = {n: round(r, 4) for n, r in rise.items()}

            def bits_of(name: str) -> int:
                for glob, b in (chosen_bits or {}).items():
                    if fnmatchcase(name, glob):
                        return b
                return width
            counts = quant.rtn_quantize_dir(model, method, group_size, lin, bits_of, out_dir)
        quant.load_dequantized(model, out_dir)
        return ops.Change(counts, extra, out_dir=out_dir)

    return ops.run(repo, op="quantize", method=method, params=params, strengths=[1.0], apply=apply, spec=spec,
                   max_drop=max_drop, scope=scope, seed=seed, model_dir=model_dir, message=message,
                   author=author, progress=progress)


def default_against(repo) -> str:
    """The newest first-parent ancestor of HEAD that no prune or shed step made: what healing
    measures damage against (HEAD~1 when HEAD itself is not such a step)."""
    head = repo.refs.head_commit()
    oid = head
    while oid:
        c = repo.commit_obj(oid)
        if (c.op or {}).get("op") not in ("prune", "shed") and oid != head:
            return oid
        if not c.parents:
            break
        oid = c.parents[0]
    if oid == head:
        raise UsageError("HEAD has no parent to measure damage against", hint="pass --against REV")
    return oid


def heal(repo, spec, text: str | None = None, steps_: int = 50, lr: float = 1e-3, rank: int = 16, rounds: int = 2,
         alpha: float = 16.0, targets: int | None = None, against: str | None = None, tokens: int | None = None,
         max_drop: float = 0.03, seed: int = 0, model_dir: str = "", message: str | None = None,
         author: str | None = None, progress: Progress = NULL) -> ops.Outcome:
    """LoRA-heal the layers that *against* → HEAD damaged most; merged under the sparsity mask."""
    import os

    from . import heal as heal_mod
    from .calib import windows

    if steps_ < 1 or rank < 1 or lr <= 0 or rounds < 1:
        raise UsageError("--steps, --rank and --rounds must be at least 1, --lr positive")
    cal = make_calib(repo, text, tokens or 32768)  # healing trains on the whole text (up to 32k tokens)
    src = open_source(repo, "HEAD", model_dir)
    ref_commit = repo.resolve(against) if against else default_against(repo)
    reference = {}
    for path in open_source(repo, ref_commit, model_dir).files:
        reference.update(repo.load(ref_commit, path=path))
    params = {"steps": steps_, "lr": lr, "rank": rank, "alpha": alpha, "rounds": rounds, "against": ref_commit,
              "text": _calib_desc(cal)}
    del src

    def apply(model: Model, strength: float, scratch: str):
        lin = model.linears()
        batches = windows(repo, model, cal)
        dmg = heal_mod.damage(model, lin, reference, batches)
        chosen = heal_mod.choose_targets(dmg, targets)
        tag = f"heal-{ref_commit[:8]}"
        files, counts = {}, {}
        per_round = [steps_ // rounds + (1 if i < steps_ % rounds else 0) for i in range(rounds)]
        for i, n in enumerate(x for x in per_round if x):
            # each round trains on the model as merged so far, so later rounds learn to work
            # within the sparsity mask that the merge enforces
            adir = os.path.join(scratch, f"adapter-{i + 1}")
            deltas = heal_mod.train_lora(model, chosen, batches, n, lr, rank, alpha, seed + i, adir)
            counts = heal_mod.merge_masked(model, deltas)
            where = heal_mod.adapter_path(model, tag) + (f"/round-{i + 1}" if rounds > 1 else "")
            for name in os.listdir(adir):
                if name.endswith((".safetensors", ".json")):
                    files[f"{where}/{name}"] = os.path.join(adir, name)
        extra = {"targets": chosen, "damage": {n: round(dmg[n], 6) for n in chosen}, "adapter": tag}
        return ops.Change(counts, extra, add_files=files)

    return ops.run(repo, op="heal", method="lora", params=params, strengths=[1.0], apply=apply, spec=spec,
                   max_drop=max_drop, seed=seed, model_dir=model_dir, message=message, author=author,
                   progress=progress)


def factorize(repo, spec, rank: int | None = None, energy: float | None = None, scope=None, whiten: bool = False,
              calib: str | None = None, max_drop: float = 0.03, seed: int = 0, model_dir: str = "",
              message: str | None = None, author: str | None = None, progress: Progress = NULL) -> ops.Outcome:
    """Replace chosen linear layers by two thin ones (truncated SVD; --whiten: activation-aware)."""
    from . import factorize as fz
    from .calib import collect_inputs, windows

    if (rank is None) == (energy is None):
        raise UsageError("pass exactly one of --rank R or --energy E")
    if rank is not None and rank < 1:
        raise UsageError(f"--rank {rank} must be at least 1")
    if energy is not None and not 0 < energy < 1:
        raise UsageError(f"--energy {energy:g} is outside (0, 1)", hint="for example 0.9")
    src = open_source(repo, "HEAD", model_dir)
    if src.config.get(fz.CONFIG_KEY):
        raise UsageError("this model is already factorized; factorize its parent instead")
    linear_names(src, scope)
    cal = make_calib(repo, calib) if whiten else None
    params = {k: v for k, v in {"rank": rank, "energy": energy, "whiten": whiten or None,
                                "calib": _calib_desc(cal)}.items() if v is not None}

    def apply(model: Model, strength: float, scratch: str):
        import torch

        lin = [li for li in model.linears(scope) if li.role != "embedding"]
        scales = {}
        if whiten:
            stats = collect_inputs(model, lin, windows(repo, model, cal))
            scales = {n: (st.sq / max(1, st.n)).sqrt().float() for n, st in stats.items()}
        ranks, counts, skipped = {}, {}, []
        for li in lin:
            w = li.weight().float()
            out_f, in_f = w.shape
            a, b, r = fz.factor(w, rank, energy, scales.get(li.name))
            if r * (in_f + out_f) >= in_f * out_f:
                skipped.append(li.name)
                continue
            mod_name = li.name[:-len(".weight")]
            bias = getattr(li.module, "bias", None)
            fz.install(model.model, {mod_name: r})
            new = model.model.get_submodule(mod_name)
            with torch.no_grad():
                new.a.weight.copy_(a.to(model.stored_dtype(li.name)).float())
                new.b.weight.copy_(b.to(model.stored_dtype(li.name)).float())
                if bias is not None:
                    new.b.bias.copy_(bias)
            model.removed.add(li.name)
            model.added[mod_name + ".a.weight"] = li.name
            model.added[mod_name + ".b.weight"] = li.name
            if bias is not None:
                model.removed.add(mod_name + ".bias")
                model.added[mod_name + ".b.bias"] = mod_name + ".bias"
            ranks[mod_name] = r
            counts[li.name] = (in_f * out_f - r * (in_f + out_f), in_f * out_f)
        if not ranks:
            raise UsageError("no layer gets smaller at that rank/energy (r·(in+out) must be < in·out)",
                             hint="lower --rank or --energy, or choose larger layers with --scope")
        cfg = dict(model.src.config)
        cfg[fz.CONFIG_KEY] = ranks
        model.src.config = cfg
        return ops.Change(counts, {"ranks": ranks, "skipped": skipped or None}, cfg)

    return ops.run(repo, op="factorize", method="svd-whitened" if whiten else "svd", params=params,
                   strengths=[1.0], apply=apply, spec=spec, max_drop=max_drop, scope=scope, seed=seed,
                   model_dir=model_dir, message=message, author=author, progress=progress)
