"""Models whose weights stay in the store: built empty (the meta device), with the embeddings, the
final norm and the head loaded, and each decoder layer loaded when it runs and dropped after it.
Memory is one layer in float32 plus the activations, not the whole model.

``perplexity`` measures a stored model this way (`mvc eval`); its number is the one the whole model
in memory gives (same operations, same order: tests/test_compress.py checks it).
"""

from __future__ import annotations

import math
import os
import re

from ..errors import MvcError
from .calib import LayerInputs
from .model import Source, install_low_rank, model_class, really_unexpected

#: per causal architecture: the final norm and the head, applied to the last layer's output
TAIL = {"llama": ("model.norm", "lm_head"), "mistral": ("model.norm", "lm_head"),
         "qwen2": ("model.norm", "lm_head"), "gpt2": ("transformer.ln_f", "lm_head")}


def _trim() -> None:
    """Hand the memory a dropped layer held back to the system (glibc keeps freed blocks under its
    mmap threshold in the heap, so RSS would grow by a layer per layer)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _memory(device) -> str:
    """This process's resident memory (the CPU) or torch's allocation on a CUDA device, in words."""
    if device.type == "cuda":
        import torch

        return f"{torch.cuda.memory_allocated(device) / 2**30:.1f} GiB on {device}"
    try:
        with open("/proc/self/statm") as f:
            return f"{int(f.read().split()[1]) * 4096 / 2**30:.1f} GiB"
    except OSError:
        return "?"


class LayerClock:
    """``layer i/N, tokens/s, memory`` for a progress note after each layer."""

    def __init__(self, layers: int, tokens: int, device):
        import time

        self.layers, self.tokens, self.device = layers, tokens, device
        self.t = time.perf_counter()

    def note(self, progress, layer: int) -> None:
        import time

        now = time.perf_counter()
        rate = f", {self.tokens / max(now - self.t, 1e-9):,.0f} tokens/s" if self.tokens else ""
        self.t = now
        if progress is not None:
            progress.note(f"layer {layer + 1}/{self.layers}{rate}, {_memory(self.device)}")


class StreamedModel:
    """A transformers model built on the meta device whose decoder layers are loaded one at a
    time from *src*'s revision (dequantized where the revision is quantized) onto *device*."""

    def __init__(self, repo, src: Source, device=None):
        import torch
        from accelerate import init_empty_weights

        self.repo = repo
        self.src = src
        self.device = device if device is not None else torch.device("cpu")
        cls, self.hf_config = model_class(src)
        with init_empty_weights():  # parameters on meta; buffers (rotary frequencies) real
            self.model = cls(self.hf_config)
            install_low_rank(self.model, src.config)
        self.model.float().eval()
        if self.device.type != "cpu":  # the real buffers (rotary frequencies); parameters come later
            for module in self.model.modules():
                for k, b in module._buffers.items():
                    if b is not None and not b.is_meta:
                        module._buffers[k] = b.to(self.device)
        pat = re.compile(src.arch.layers)
        self.layer_of: dict[str, int] = {}
        self.layers_path = ""
        for name in src.where:
            m = pat.search(name)
            if m is not None:
                self.layer_of[name] = int(m.group(1))
                self.layers_path = name[:m.start(1)].rstrip(".")
        outside = [n for n in src.where if n not in self.layer_of]
        self._assign(self.model, self._load(outside), "")
        self._tie()

    def _load(self, names: list[str]) -> dict:
        """The named stored tensors (and their quantization companions) as float32, dequantized."""

        import json

        import torch

        from ..formats.quantized import RTN_META, dequantize_state
        from ..load import safetensors_metadata, tensor_bytes, to_torch
        from ..pipeline import Materializer

        want = set(names)  # stored names: a quantized weight's companions are among them
        out = {}
        with Materializer(self.repo.odb, workers=self.repo.workers) as mat:
            for path in sorted({self.src.where[n] for n in names}):
                picked = {n: t for n, t in self.src.files[path] if n in want}
                state = {n: to_torch(t, tensor_bytes(mat, t)) for n, t in picked.items()}
                if self.src.quantized:
                    f = self.repo.odb.get(self.src.tree.as_dict()[path].oid, "file")
                    meta = safetensors_metadata(mat, f) or {}
                    if RTN_META in meta:  # only this subset's entries
                        rtn = {k: v for k, v in json.loads(meta[RTN_META]).items() if k + ".qweight" in state}
                        meta = {**meta, RTN_META: json.dumps(rtn)}
                    # in float32, as the quantize step evaluates it (bf16 would round the products)
                    state = dequantize_state(state, meta, dtype=torch.float32)
                out.update({n: (v.float() if v.is_floating_point() else v).to(self.device) for n, v in state.items()})
        # the stored bytes were read through the store's maps: their pages would stay in this
        # process's RSS, the whole compressed model by the last layer
        self.repo.backend.release_pages()
        return out

    @staticmethod
    def _assign(module, state: dict, prefix: str) -> None:
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        _missing, unexpected = module.load_state_dict(own, strict=False, assign=True)
        unexpected = really_unexpected(module, unexpected)
        if unexpected:
            raise MvcError(f"the weights do not fit {type(module).__name__}: unexpected tensor {unexpected[0]!r}")

    def _tie(self) -> None:
        """A head tied to the embeddings (no lm_head.weight stored) shares their tensor."""
        head = getattr(self.model, "lm_head", None)
        if head is not None and head.weight.is_meta:
            emb = self.model.get_input_embeddings()
            head.weight = emb.weight

    def materialize(self, layer: int) -> None:
        names = [n for n, i in self.layer_of.items() if i == layer]
        self._assign(self.model, self._load(names), "")
        module = self.model.get_submodule(f"{self.layers_path}.{layer}")
        if any(p.is_meta for p in module.parameters()):
            bad = next(n for n, p in module.named_parameters() if p.is_meta)
            raise MvcError(f"layer {layer} has no stored tensor for {bad!r}")

    def release(self, layer: int) -> None:
        self.model.get_submodule(f"{self.layers_path}.{layer}").to("meta")
        _trim()

    @property
    def num_layers(self) -> int:
        return max(self.layer_of.values()) + 1

    def linears(self, scope=None, embeddings=False) -> list:
        """Model.linears(): each prunable matrix and its module (on the meta device unless its
        layer is loaded: shapes are always there)."""
        from .model import Linear, linear_names

        return [Linear(n, role, layer, self.model.get_submodule(n[:-len(".weight")]))
                for n, role, layer in linear_names(self.src, scope, embeddings)]


