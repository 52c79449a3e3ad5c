"""Quantization steps: bitsandbytes NF4/FP4/int8 (through transformers, so the files are the
ones transformers writes and loads with BitsAndBytesConfig) and mvc's round-to-nearest
int8/int4 with per-row or per-group scales. The commit stores the low-bit tensors themselves.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from fnmatch import fnmatchcase

from ..errors import MvcError, UsageError
from ..formats.quantized import RTN_META, dequantize_state, rtn_quantize, write_rtn_config
from .layerwise import TAIL
from .model import Model, linear_names, open_source
from .runner import Change, Outcome, StepOptions
from .runner import run as run_step

BNB = ("nf4", "fp4", "int8")
RTN = {"rtn-int8": 8, "rtn-int4": 4}
METHODS = (*BNB, *RTN)
CASTS = ("fp16", "bf16")


def check(method: str, group_size: int, double_quant: bool) -> None:
    if method not in METHODS + CASTS:
        raise UsageError(f"unknown quantization method {method!r}", hint=f"choose one of {', '.join(METHODS + CASTS)}")
    if group_size and method not in RTN:
        raise UsageError(f"--group-size applies to rtn-int8/rtn-int4, not {method}",
                         hint="bitsandbytes uses its own blocks of 64")
    if group_size < 0 or (group_size and group_size % 2):
        raise UsageError(f"--group-size {group_size} must be a positive even number (or 0 for one scale per row)")
    if double_quant and method not in ("nf4", "fp4"):
        raise UsageError("--double-quant applies to nf4 and fp4 only")


def _write_model_dir(model, d: str) -> None:
    from safetensors.torch import save_file

    with open(os.path.join(d, "config.json"), "w", encoding="utf-8") as f:
        json.dump(model.src.config, f)
    save_file({k: v.contiguous() for k, v in model.state().items()}, os.path.join(d, "model.safetensors"),
              metadata={"format": "pt"})


def bnb_quantize(model, method: str, double_quant: bool, skip: list[str], out_dir: str) -> None:
    """Quantize with transformers + bitsandbytes and save_pretrained into *out_dir*."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # plumbing stays quiet; the CLI shows progress

    if method == "int8":
        qc = transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip or None)
    else:
        qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method,
                                             bnb_4bit_use_double_quant=double_quant,
                                             bnb_4bit_compute_dtype=torch.float32,
                                             llm_int8_skip_modules=skip or None)
    dtype = next(iter(model.originals.values())).dtype
    with tempfile.TemporaryDirectory() as src_dir:
        _write_model_dir(model, src_dir)
        cls = type(model.model)
        try:
            q = cls.from_pretrained(src_dir, quantization_config=qc, device_map="cpu", dtype=dtype)
        except (ImportError, ValueError, RuntimeError) as e:
            raise MvcError(f"bitsandbytes could not quantize this model: {e}") from e
        for m in q.modules():  # dequantize to float32 (not the source's bf16): computing in float32 is
            qs = getattr(getattr(m, "weight", None), "quant_state", None)  # then exact where bf16 rounds
            if qs is not None and hasattr(qs, "dtype"):
                qs.dtype = torch.float32
        q.save_pretrained(out_dir, safe_serialization=True)


def rtn_quantize_dir(model, method: str, group_size: int, linears, bits_of, out_dir: str) -> dict:
    """mvc's round-to-nearest: each file of the model rewritten with qweight/scales; returns counts."""
    from safetensors.torch import save_file

    state = model.state()
    targets = {li.name for li in linears}
    counts = {}
    for path, items in model.src.files.items():
        tensors, info = {}, {}
        for name, _meta in items:
            t = state[name]
            if name in targets:
                bits = bits_of(name)
                try:
                    q, scales = rtn_quantize(t, bits, group_size)
                except ValueError as e:
                    raise UsageError(f"{name} {list(t.shape)}: {e}") from e
                tensors[name + ".qweight"], tensors[name + ".scales"] = q, scales
                info[name] = {"bits": bits, "group_size": group_size, "shape": list(t.shape),
                              "dtype": {"torch.bfloat16": "BF16", "torch.float16": "F16"}.get(str(t.dtype), "F32")}
                counts[name] = (t.numel(), t.numel())
            else:
                tensors[name] = t.contiguous()
        meta = {"format": "pt"}
        if info:
            meta[RTN_META] = json.dumps(info, sort_keys=True)
        save_file(tensors, os.path.join(out_dir, os.path.basename(path)), metadata=meta)
    write_rtn_config(model.src.config, [bits_of(n) for n in counts], group_size, out_dir)
    return counts


