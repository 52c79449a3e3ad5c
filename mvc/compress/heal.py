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
from .calib import collect_inputs


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