def perplexity(repo, src: Source, windows, batch: int = 8, device: str | None = None,
               max_memory: int | None = None, progress=None) -> float:
    """The perplexity() of evaluate.py, one decoder layer in memory at a time, on *device*
    (``--device``; refused when its plan does not fit the device or *max_memory*)."""
    import torch

    from . import device as dev

    tail = TAIL.get(src.arch.model_type)
    if tail is None:
        raise MvcError(f"no layer-by-layer evaluation for {src.arch.model_type}")
    where = dev.resolve(device)
    dev.check(dev.plan(src, "eval", eval_tokens=int(windows.numel()), eval_seq_len=int(windows.shape[1]),
                       batch=batch), where, max_memory)
    sm = StreamedModel(repo, src, where)
    windows = windows.to(where)
    inputs = LayerInputs(sm, windows, batch)
    clock = LayerClock(sm.num_layers, int(windows.numel()), where)
    if progress is not None:
        progress.start("evaluating", sm.num_layers, unit="layer")
    for layer in range(sm.num_layers):
        sm.materialize(layer)
        inputs.advance_to(layer + 1)
        sm.release(layer)
        if progress is not None:
            progress.advance(nbytes=1)
            clock.note(progress, layer)
    norm, head = (sm.model.get_submodule(p) for p in tail)
    total, count = 0.0, 0
    with torch.no_grad():
        for k, (args, kwargs) in enumerate(inputs.items):
            hidden = args[0] if args else kwargs["hidden_states"]
            x = windows[k * batch:(k + 1) * batch]
            logits = head(norm(hidden)).float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
            total += nll.item()
            count += x[:, 1:].numel()
    return math.exp(total / count)


