"""Quantized tensor layouts inside safetensors files, and their dequantization.

Three layouts are recognised by tensor names (the same names transformers writes, so such
files load with ``BitsAndBytesConfig``; mvc's own round-to-nearest layout names its parts):

- bitsandbytes 4-bit (nf4/fp4): ``X.weight`` (packed uint8), ``X.weight.absmax``,
  ``X.weight.quant_map``, optional ``X.weight.nested_absmax``/``nested_quant_map``, and
  ``X.weight.quant_state.bitsandbytes__nf4|fp4`` (the quant state as JSON bytes);
- bitsandbytes 8-bit (LLM.int8, vectorwise): ``X.weight`` (int8), ``X.SCB`` (row scales),
  ``X.weight_format``;
- mvc round-to-nearest (rtn-int8, rtn-int4): ``X.weight.qweight`` (int8, or two int4 per
  uint8 byte, low nibble first), ``X.weight.scales`` (float32, one per row or per group), and
  the file's ``__metadata__["mvc.quant"]``: JSON {"X.weight": {"bits", "group_size", "shape",
  "dtype"}}.

Dequantizing needs torch (and bitsandbytes for the 4-bit layout); both are imported lazily.
"""

from __future__ import annotations

import json

_BNB4 = ".quant_state.bitsandbytes__"
_PARTS4 = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
RTN_META = "mvc.quant"


def dequantize_state(state: dict, metadata: dict | None = None, dtype=None) -> dict:
    """A state dict with every quantized weight replaced by its dequantized tensor (in *dtype*,
    default the original dtype where recorded, else float32); other tensors pass through."""
    import torch

    out = dict(state)
    rtn = json.loads(metadata[RTN_META]) if metadata and RTN_META in metadata else {}
    for key in [k for k in state if _BNB4 in k]:
        base = key.split(_BNB4)[0]  # "X.weight"
        out[base] = _bnb4(state, base, key).to(dtype or torch.float32)
        for suffix in (*_PARTS4, _BNB4 + key.split(_BNB4)[1]):
            out.pop(base + suffix, None)
    for key in [k for k in state if k.endswith(".SCB")]:
        mod = key[:-len(".SCB")]
        w = state[mod + ".weight"]
        out[mod + ".weight"] = (w.float() * state[key].float()[:, None] / 127.0).to(dtype or torch.float32)
        out.pop(key)
        out.pop(mod + ".weight_format", None)
    for name, info in rtn.items():
        q, scales = out.pop(name + ".qweight"), out.pop(name + ".scales")
        out[name] = rtn_dequantize(q, scales, info).to(dtype or _torch_dtype(info.get("dtype")))
    return out


def _torch_dtype(name: str | None):
    import torch

    return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(name or "F32", torch.float32)


def _bnb4(state: dict, base: str, key: str):
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes.functional as F
    import torch

    qs = {k[len(base) + 1:]: v for k, v in state.items() if k.startswith(base + ".") and k != base}
    quant_state = F.QuantState.from_dict(qs, device=torch.device("cpu"))
    return F.dequantize_4bit(state[base], quant_state)


def rtn_quantize(w, bits: int, group_size: int = 0):
    """Symmetric round-to-nearest: (qweight, scales). Scales per row (group_size 0) or per group
    of *group_size* inputs; int4 values are packed two per byte, low nibble first."""
    import torch

    qmax = 2 ** (bits - 1) - 1
    rows, cols = w.shape
    g = group_size or cols
    if cols % g:
        raise ValueError(f"{cols} inputs are not a multiple of the group size {g}")
    x = w.float().reshape(rows, cols // g, g)
    scales = x.abs().amax(-1) / qmax
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    q = torch.clamp(torch.round(x / scales[..., None]), -qmax, qmax).to(torch.int8).reshape(rows, cols)
    if bits == 4:
        u = (q + 8).to(torch.uint8)  # 1..15
        if cols % 2:
            raise ValueError("int4 packing needs an even number of inputs")
        q = (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()
    return q, scales.float().contiguous()


def rtn_dequantize(q, scales, info: dict):
    import torch

    rows, cols = info["shape"]
    if info["bits"] == 4:
        u = torch.empty(rows, cols, dtype=torch.uint8)
        u[:, 0::2] = q & 0x0F
        u[:, 1::2] = q >> 4
        vals = u.to(torch.int16) - 8
    else:
        vals = q.to(torch.int16)
    g = info.get("group_size") or cols
    return (vals.float().reshape(rows, cols // g, g) * scales.float()[..., None]).reshape(rows, cols)


def write_rtn_config(config: dict, bits: list[int], group_size: int, out_dir: str) -> None:
    """config.json of an rtn-quantized model into *out_dir*: *config* with a quantization_config
    that transformers does not know (it refuses to load the model by name; mvc dequantizes it)."""
    import os

    cfg = dict(config)
    cfg["quantization_config"] = {"quant_method": "mvc-rtn", "bits": sorted(set(bits)), "group_size": group_size}
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
