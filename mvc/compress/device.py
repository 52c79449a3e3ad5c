"""Where a step computes (``--device``) and the memory a layer-by-layer step plans to use.

The plan is made from the stored tensors' metadata and config.json alone: nothing is loaded, so
it can be made for a 7B model on a laptop (``--dry-run``), and checked before a step starts, so
that a step that cannot fit stops with one line instead of being killed half-way.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..errors import UsageError

#: what importing torch and transformers costs a process on the CPU (measured: bench --compress-scale)
RUNTIME_BYTES = 480 << 20
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?", re.IGNORECASE)


def resolve(spec: str | None, whole_model: bool = False):
    """The torch device of ``--device`` (auto, cpu, cuda, cuda:N). *whole_model* steps (shed,
    quantize, factorize, heal, score) run on the CPU: auto picks it, cuda is refused."""
    import torch

    text = (spec or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() and not whole_model else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", text)
    if m is None:
        raise UsageError(f"--device {spec}: not a device", hint="use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: no CUDA device is available to torch",
                         hint="use --device cpu (or auto, which falls back to the CPU)")
    index, count = int(m.group(1) or 0), torch.cuda.device_count()
    if index >= count:
        raise UsageError(f"--device {spec}: there {'is' if count == 1 else 'are'} {count} CUDA device(s)",
                         hint=f"use cuda:0 … cuda:{count - 1}")
    if whole_model:
        raise UsageError(f"--device {spec}: this step loads the whole model and runs on the CPU",
                         hint="use --device cpu; prune and eval run layer by layer on CUDA")
    return torch.device("cuda", index)


def parse_size(text: str | None) -> int | None:
    """``--max-memory`` (bytes, or with K/M/G/T, binary units) -> bytes; None when not given."""
    if text is None:
        return None
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise UsageError(f"--max-memory {text}: not a size", hint="for example 8GiB, 1500MiB")
    unit = (m.group(2) or "b")[0].lower()
    return int(float(m.group(1)) * {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit])


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


@dataclass
class MemoryPlan:
    """The largest memory a layer-by-layer step holds at once, by part (bytes)."""

    step: str
    layers: int
    parts: dict = field(default_factory=dict)
    largest_layer: int = -1  # the layer whose weights are largest
    phase: str = ""  # the part of the step where the peak is (pruning, evaluation)

    @property
    def on_device(self) -> int:
        return sum(v for k, v in self.parts.items() if k != "runtime")

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        parts = ", ".join(f"{k} {gib(v)}" for k, v in self.parts.items() if v)
        return f"planned peak memory {gib(self.total)}{' during ' + self.phase if self.phase else ''} ({parts})"

    def as_dict(self) -> dict:
        return {"step": self.step, "layers": self.layers, "peak_bytes": self.total, "phase": self.phase,
                "largest_layer": self.largest_layer, "parts": dict(self.parts)}


def plan(src, step: str, method: str = "", tokens: int = 0, seq_len: int = 128, eval_tokens: int = 0,
         eval_seq_len: int = 256, batch: int = 8) -> MemoryPlan:
    """The memory plan of a layer-by-layer *step* ("prune" with *method*, or "eval") on the model of
    *src* (a compress.model.Source: metadata only). Always held: the runtime, the weights outside
    the layers, one layer's weights in float32 (and their stored copy). Then the larger of two
    phases: pruning (the kept activations of *tokens* calibration tokens, one batch's widest
    activations, and the method's matrices: SparseGPT's float64 and float32 (in, in) Hessian of
    the widest input and the layer's X^T X; Wanda's column norms) and evaluation (*eval_tokens*'
    activations and one batch's logits)."""
    cfg = src.config
    pat = re.compile(src.arch.layers)
    per_layer: dict[int, int] = {}
    outside = 0
    for name in src.where:
        meta = src.tensor_meta(name)
        n = math.prod(meta.shape)
        m = pat.search(name)
        if m is None:
            outside += 4 * n
        else:
            per_layer[int(m.group(1))] = per_layer.get(int(m.group(1)), 0) + n
    hidden = int(cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model") or 0)
    vocab = int(cfg.get("vocab_size") or 0)
    # the widest matrix side in a layer: the MLP's width (packed quantized matrices count as stored)
    inter = max([1] + [d for name in src.where if pat.search(name)
                       for d in (src.tensor_meta(name).shape if len(src.tensor_meta(name).shape) == 2 else ())])
    largest = max(per_layer, key=lambda i: per_layer[i]) if per_layer else -1
    layer = 4 * per_layer.get(largest, 0)
    common = {"runtime": RUNTIME_BYTES, "weights outside the layers": outside,
              "one layer (float32, and its stored copy)": layer + layer // 2}

    def activations(kept: int, run: int) -> int:
        # the kept hidden states at a layer's input and output, and one batch's widest activations
        # (the MLP's, a few at once: its projections, their product, the input statistics' copy)
        return 4 * (2 * kept * hidden + 4 * batch * run * inter)

    phases = []
    if step == "prune":
        work = {"activations": activations(tokens, seq_len) if tokens else 0}
        if method == "sparsegpt":
            work["SparseGPT Hessian (float64 and float32)"] = 12 * inter * inter
            work["X^T X of the layer's inputs"] = 4 * (inter * inter + 3 * hidden * hidden)
        elif method == "wanda":
            work["input norms"] = 8 * 4 * inter
        phases.append(("pruning", work))
    if eval_tokens:
        phases.append(("evaluation", {"activations": activations(eval_tokens, eval_seq_len),
                                      "logits": 4 * 2 * batch * eval_seq_len * vocab}))
    phase, work = max(phases, key=lambda p: sum(p[1].values())) if phases else ("", {})
    return MemoryPlan(step, len(per_layer), {**common, **work}, largest, phase)


def available(device) -> int:
    """Free memory on *device*: CUDA's free bytes, or the system's MemAvailable."""
    if device.type == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def check(p: MemoryPlan, device, max_memory: int | None) -> None:
    """Refuse, with one line, a step whose plan does not fit *device* (or ``--max-memory``)."""
    need = p.on_device if device.type == "cuda" else p.total
    have = available(device)
    if max_memory is not None:
        have = min(have, max_memory)
    if need > have:
        where = f"{device}" + (" (--max-memory)" if max_memory is not None and max_memory <= available(device) else "")
        raise UsageError(f"{p.step} needs {gib(need)} at its peak (with layer {p.largest_layer}, its largest, "
                         f"in memory); {gib(have)} is free on {where}",
                         hint="use a device with more memory, or fewer evaluation or calibration tokens")