def score(repo, src: Source, method: str, calib, scope=None, elements: bool = False, device=None,
          progress=None) -> tuple[dict, dict]:
    """score.run's report for magnitude or Wanda scores, one decoder layer in memory at a time:
    each layer is loaded, its inputs measured (Wanda), its matrices scored and summarized, and the
    layer dropped. The scores are those of the whole model in memory (same inputs, same order).
    Returns (report, {tensor: scores} when *elements*, else {})."""
    from . import device as dev
    from .calib import windows
    from .score import layer_summary, tensor_summary

    where = dev.resolve(device)
    sm = StreamedModel(repo, src, where)
    every = sm.linears()
    chosen = {li.name for li in sm.linears(scope)}
    inputs = LayerInputs(sm, windows(repo, sm, calib).to(where)) if method == "wanda" else None
    layers = sorted({li.layer for li in every if li.layer >= 0})
    clock = LayerClock(len(layers), 0, where)
    if progress is not None:
        progress.start(f"scoring ({method})", len(layers), unit="layer")
    report: dict = {"tensors": [], "layers": []}
    kept: dict = {}
    for layer in layers:
        group = [li for li in every if li.layer == layer and li.name in chosen]
        if group or inputs is not None:
            sm.materialize(layer)
        stats = inputs.stats(group) if inputs is not None and group else {}
        scores = {}
        for li in group:
            s = li.weight().abs().float()
            if method == "wanda":
                s = s * stats[li.name].sq.sqrt().float()[None, :]
            scores[li.name] = s.cpu()
            report["tensors"].append(tensor_summary(li.name, scores[li.name]))
        report["layers"].append(layer_summary(sm, layer, every, scores))
        if elements:
            kept.update(scores)
        del scores, stats
        if inputs is not None and layer < layers[-1]:
            inputs.advance_to(layer + 1)
        sm.release(layer)
        if progress is not None:
            progress.advance(nbytes=1)
            clock.note(progress, layer)
    if progress is not None:
        progress.finish()
    return report, kept


def source_with_tree(repo, src: Source, tree) -> Source:
    """*src* for another tree of the same model (a pruned wave, a quantized model): its tensors'
    metadata and its config.json read from the tree (a quantized tree says so there)."""
    import dataclasses
    import json

    from .model import read_file

    entries = tree.as_dict()
    files, where = {}, {}
    paths = [p for p in entries if p.startswith(src.prefix) and "/" not in p[len(src.prefix):]
             and p.endswith(".safetensors")]
    for path in sorted(paths):
        f = repo.odb.get(entries[path].oid, "file")
        metas = repo.odb.get_many([tid for _n, tid in f.tensors], "tensor")
        files[path] = [(n, t) for (n, _tid), t in zip(f.tensors, metas)]
        where.update({n: path for n, _tid in f.tensors})
    cfg_entry = entries.get(src.prefix + "config.json")
    config = json.loads(read_file(repo, cfg_entry.oid)) if cfg_entry is not None else src.config
    out = dataclasses.replace(src, tree=tree, files=files, where=where, config=config)
    out.quantized = bool(config.get("quantization_config"))
    return out