def load_dequantized(model, out_dir: str) -> None:
    """Put the dequantized weights of the files in *out_dir* into the float32 model in memory, so
    that what is evaluated is exactly what `repo.load(..., dequantize=True)` gives."""
    import torch
    from safetensors import safe_open

    state, meta = {}, {}
    for f in sorted(os.listdir(out_dir)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(out_dir, f), "pt") as sf:
                meta.update(sf.metadata() or {})
                for k in sf.keys():
                    state[k] = sf.get_tensor(k)
    deq = dequantize_state(state, meta, dtype=torch.float32)
    own = model.model.state_dict()
    with torch.no_grad():
        for k, v in deq.items():
            if k in own and own[k].shape == v.shape:
                own[k].copy_(v.float())


def cast(model, dtype_name: str) -> dict:
    """fp16/bf16 casts of every floating tensor; returns counts."""
    import torch

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    model.cast = dtype
    counts = {name: (t.numel(), t.numel()) for name, t in model.originals.items()
              if t.is_floating_point() and t.dtype != dtype}
    with torch.no_grad():
        for p in model.model.parameters():
            p.copy_(p.to(dtype).float())
    return counts


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


def run(repo, opts: StepOptions, method: str, group_size: int = 0, double_quant: bool = False, scope=None,
        skip=(), bits: dict | None = None, budget_bits: float | None = None) -> Outcome:
    """Quantize the model's linear layers (or cast it, for fp16/bf16). *skip*: globs of tensors kept
    in full precision; *bits*: {glob: 4|8} per-layer widths for the rtn methods; *budget_bits*:
    choose those widths by a sensitivity scan, within this average width."""
    check(method, group_size, double_quant)
    if (bits or budget_bits is not None) and method not in RTN:
        raise UsageError(f"--bits and --budget-bits (per-layer widths) apply to rtn-int8/rtn-int4, not {method}")
    if bits and budget_bits is not None:
        raise UsageError("pass --bits or --budget-bits, not both")
    if bad := [f"{g}={b}" for g, b in (bits or {}).items() if b not in (4, 8)]:
        raise UsageError(f"--bits {bad[0]!r} is not GLOB=4 or GLOB=8 (rtn stores 4 or 8 bits per weight)",
                         hint="for example 'model.layers.0.*=8'")
    src = open_source(repo, "HEAD", opts.model_dir)
    linear_names(src, scope)  # the scope matches something
    params = {"group_size": group_size or None, "double_quant": double_quant or None,
              "skip": list(skip) or None, "bits": bits or None, "budget_bits": budget_bits}
    params = {k: v for k, v in params.items() if v is not None}

    def bits_of(name: str) -> int:
        for glob, b in (bits or {}).items():
            if fnmatchcase(name, glob):
                return b
        return RTN[method]

    if method in RTN and budget_bits is None and src.arch.model_type in TAIL:
        def streamed(source, strength: float, scratch: str):
            """From the store, a tensor at a time (layerwise.rtn_quantize_files)."""
            from .layerwise import rtn_quantize_files

            targets = {n for n, _r, _l in linear_names(source, scope) if not any(fnmatchcase(n, g) for g in skip)}
            if not targets:
                raise UsageError("every layer in scope is skipped: nothing to quantize")
            out_dir = os.path.join(scratch, "model")
            os.makedirs(out_dir)
            return Change(rtn_quantize_files(repo, source, targets, bits_of, group_size, out_dir), {}, out_dir=out_dir)

        return run_step(repo, opts, op="quantize", method=method, params=params, strengths=[1.0], apply=streamed,
                        scope=scope, streamed=True)

    def apply(model: Model, strength: float, scratch: str):
        if method in CASTS:
            return Change(cast(model, method))
        lin = [li for li in model.linears(scope) if not any(fnmatchcase(li.name, g) for g in skip)]
        if not lin:
            raise UsageError("every layer in scope is skipped: nothing to quantize")
        extra: dict = {}
        out_dir = os.path.join(scratch, "model")
        os.makedirs(out_dir)
        if method in BNB:
            chosen = {li.name for li in lin}
            keep = sorted(li.name[:-len(".weight")] for li in model.linears() if li.name not in chosen)
            # an explicit skip list replaces transformers' default one, which keeps the LM head
            bnb_quantize(model, method, double_quant, keep + ["lm_head"] if keep else [], out_dir)
            counts = {li.name: (li.weight().numel(), li.weight().numel()) for li in lin}
        else:
            width = RTN[method]
            chosen_bits = bits
            if budget_bits is not None:
                chosen_bits, rise = sensitivity_bits(repo, model, lin, opts.spec, group_size, budget_bits)
                extra["bits"] = chosen_bits
                extra["sensitivity"] = {n: round(r, 4) for n, r in rise.items()}

            def bits_of(name: str) -> int:
                for glob, b in (chosen_bits or {}).items():
                    if fnmatchcase(name, glob):
                        return b
                return width
            counts = rtn_quantize_dir(model, method, group_size, lin, bits_of, out_dir)
        load_dequantized(model, out_dir)
        return Change(counts, extra, out_dir=out_dir)

    return run_step(repo, opts, op="quantize", method=method, params=params, strengths=[1.0], apply=apply,
                    scope=scope)
