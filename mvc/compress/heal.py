"""Healing: LoRA fine-tuning (peft) of the most damaged layers, merged back under the sparsity mask.

Damage of a layer is the relative change of its outputs on the calibration inputs against a
reference revision (the parent, by default): with G = XᵀX the Gram matrix of the layer's
inputs and Δ = W − W_ref, damage = sqrt(tr(Δ G Δᵀ) / tr(W_ref G W_refᵀ)). A layer whose shape
changed (shed) counts as fully damaged. LoRA adapters are trained on the healing text with the
language-model loss; the merge adds (B·A)·scale only where the weight is non-zero, so every
pruned weight stays exactly zero. The adapter itself is saved in peft's format.
"""

from __future__ import annotations

import copy
import math
import os

from ..errors import UsageError
from .calib import collect_inputs, make_calib, windows
from .model import Model, open_source
from .runner import Change, Outcome, StepOptions, calib_desc
from .runner import run as run_step


def damage(model, linears, reference: dict, batches) -> dict:
    """{tensor name: damage} for *linears* against the reference tensors."""
    stats = collect_inputs(model, linears, batches, gram=True)
    out = {}
    for li in linears:
        ref = reference.get(li.name)
        w = li.weight()
        ref = None if ref is None else (ref.t() if li.conv1d else ref).float()  # as (out, in)
        if ref is None or ref.shape != w.shape:
            out[li.name] = 1.0
            continue
        g = stats[li.name].gram
        d = w - ref
        num = float(((d @ g) * d).sum())
        den = float(((ref @ g) * ref).sum()) or 1.0
        out[li.name] = math.sqrt(max(num, 0.0) / den)
    return out


def choose_targets(dmg: dict, targets: int | None) -> list[str]:
    damaged = sorted((n for n, d in dmg.items() if d > 0), key=lambda n: -dmg[n])
    if not damaged:
        raise UsageError("no layer differs from the reference: nothing to heal",
                         hint="heal after a prune or shed step, or pass --against REV")
    k = len(damaged) if targets is None else max(1, min(targets, len(damaged)))
    return damaged[:k]


def train_lora(model, target_names: list[str], batches, steps: int, lr: float, rank: int, alpha: float,
               seed: int, adapter_dir: str | None = None) -> dict:
    """Train LoRA adapters on a copy of the model; returns {tensor name: delta (out, in)}."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = copy.deepcopy(model.model)
    base.train()
    modules = [n[:-len(".weight")] for n in target_names]
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=modules, bias="none",
                     fan_in_fan_out=bool(model.src.arch.conv1d))
    peft_model = get_peft_model(base, cfg)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    n = batches.shape[0]
    batch = min(8, n)
    for _step in range(steps):
        idx = torch.randperm(n, generator=gen)[:batch]
        x = batches[idx]
        loss = peft_model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    peft_model.eval()
    if adapter_dir is not None:
        peft_model.save_pretrained(adapter_dir, safe_serialization=True)
    deltas = {}
    for name in target_names:
        mod = peft_model.base_model.model.get_submodule(name[:-len(".weight")])
        a = mod.lora_A["default"].weight.detach()
        b = mod.lora_B["default"].weight.detach()
        deltas[name] = (b @ a) * mod.scaling["default"]  # (out, in)
    return deltas


def merge_masked(model, deltas: dict) -> dict:
    """Add each delta where the weight is non-zero; returns {name: (changed, total)}."""
    import torch

    by_name = {li.name: li for li in model.linears()}
    counts = {}
    with torch.no_grad():
        for name, delta in deltas.items():
            li = by_name[name]
            w = li.weight()
            mask = w != 0
            w += delta.to(w.dtype) * mask
            model.round_to_stored(li)
            counts[name] = (int(mask.sum()), w.numel())
    return counts


def adapter_path(model, tag: str) -> str:
    return os.path.join(model.src.prefix, "adapters", tag).lstrip("/")


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


def run(repo, opts: StepOptions, text: str | None = None, steps_: int = 50, lr: float = 1e-3, rank: int = 16,
        rounds: int = 2, alpha: float = 16.0, targets: int | None = None, against: str | None = None,
        tokens: int | None = None) -> Outcome:
    """LoRA-heal the layers that *against* → HEAD damaged most; merged under the sparsity mask."""
    if steps_ < 1 or rank < 1 or lr <= 0 or rounds < 1:
        raise UsageError("--steps, --rank and --rounds must be at least 1, --lr positive")
    cal = make_calib(repo, text, tokens or 32768)  # healing trains on the whole text (up to 32k tokens)
    ref_commit = repo.resolve(against) if against else default_against(repo)
    reference = {}
    for path in open_source(repo, ref_commit, opts.model_dir).files:
        reference.update(repo.load(ref_commit, path=path))
    params = {"steps": steps_, "lr": lr, "rank": rank, "alpha": alpha, "rounds": rounds, "against": ref_commit,
              "text": calib_desc(cal)}

    def apply(model: Model, strength: float, scratch: str):
        lin = model.linears()
        batches = windows(repo, model, cal)
        dmg = damage(model, lin, reference, batches)
        chosen = choose_targets(dmg, targets)
        tag = f"heal-{ref_commit[:8]}"
        files, counts = {}, {}
        per_round = [steps_ // rounds + (1 if i < steps_ % rounds else 0) for i in range(rounds)]
        for i, n in enumerate(x for x in per_round if x):
            # each round trains on the model as merged so far, so later rounds learn to work
            # within the sparsity mask that the merge enforces
            adir = os.path.join(scratch, f"adapter-{i + 1}")
            deltas = train_lora(model, chosen, batches, n, lr, rank, alpha, opts.seed + i, adir)
            counts = merge_masked(model, deltas)
            where = adapter_path(model, tag) + (f"/round-{i + 1}" if rounds > 1 else "")
            for name in os.listdir(adir):
                if name.endswith((".safetensors", ".json")):
                    files[f"{where}/{name}"] = os.path.join(adir, name)
        extra = {"targets": chosen, "damage": {n: round(dmg[n], 6) for n in chosen}, "adapter": tag}
        return Change(counts, extra, add_files=files)

    return run_step(repo, opts, op="heal", method="lora", params=params, strengths=[1.0], apply=apply)