def rtn_quantize_files(repo, src: Source, targets: set, bits_of, group_size: int, out_dir: str) -> dict:
    """quantize.rtn_quantize_dir from the store, a tensor at a time: each weight file is written into
    *out_dir* with every target's qweight and scales in place of its weight (the other tensors'
    bytes copied), and config.json says how. Memory is one tensor, whatever the model's size.
    Returns {tensor: (quantized, total)}."""
    import json

    from ..errors import UsageError
    from ..formats.quantized import RTN_META, rtn_quantize, write_rtn_config
    from ..formats.safetensors import encode_header
    from ..load import tensor_bytes, to_torch
    from ..pipeline import Materializer
    from ..store.objects import DTYPES

    counts: dict = {}
    with Materializer(repo.odb, workers=repo.workers) as mat:
        for path, items in src.files.items():
            layout, info = [], {}  # (name, dtype, shape)
            for name, meta in items:
                if name not in targets:
                    layout.append((name, meta.dtype, tuple(meta.shape)))
                    continue
                rows, cols = meta.shape
                bits = bits_of(name)
                g = group_size or cols
                if cols % g or (bits == 4 and cols % 2):
                    why = f"{cols} inputs are not a multiple of the group size {g}" if cols % g else \
                        "int4 packing needs an even number of inputs"
                    raise UsageError(f"{name} {[rows, cols]}: {why}")
                qcols = cols if bits == 8 else cols // 2
                layout.append((name + ".qweight", "I8" if bits == 8 else "U8", (rows, qcols)))
                layout.append((name + ".scales", "F32", (rows, cols // g)))
                info[name] = {"bits": bits, "group_size": group_size, "shape": [rows, cols],
                              "dtype": meta.dtype if meta.dtype in ("BF16", "F16") else "F32"}
                counts[name] = (rows * cols, rows * cols)
            # safetensors' own order: wider elements first (every tensor stays aligned), then by name
            layout.sort(key=lambda e: (-DTYPES[e[1]][0], e[0]))
            meta_ = {"format": "pt", **({RTN_META: json.dumps(info, sort_keys=True)} if info else {})}
            head, offsets, size = encode_header(layout, meta_)
            base = len(head)
            with open(os.path.join(out_dir, os.path.basename(path)), "wb") as f:
                f.write(head)
                f.truncate(base + size)
                fd = f.fileno()
                for name, meta in items:  # one source tensor at a time
                    raw = tensor_bytes(mat, meta)
                    if name not in targets:
                        os.pwrite(fd, raw, base + offsets[name])
                        continue
                    q, scales = rtn_quantize(to_torch(meta, raw), info[name]["bits"], group_size)
                    os.pwrite(fd, q.contiguous().view(-1).numpy().tobytes(), base + offsets[name + ".qweight"])
                    os.pwrite(fd, scales.contiguous().view(-1).numpy().tobytes(), base + offsets[name + ".scales"])
                    del raw, q, scales
                    _trim()
    write_rtn_config(src.config, [bits_of(n) for n in counts], group_size, out_dir)
    return counts


def _store_tensor(ing, value, meta) -> str:
    """Store a tensor made in memory (its stored dtype and shape, as *meta*), each chunk tried as a
    delta against the same chunk of *meta*; returns its id."""
    import torch

    from ..pipeline import CHUNK_SIZE
    from ..store.objects import DTYPES, Tensor

    data = value.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    if len(data) != meta.nbytes:
        raise MvcError(f"a pruned tensor of {len(data)} bytes where {meta.nbytes} were stored")
    size, is_float = DTYPES[meta.dtype]
    fs = size if is_float and size > 1 else 0
    chunks = []
    for k, i in enumerate(range(0, len(data), CHUNK_SIZE)):
        base = [meta.chunks[k]] if k < len(meta.chunks) and meta.chunk_size == CHUNK_SIZE else []
        chunks.append(ing.add_chunk(data[i:i + CHUNK_SIZE], fs, base))
    return ing.add_meta(Tensor(meta.dtype, tuple(meta.shape), CHUNK_SIZE, tuple(chunks)))


def prune(repo, src: Source, method: str, sparsity_of, pattern, clusters: int, seed: int, calib,
          scope=None, embeddings: bool = False, progress=None, cluster_info: dict | None = None,
          device=None):
    """The prune step from the store, one decoder layer in memory at a time: each layer is loaded,
    measured on the calibration inputs (Wanda, SparseGPT), pruned, rounded to its stored dtype,
    its changed matrices stored, the pruned layer run to make the next layer's inputs, and the
    layer dropped. Returns (the new tree, {tensor: (pruned, total)}). The files keep their headers
    (a prune changes values, not shapes or dtypes)."""
    import torch

    from ..load import _TORCH_DTYPES
    from ..pipeline import Ingestor
    from ..store.objects import File, Tree
    from . import device as dev
    from .calib import windows
    from .model import Linear, linear_names
    from .prune import prune_matrix

    names = linear_names(src, scope, embeddings)
    where = dev.resolve(device)  # the memory plan was checked once, before the step began (prune.run)
    sm = StreamedModel(repo, src, where)
    batches = windows(repo, sm, calib).to(where) if method != "magnitude" else None
    inputs = LayerInputs(sm, batches) if batches is not None else None
    last = max(layer for _n, _r, layer in names)
    clock = LayerClock(last + 1, int(batches.numel()) if batches is not None else 0, where)
    counts: dict = {}
    new_ids: dict[str, str] = {}
    entries = src.tree.as_dict()
    # small write batches: a layer's changed matrices are stored while the next layer's work holds
    # the memory (the default 32 MiB batch, one more in flight, would sit beside SparseGPT's Hessian)
    with Ingestor(repo.odb, store=True, workers=repo.workers, batch_bytes=8 << 20,
                  bases=repo.delta_bases([src.commit] if src.commit else [])) as ing:
        for layer in ([-1] if any(n[2] < 0 for n in names) else []) + list(range(last + 1)):
            mine = [(n, role) for n, role, i in names if i == layer]
            loaded = layer >= 0 and bool(mine or inputs is not None)  # layer -1: embeddings, always loaded
            if loaded:
                sm.materialize(layer)
            group = [Linear(n, role, layer, sm.model.get_submodule(n[:-len(".weight")])) for n, role in mine]
            stats = inputs.stats(group, gram=method == "sparsegpt") if inputs is not None and group else {}
            for k, li in enumerate(group):
                last_use = not any(stats.get(o.name) is stats.get(li.name) for o in group[k + 1:])
                counts[li.name] = prune_matrix(li, method, stats, sparsity_of(li.name), pattern, clusters, seed,
                                               cluster_info, last_use)
                stats.pop(li.name, None)  # its X^T X goes with the last linear that reads it
                meta = src.tensor_meta(li.name)
                w = li.module.weight.data  # as stored: GPT-2's Conv1D keeps (in, out)
                stored = w.to(getattr(torch, _TORCH_DTYPES[meta.dtype]))
                w.copy_(stored.float())  # the model that runs on is the one stored
                new_ids[li.name] = _store_tensor(ing, stored.cpu(), meta)
                del stored
                _trim()
                if progress is not None:
                    progress.advance(nbytes=w.numel() * 4, tensors=1)
            if inputs is not None and layer >= 0 and layer < last:
                inputs.advance_to(layer + 1)
            if loaded:
                sm.release(layer)
            if layer >= 0:
                clock.note(progress, layer)
        changed = {}
        for path in src.files:
            f = repo.odb.get(entries[path].oid, "file")
            if any(n in new_ids for n, _ in f.tensors):
                nf = File(f.format, f.size, f.chunks, tuple((n, new_ids.get(n, tid)) for n, tid in f.tensors))
                changed[path] = (entries[path].mode, ing.add_meta(nf))
        ing.flush(wait=True)
    tree = Tree.build({**{p: (e.mode, e.oid) for p, e in entries.items()}, **changed})
    return tree, counts
